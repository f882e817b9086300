"""``lens-rome evaluate``: score an editing method on CounterFact or zsRE cases.

::

    lens-rome evaluate --dataset counterfact.json --format counterfact \\
        --method rome --limit 100 --out eval/rome

writes ``eval/rome/cases/<case_id>.json`` per case and ``eval/rome/summary.json``
(scores in percent), and prints the summary.  Rerun the same command after an
interruption: finished cases are kept and skipped.  Many edits on one model::

    lens-rome evaluate --dataset counterfact.json --format counterfact \\
        --method memit --batch-size 10 --sequential --checkpoints 10,50 --out eval/memit

applies the cases 10 at a time, in order, without reverting, and measures every
case edited so far after 10, 50 and all edits.  :func:`add_evaluate_parser` and
:func:`run_evaluate` are wired into ``lens_rome.cli``.
"""

from __future__ import annotations

import argparse

from lens_rome.cli import arguments
from lens_rome.cli.arguments import (
    add_model_option,
    add_threads_option,
    command,
    count,
    counts,
    positive_int,
    set_threads,
)
from lens_rome.editing.registry import METHODS
from lens_rome.errors import InputError

FORMATS = ("counterfact", "zsre")
# The library's defaults, repeated so that --help needs no torch import (a test holds them equal)
DEFAULT_ANSWER_TOKENS = 10  # lens_rome.evaluation.counterfact.DEFAULT_ANSWER_TOKENS
DEFAULT_PERPLEXITY_CHUNKS = 4  # lens_rome.evaluation.collapse.DEFAULT_CHUNKS


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` command to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "evaluate", help="score an editing method (rome, r-rome, memit, alphaedit, ft, ft-l, "
                         "none) on CounterFact or zsRE",
        description="Apply the method to each case of the dataset in turn (each case starts "
                    "from the unedited model; --batch-size N edits N cases at once; "
                    "--sequential never reverts, so the edits pile up), measure the paper's "
                    "metrics, and write one result file per case and summary.json under "
                    "--out.  Rerunning the same command resumes an interrupted run.",
        epilog="example: lens-rome evaluate --dataset counterfact.json --format counterfact "
               "--method memit --batch-size 10 --sequential --checkpoints 10,50 "
               "--out eval/memit",
    )
    parser.add_argument("--dataset", required=True, metavar="FILE",
                        help="a JSON list of CounterFact or zsRE (MEND format) records")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the dataset's format")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="rome; r-rome (ROME with r-ROME's averaged-key update); memit "
                             "(batches over several layers); alphaedit (MEMIT with AlphaEdit's "
                             "null-space projection); ft (fine-tune one layer's W_out); ft-l "
                             "(the same under an L-infinity constraint); none (unedited)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N cases")
    add_model_option(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the per-case results and summary.json")
    parser.add_argument("--max-new-tokens", type=count, default=100, metavar="T",
                        help="tokens generated per generation prompt for fluency and "
                             "consistency (default: %(default)s, the paper's; 0 skips them)")
    parser.add_argument("--layer", type=int, default=None,
                        help="the layer rome, r-rome, ft, ft-l edit (default: ROME's layer "
                             "for the model)")
    parser.add_argument("--layers", type=counts, default=None, metavar="L1,L2,...",
                        help="the layers memit and alphaedit edit (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="edit N cases at once (default: %(default)s)")
    sequential = parser.add_argument_group(
        "sequential runs", "many edits on one model: the batches pile up, never reverted")
    sequential.add_argument("--sequential", action="store_true",
                            help="apply the batches in order without reverting; measure every "
                                 "case edited so far at the checkpoints and after the last batch")
    sequential.add_argument("--checkpoints", type=counts, default=None, metavar="N1,N2,...",
                            help="also measure after these numbers of edits (multiples of "
                                 "--batch-size)")
    sequential.add_argument("--checkpoint-sample", type=positive_int, default=None, metavar="N",
                            help="measure at most N of the cases edited so far at each "
                                 "checkpoint, a seeded sample (default: all)")
    sequential.add_argument("--original-dir", default=None, metavar="DIR",
                            help="where the unedited model's measures are cached (default: "
                                 "OUT/original; runs over the same cases can share one)")
    parser.add_argument("--answer-tokens", type=positive_int, default=DEFAULT_ANSWER_TOKENS,
                        metavar="T",
                        help="greedy tokens per prompt for the generated protocol "
                             "(default: %(default)s)")
    parser.add_argument("--perplexity-chunks", type=count, default=DEFAULT_PERPLEXITY_CHUNKS,
                        metavar="N",
                        help="held-out Wikipedia text for the collapse monitor, in chunks of "
                             "128 tokens, measured before editing and after each edit (each "
                             "checkpoint of a sequential run); 0 skips it (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds generation (default: 0)")
    add_threads_option(parser)
    parser.set_defaults(run=run_evaluate)
    return parser


@command
def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``lens-rome evaluate``; returns the exit status (2 for bad input)."""
    from lens_rome.data.cases import load_dataset  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.evaluation.runner import evaluate  # noqa: PLC0415 (heavy import after parsing)

    set_threads(args)
    cases = load_dataset(args.dataset, args.format)  # bad data fails before the model loads
    batched = args.method in ("memit", "alphaedit")
    if args.layers is not None and not batched:
        raise InputError(f"--layers is for memit and alphaedit; {args.method} takes --layer")
    if args.layer is not None and batched:
        raise InputError(f"{args.method} edits several layers: give --layers, not --layer")
    if args.checkpoints is not None and not args.sequential:
        raise InputError("--checkpoints needs --sequential")
    if args.checkpoint_sample is not None and not args.sequential:
        raise InputError("--checkpoint-sample needs --sequential")
    model = arguments.load(args.model, args.backend)
    options = {}
    if args.layer is not None and args.method != "none":
        options["layer"] = args.layer
    if args.layers is not None:
        options["layers"] = tuple(args.layers)
    summary = evaluate(model, cases, args.method, args.out, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, seed=args.seed,
                       method_options=options, progress=True, batch_size=args.batch_size,
                       sequential=args.sequential, checkpoints=args.checkpoints,
                       original_dir=args.original_dir,
                       checkpoint_sample=args.checkpoint_sample,
                       answer_tokens=args.answer_tokens,
                       perplexity_chunks=args.perplexity_chunks)
    where = " on the final model" if summary.get("sequential") else ""
    print(f"{args.method} on {summary['n']} {args.format} cases{where} "
          f"({args.out}/summary.json):")
    protocols = summary.get("protocol", {})
    for key, value in summary.items():
        if isinstance(value, (list, dict, str)):
            continue
        shown = "n/a" if value is None else (
            f"{value:.2f}" if isinstance(value, float) else f"{value}")
        protocol = protocols.get(key, "")
        print(f"  {key:34} {shown:>9}  {protocol}".rstrip())
    norms = summary["update_norms"]
    if norms and all(n is not None for n in norms):
        print(f"  {'update norm per batch':24} mean {sum(norms) / len(norms):.3f}, "
              f"max {max(norms):.3f} ({len(norms)} batches)")
    if summary.get("sequential"):
        after = summary.get("right_after") or {}
        if after.get("efficacy_score") is not None:
            print(f"  right after each edit: efficacy {_shown(after['efficacy_score'])} "
                  f"(teacher-forced), {_shown(after.get('generated_efficacy'))} (generated); "
                  f"paraphrase {_shown(after['paraphrase_score'])} / "
                  f"{_shown(after.get('generated_paraphrase'))}")
        print(f"\n  {'edits':>6} {'cases':>6} {'score':>7} {'ES tf':>6} {'ES gen':>7} "
              f"{'PS tf':>6} {'PS gen':>7} {'NS tf':>6} {'NS gen':>7} {'NS+':>6} "
              f"{'fluency':>8} {'perplexity':>11} {'norm':>8}")
        for point in summary["checkpoints"]:
            e = point["edited"]
            print(f"  {point['n_edits']:>6} {point['measured']:>6} {_shown(e['score']):>7} "
                  f"{_shown(e.get('efficacy_score', e.get('efficacy'))):>6} "
                  f"{_shown(e.get('generated_efficacy')):>7} "
                  f"{_shown(e.get('paraphrase_score', e.get('paraphrase'))):>6} "
                  f"{_shown(e.get('generated_paraphrase')):>7} "
                  f"{_shown(e.get('neighborhood_score', e.get('specificity'))):>6} "
                  f"{_shown(e.get('generated_neighborhood')):>7} "
                  f"{_shown(e.get('neighborhood_plus_score')):>6} "
                  f"{_shown(e.get('fluency')):>8} {_shown(point.get('perplexity'), 2):>11} "
                  f"{_shown(point.get('update_norm'), 2):>8}")
        print(f"  (unedited perplexity {_shown(summary.get('perplexity_unedited'), 2)}; tf: "
              f"teacher-forced, gen: generated (greedy); NS+: CounterFact+)")
    return 0


def _shown(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
