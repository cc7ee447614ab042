"""A trainer's command line: one flag per field of its Config dataclass (named and typed by the field, its default
the field's) and --export-only, checked before torch loads: every number finite and in range, --out and --work
writable (`sc_app.checks.training_config`), the counts named positive at least 1 and those named non-negative at
least 0, then the trainer's own `check`. A bad flag is one `error:` line and exit code 2 (`sc_app.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

from sc_app.checks import training_config
from sc_app.cli import Parser, parse_or_exit


def parse_config(
    config_class,
    description: str,
    argv: list[str] | None = None,
    *,
    export_help: str = "write --out from the latest checkpoint",
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    check: Callable | None = None,
):
    """(the Config the flags give, whether --export-only was given)."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(config_class):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    parser.add_argument("--export-only", action="store_true", help=export_help)

    def config(args):
        flags = vars(args)
        export_only = flags.pop("export_only")
        cfg = config_class(**flags)
        training_config(cfg)
        for names, least in ((positive, 1), (non_negative, 0)):
            for name in names:
                if getattr(cfg, name) < least:
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(f"{flag} must be at least {least}, got {getattr(cfg, name)}")
        if check is not None:
            check(cfg)
        return cfg, export_only

    return parse_or_exit(parser, argv, config)
