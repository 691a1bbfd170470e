"""The ``feedbackcam`` command line. This package parses and dispatches: each command's flags sit
beside the function it runs (:mod:`.experiments`: demo, simulate, shortcuts; :mod:`.data`:
data check and prepare; :mod:`.models`: train-base, evaluate, explain, import-keras;
:mod:`.propagate`: propagate; :mod:`.discover`: clusters; the app's commands in
:mod:`feedbackcam.service.commands`);
shared flag groups live in :mod:`feedbackcam.options`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..service.commands import SERVICE_COMMANDS
from . import data, discover, experiments, models, propagate

COMMANDS = (
    *experiments.COMMANDS,
    *data.COMMANDS,
    *models.COMMANDS,
    *propagate.COMMANDS,
    *discover.COMMANDS,
    *SERVICE_COMMANDS,
)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none to show (``None``:
    the help text says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every command's ``--help`` shows each option's default (subcommands inherit this)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Defaults)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if (
            args
            and args[0].startswith("-")
            and kwargs.get("action") not in ("help", "version")
            and kwargs.get("default") is not None
        ):
            # argparse prints no help line at all for an option without help (nor for one
            # whose help is blank), so it would hide the default too
            kwargs.setdefault("help", "(default: %(default)s)")
        return super().add_argument(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="feedbackcam",
        description="Correct an image classifier through its explanation, and make it learn.",
    )
    parser.add_argument("--version", action="version", version=f"feedbackcam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (OSError, ValueError) as err:  # user errors: one line, no traceback
        if args.verbose:
            raise
        print(f"feedbackcam {args.command}: error: {err}", file=sys.stderr)
        return 2
