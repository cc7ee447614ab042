"""What the project's command lines share: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

EXIT_BAD_INPUT = 2
T = TypeVar("T")


class BadInput(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the one-line rule too
        raise BadInput(message)


def quiet_loaders() -> None:
    """Loader progress bars off: stderr carries the command's own lines and the sampler's bar only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()


def parse_or_exit(
    parser: argparse.ArgumentParser, argv: list[str] | None, convert: Callable[[argparse.Namespace], T]
) -> T:
    """`convert(parser.parse_args(argv))` for a script that runs on its own rather than through `run`: a bad
    flag (with a `Parser`), or a ValueError from `convert`, is one `error:` line on stderr and exit code 2."""
    try:
        return convert(parser.parse_args(argv))
    except (BadInput, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def run(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    """Parse `argv` and hand the arguments over; BadInput becomes one `error:` line and exit code 2."""
    try:
        handler(parser.parse_args(argv))
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
