"""What the project's command lines share: bad input is one line on stderr and exit code 2; Ctrl-C is one line
that says what was kept, and exit code 130."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
LIBRARY_LOGGERS = ("huggingface_hub", "diffusers", "transformers")
T = TypeVar("T")


class BadInput(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C, as one line that says what the command kept."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help plus "(default: X)" where an option has a value by default and its help does not say
    its default already. argparse's ArgumentDefaultsHelpFormatter also appends "(default: None)" to options
    whose help names their real default ("default: the model's")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = isinstance(default, (str, int, float, Path)) and not isinstance(default, bool)
        if not shown or "default" in text or not action.option_strings or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):  # argparse's own errors follow the one-line rule too
        raise BadInput(message)


def prog(module: str, script: str) -> str:
    """The program's name in usage lines, as it was started: the console script `script` (pyproject.toml's
    [project.scripts]) when run as one, else `python -m module`."""
    started = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return script if started == script else f"python -m {module}"


def quiet_loaders() -> None:
    """Loader progress bars off: stderr carries the command's own lines and the sampler's bar only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """While models and weight files load and are checked: the libraries' log records (the hub's retry
    notices, diffusers' and transformers' warnings) and Python warnings stay off stderr, so that a refusal is
    its one line and nothing before it. They still reach the logging module: they propagate to the root
    logger, where a program that configures logging receives them; a NullHandler keeps Python's last-resort
    handler from printing them where nothing is configured. Everything is as before after the block."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    quiet_loaders()
    for library in (diffusers_logging, transformers_logging):
        library.get_verbosity()  # each adds its stderr handler on first use: now, so that it is set aside below
    null = logging.NullHandler()
    saved = []
    for name in (*LIBRARY_LOGGERS, "py.warnings"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        for handler in logger.handlers[:]:
            if type(handler) is logging.StreamHandler:  # the libraries' own, to stderr; not a file a user set up
                logger.removeHandler(handler)
        logger.addHandler(null)
        logger.propagate = True
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.removeHandler(null)
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.propagate = propagate


def load_error(error: BaseException, what: str) -> str:
    """A loader's error as one line. The hub's do not say which model they are about, nor in plain words why:
    those start with `what` ("--model owner/name")."""
    from huggingface_hub import constants, errors

    if isinstance(error, errors.LocalEntryNotFoundError):
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return f"{what}: not in the local hub cache, and {reason}"
    if isinstance(error, errors.GatedRepoError):
        return f"{what}: a gated model on the hub; accept its terms on huggingface.co and log in (hf auth login)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"{what}: no such model on the hub (or a private one: log in with hf auth login)"
    if isinstance(error, errors.EntryNotFoundError):
        return f"{what}: {first_line(error)}"
    return first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect at its end, so that what the block writes or removes is done
    whole. Only the main thread can hold a signal, and only a handler set from Python can be put back;
    otherwise the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # to the handler it was meant for: KeyboardInterrupt, or ignored


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
    """Parse `argv` and hand the arguments over; BadInput becomes one `error:` line and exit code 2, Interrupted
    its one line and exit code 130."""
    try:
        handler(parser.parse_args(argv))
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
