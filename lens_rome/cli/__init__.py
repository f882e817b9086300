"""The ``lens-rome`` command line: a router to one module per command.

The library never imports this package.  Parsing imports no torch, so
``lens-rome --help`` is instant; each command imports what it needs when it runs.
Only :class:`~lens_rome.errors.LensRomeError` and the argument and file errors
below are shown as one ``error: ...`` line with exit status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from lens_rome.cli.arguments import CommandError
from lens_rome.cli.dataset import add_trace_dataset_parser
from lens_rome.cli.edit import add_edit_parser
from lens_rome.cli.evaluate import add_evaluate_parser
from lens_rome.cli.precision import add_precision_parser
from lens_rome.cli.trace import add_trace_parser
from lens_rome.errors import USER_ERRORS


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
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns 0 on success.

    Bad input exits with status 2 (``SystemExit``) after printing ``error: ...``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                    category=DeprecationWarning)
            return args.run(args)
    except (CommandError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
