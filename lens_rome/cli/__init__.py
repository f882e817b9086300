"""The ``lens-rome`` command line: a router to one module per command.

The library never imports this package.  Parsing imports no torch, so
``lens-rome --help`` is instant; each command imports what it needs when it runs.
Only the errors of :data:`lens_rome.errors.USER_ERRORS` (bad input, a missing
file, an output that already exists) are shown as one ``error: ...`` line with
exit status 2 (:func:`lens_rome.cli.arguments.command`); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from lens_rome.cli.dataset import add_trace_dataset_parser
from lens_rome.cli.edit import add_edit_parser
from lens_rome.cli.evaluate import add_evaluate_parser
from lens_rome.cli.precision import add_precision_parser
from lens_rome.cli.trace import add_trace_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-rome",
        description="Causal tracing of factual recall on TransformerLens models "
                    "(Meng et al. 2022, 'Locating and Editing Factual Associations in GPT').",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_trace_parser(commands)
    add_trace_dataset_parser(commands)
    add_edit_parser(commands)
    add_evaluate_parser(commands)
    add_precision_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0 on success; 2 for bad input, after printing ``error: ...`` (bad usage
    exits with status 2 through ``SystemExit``, as argparse does).
    """
    args = build_parser().parse_args(argv)
    return args.run(args)
