"""examples/app (what the README quickstart and compose.yaml serve) is exactly what `flux init` writes."""

from __future__ import annotations

from pathlib import Path

from flux.cli.init import scaffold

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "app"


def test_examples_app_is_the_scaffold_output(tmp_path):
    scaffold(tmp_path / "app")
    written = {p.relative_to(tmp_path / "app").as_posix(): p.read_bytes() for p in (tmp_path / "app").rglob("*") if p.is_file()}
    shipped = {p.relative_to(EXAMPLE).as_posix(): p.read_bytes() for p in EXAMPLE.rglob("*")
               if p.is_file() and ".flux" not in p.parts and "__pycache__" not in p.parts}
    assert shipped == written, "run `flux init --force examples/app` after changing flux/scaffold/"
