"""How the CLIs fail: one line on stderr, exit 2 for a bad command line and 1 for anything else.

The traceback is shown only with `--debug` or `RKU_DEBUG=1`, because a user fixing an argument needs
the message, not the stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "RKU_DEBUG"
DEBUG_HELP = f"show the traceback of an error (also {DEBUG_ENV}=1)"


class UsageError(ValueError):
    """A command-line choice that cannot work (exit status 2, like argparse's own errors)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (not the whole usage) before exiting with 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def run_cli(main: Callable[[Sequence[str]], object], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and turn an exception into a one-line message and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure gets the same one-line treatment
        if debug:
            raise
        lines = str(error).strip().splitlines() or [""]
        more = f" (+{len(lines) - 1} more lines; --debug shows all)" if len(lines) > 1 else ""
        kind = "" if isinstance(error, UsageError) else f"{type(error).__name__}: "
        print(f"{prog}: error: {kind}{lines[0]}{more}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0
