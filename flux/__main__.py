"""`python -m flux` is the `flux` command; `entry()` is also the installed script's."""

import sys

from flux.signals import hold_for_command


def entry() -> None:
    hold_for_command(sys.argv[1:])  # before the CLI's imports, a quarter of a second a SIGTERM would cut short

    from flux.cli import main

    main()


if __name__ == "__main__":
    entry()
