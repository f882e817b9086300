"""``lens-rome evaluate``: score an editing method on CounterFact or zsRE cases.

::

    lens-rome evaluate --dataset counterfact.json --format counterfact \\
        --method rome --limit 100 --out eval/rome

writes ``eval/rome/cases/<case_id>.json`` per case and ``eval/rome/summary.json``
(scores in percent), and prints the summary.  Rerun the same command after an
interruption: finished cases are kept and skipped.  :func:`add_evaluate_parser`
and :func:`run_evaluate` are wired into ``lens_rome.cli``.
"""

from __future__ import annotations

import argparse
import sys

from lens_rome.errors import reporting_user_errors

FORMATS = ("counterfact", "zsre")
METHODS = ("rome", "ft", "ft-l", "none")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to an ``argparse`` subparsers object."""
    from lens_rome.cli import positive_int  # noqa: PLC0415 (cli imports this module)

    from lens_rome.models import DEFAULT_MODEL  # noqa: PLC0415

    parser = subparsers.add_parser(
        "evaluate", help="score an editing method (rome, ft, ft-l, none) on CounterFact or zsRE",
        description="Apply the method to each case of the dataset in turn (each case starts "
                    "from the unedited model), measure the paper's metrics, and write one "
                    "result file per case and summary.json under --out.  Rerunning the same "
                    "command resumes an interrupted run.",
        epilog="example: lens-rome evaluate --dataset counterfact.json --format counterfact "
               "--method rome --limit 100 --out eval/rome",
    )
    parser.add_argument("--dataset", required=True, metavar="FILE",
                        help="a JSON list of CounterFact or zsRE (MEND format) records")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the dataset's format")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="rome; ft (fine-tune one layer's W_out); ft-l (the same under an "
                             "L-infinity constraint); none (the unedited model)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N cases")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the per-case results and summary.json")
    parser.add_argument("--max-new-tokens", type=_count, default=100, metavar="T",
                        help="tokens generated per generation prompt for fluency and "
                             "consistency (default: %(default)s, the paper's; 0 skips them)")
    parser.add_argument("--layer", type=int, default=None,
                        help="the layer to edit (default: ROME's layer for the model)")
    parser.add_argument("--seed", type=int, default=0, help="seeds generation (default: 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(run=run_evaluate)
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``lens-rome evaluate``; returns the exit status (2 for bad input)."""
    return reporting_user_errors(_run, args)


def _run(args) -> int:
    import torch  # noqa: PLC0415

    from lens_rome.datasets import load_dataset  # noqa: PLC0415
    from lens_rome.evaluation import evaluate  # noqa: PLC0415
    from lens_rome.models import load_model  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = load_dataset(args.dataset, args.format)  # bad data fails before the model loads
    model = load_model(args.model)
    options = {"layer": args.layer} if args.layer is not None and args.method != "none" else {}
    summary = evaluate(model, cases, args.method, args.out, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, seed=args.seed,
                       method_options=options, progress=True)
    print(f"{args.method} on {summary['n']} {args.format} cases ({args.out}/summary.json):")
    for key, value in summary.items():
        shown = "n/a" if value is None else (f"{value}" if key == "n" else f"{value:.2f}")
        print(f"  {key:24} {shown}")
    return 0


def main(argv=None) -> int:
    """``python -m lens_rome.evaluate_cli evaluate ...``: the command without ``lens_rome.cli``."""
    parser = argparse.ArgumentParser(prog="python -m lens_rome.evaluate_cli")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
