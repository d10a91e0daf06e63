"""`python -m flux` is the `flux` command."""

from flux.cli import main

main()
