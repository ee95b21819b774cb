"""Small helpers shared by the stage scripts: boolean flags as the paper writes them, one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from csr.io import CSRError


def str2bool(s: str | bool) -> bool:
    """Parse `True/False/1/0/yes/no` so `--use_CL True` works as in the paper's README."""
    if isinstance(s, bool):
        return s
    v = s.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {s!r}")


def bool_flag(parser: argparse._ActionsContainer, *names: str, default: bool, help: str) -> None:
    """`--flag` alone means True; `--flag True|False|1|0` sets it explicitly."""
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{help} (default {default})")


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning `CSRError` into a one-line message and exit code 2."""
    try:
        main(argv)
    except CSRError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
