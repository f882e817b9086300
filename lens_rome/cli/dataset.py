"""``lens-rome trace-dataset``: causal traces averaged over a facts file (the paper's Figures 2, 3).

    lens-rome trace-dataset --facts ../shared/data/known_facts.json --out known_smollm2

Each traced fact is written to ``DIR/facts/<known_id>.parquet`` as soon as it is
done; running the same command again resumes a stopped run.  At the end the
command writes ``DIR/averages.csv`` (average indirect effect per kind, token
category and layer with 95% bootstrap intervals), ``DIR/figure2_effects.png``,
``DIR/figure3_severed.png`` and ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lens_rome.cli import arguments
from lens_rome.cli.arguments import (
    add_model_option,
    add_threads_option,
    command,
    noise_level,
    positive_int,
    set_threads,
)
from lens_rome.errors import InputError
from lens_rome.storage import replacing

FIGURES = {"effects": "figure2_effects.png", "severed": "figure3_severed.png"}


def add_trace_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``trace-dataset`` command to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "trace-dataset",
        help="causal traces of every fact the model knows, averaged (the paper's Figures 2, 3)",
        description="Trace each fact of a known-facts file that the model answers correctly "
                    "(hidden, mlp and attn states, plus the severed experiment), write each to "
                    "DIR/facts/ as it finishes (rerun to resume), then average the indirect "
                    "effects by token category and layer with 95%% bootstrap intervals and draw "
                    "the paper's Figures 2 and 3.",
        epilog="example: lens-rome trace-dataset --facts ../shared/data/known_facts.json "
               "--out known_smollm2",
    )
    parser.add_argument("--facts", required=True, metavar="FILE",
                        help="known facts JSON (the paper's known_1000.json format)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the run's folder; the same folder resumes a stopped run")
    parser.add_argument("--kinds", default="hidden,mlp,attn",
                        help="comma-separated states to trace (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="trace only the first N correctly answered facts")
    parser.add_argument("--all-facts", action="store_true",
                        help="trace every fact, not only those the model answers correctly "
                             "(the paper's filter); each is scored on the model's own answer")
    add_model_option(parser)
    parser.add_argument("--samples", type=positive_int, default=10, metavar="N",
                        help="noise draws per fact (default: %(default)s, as in the paper)")
    parser.add_argument("--window", type=positive_int, default=10, metavar="W",
                        help="window of mlp/attn restorations (default: %(default)s)")
    parser.add_argument("--noise-scale", type=noise_level, default=3.0, metavar="K",
                        help="noise std in units of the std of the facts' subject-token "
                             "embeddings (default: %(default)s, the paper's 's3')")
    parser.add_argument("--no-severed", action="store_true",
                        help="skip the severed experiment (Figure 3)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--bf16", action="store_const", const=True, default=False,
                        help="restored passes in bfloat16: about 1.8x faster on CPUs with bf16 "
                             "units, far slower on CPUs without (a warning says so); scores "
                             "differ from float32 by up to ~0.03. Default: float32, exact")
    parser.add_argument("--auto-precision", dest="bf16", action="store_const", const="auto",
                        help="bfloat16 if this machine runs it faster than float32, else float32")
    add_threads_option(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="trace on N Ray worker processes of a local Ray runtime")
    where.add_argument("--address", default=None, metavar="ADDR",
                       help="join the Ray cluster at ADDR (e.g. 'auto' or 'host:6379')")
    parser.add_argument("--method", choices=("exact", "attribution"), default="exact",
                        help="exact: restore each state (the paper's); attribution: estimate "
                             "each fact's traces from one forward and one backward pass "
                             "(attribution patching of the probability; implies --no-severed) "
                             "(default: %(default)s)")
    parser.add_argument("--boot", type=positive_int, default=1000, metavar="B",
                        help="bootstrap resamples for the 95%% intervals (default: %(default)s)")
    parser.set_defaults(run=run_trace_dataset)
    return parser


@command
def run_trace_dataset(args: argparse.Namespace) -> int:
    """Run ``lens-rome trace-dataset``; returns the exit status (2 for bad input)."""
    from lens_rome.data.known_facts import load_known_facts  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.model.precision import precision_name, resolve_bf16  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.tracing.dataset import _check_kinds, trace_dataset  # noqa: PLC0415 (heavy import after parsing)

    set_threads(args)
    kinds = _check_kinds(args.kinds)
    severed = not args.no_severed and args.method == "exact"  # attribution: plain traces only
    if args.method == "attribution":
        if args.bf16 is True:
            raise InputError("--bf16 applies to --method exact; attribution runs in float32")
        args.bf16 = False  # --auto-precision: attribution has one precision, float32
    facts = load_known_facts(args.facts)  # bad files fail before the model loads
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    started = time.perf_counter()
    model = args.model if (args.workers or args.address) else arguments.load(args.model,
                                                                             args.backend)
    precision = precision_name(resolve_bf16(args.bf16, what="trace-dataset"))
    print(f"model {args.model}; {len(facts)} facts in {args.facts}; kinds {', '.join(kinds)}"
          f"{' + severed' if severed else ''}; method {args.method}; {precision}; out {out}")
    result = trace_dataset(
        model, facts, out, kinds, limit=args.limit, only_correct=not args.all_facts,
        samples=args.samples, window=args.window,
        noise_scale=args.noise_scale, severed=severed, seed=args.seed,
        bf16=args.bf16, workers=args.workers, address=args.address, method=args.method,
        backend=args.backend,
    )
    elapsed = time.perf_counter() - started
    report = result.report
    print(f"{report['answered_correctly']} of {report['facts']} facts answered correctly "
          f"({report['facts'] - report['answered_correctly']} skipped); "
          f"{report['selected']} selected, {report['traced_this_run']} traced this run, "
          f"{result.n_facts} in {out}")
    print(f"time: {elapsed:.1f} s ({elapsed / 60:.1f} min) for this run")
    write_outputs(result, out, n_boot=args.boot)
    return 0


def write_outputs(result, out: Path, *, n_boot: int = 1000) -> None:
    """Averages (CSV), figures (PNG) and summary.json of a finished dataset trace, printed too."""
    averages = result.to_frame(n_boot=n_boot)
    with replacing(out / "averages.csv", overwrite=True) as tmp:
        averages.to_csv(tmp, index=False)
    te = result.total_effect()
    print(f"average over {te['n_facts']} facts: clean p {te['clean']:.4f}, corrupted "
          f"{te['corrupted']:.4f}, total effect (ATE) {te['total_effect']:.4f}")
    peaks = {}
    for kind in result.kinds:
        rows = averages[(averages["kind"] == kind) & (averages["sever"] == "none")]
        lines = []
        for category in ("last subject token", "last token"):
            best = rows[rows["category"] == category].sort_values("aie").iloc[-1]
            lines.append(f"{category} layer {int(best['layer'])} AIE {best['aie']:.4f} "
                         f"[{best['low']:.4f}, {best['high']:.4f}]")
            peaks[f"{kind}/{category}"] = {k: (float(best[k]) if k != "layer" else int(best[k]))
                                           for k in ("layer", "aie", "low", "high")}
        print(f"  {kind:>6} peak: " + "; ".join(lines))
    figures = {"effects": result.plot_effects(n_boot=n_boot)}
    if (result.frame["sever"] != "none").any():
        figures["severed"] = result.plot_severed(n_boot=n_boot)
    for name, figure in figures.items():
        path = out / FIGURES[name]
        with replacing(path, overwrite=True) as tmp:
            figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        print(f"wrote {path}")
    summary = {**result.report, "settings": result.settings, **te, "peaks": peaks}
    with replacing(out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'averages.csv'}, {out / 'summary.json'}")
