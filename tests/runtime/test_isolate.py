"""The isolate pool keeps a bounded number of isolates alive, however fast requests come."""

from __future__ import annotations

import asyncio

from flux.project import Function
from flux.runtime.isolate import IsolatePool, compile_function

SOURCE = "export default async function (req, ctx) { return { status: 200, body: {} }; }\n"


def _pool(tmp_path, size: int) -> IsolatePool:
    path = tmp_path / "functions" / "ok.js"
    path.parent.mkdir(parents=True)
    path.write_text(SOURCE)
    function = Function(name="ok", path=path, source=SOURCE, code_version="0" * 16)
    return IsolatePool(compile_function(function), size=size, memory_mb=32)


def test_isolates_used_while_the_pool_refills_are_freed_as_it_goes(tmp_path):
    """Requests that outpace the refill park used isolates all the while; they must not pile up."""

    async def main() -> int:
        pool = _pool(tmp_path, size=2)
        most_parked = 0
        try:
            for _ in range(150):
                pool.release(await pool.acquire())
                most_parked = max(most_parked, len(pool._used))
                await asyncio.sleep(0)
        finally:
            pool.close()
        return most_parked

    assert asyncio.run(main()) <= 8
