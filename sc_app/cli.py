"""What the project's command lines share: bad input is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_BAD_INPUT = 2


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


def run(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], None], argv: list[str] | None) -> int:
    """Parse `argv` and hand the arguments over; BadInput becomes one `error:` line and exit code 2."""
    try:
        handler(parser.parse_args(argv))
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
