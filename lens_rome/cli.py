"""The ``lens-rome`` command line.

``lens-rome trace`` runs a causal trace of one fact and writes, per kind of
state, a paper-style heatmap (PNG), an offline circuitsvis view (HTML) and the
result itself (JSON, reloadable with ``TraceResult.load``)::

    lens-rome trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --kind all --out eiffel

``--method attribution`` estimates the same grids from one forward and one
backward pass (attribution patching, :mod:`lens_rome.attribution`) and writes
``attribution_<kind>.*``; ``--verify K`` then restores its top K sites exactly
and prints both side by side.  ``--kind head`` traces single attention heads.

It never replaces an existing file unless ``--overwrite`` is given, and it
checks that before any tracing starts.  Errors in the input (a subject that is
not in the prompt, an unknown model, ...) print ``error: ...`` and exit with
status 2.

Library code never prints; this module is where results meet the terminal.
The functions :func:`trace_paths`, :func:`check_free`, :func:`write_trace` and
:func:`report` are shared with ``python -m lens_rome.demo``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch

from lens_rome.dataset_cli import add_trace_dataset_parser
from lens_rome.edit_cli import add_edit_parser
from lens_rome.errors import USER_ERRORS
from lens_rome.evaluate_cli import add_evaluate_parser
from lens_rome.models import DEFAULT_MODEL, EMBEDDED_MODELS
from lens_rome.tracing import HEAD, KINDS, TraceResult

log = logging.getLogger(__name__)

DEFAULT_OUT = "lens_rome_out"
METHODS = ("exact", "attribution")
METRICS = ("prob", "logprob", "logit_diff")
PNG_DPI = 150
EXTENSIONS = ("png", "html", "json")


class CommandError(Exception):
    """A problem with the command's input, reported as ``error: ...`` with status 2."""


# --------------------------------------------------------------------------- output files


def trace_stem(kind: str, sever: str | None = None, method: str = "exact") -> str:
    """The file name stem of a trace: ``trace_hidden``, ``trace_hidden_sever_mlp``, or
    ``attribution_hidden`` for an attribution estimate."""
    prefix = "trace" if method == "exact" else method
    return f"{prefix}_{kind}" if sever is None else f"{prefix}_{kind}_sever_{sever}"


def trace_paths(out: str | Path, kind: str, sever: str | None = None,
                method: str = "exact") -> dict[str, Path]:
    """The files a trace of ``kind`` is written to: ``{"png": ..., "html": ..., "json": ...}``."""
    stem = trace_stem(kind, sever, method)
    return {ext: Path(out) / f"{stem}.{ext}" for ext in EXTENSIONS}


def verify_path(out: str | Path, kind: str) -> Path:
    """Where ``--verify`` writes the exact restorations of an estimate's top sites."""
    return Path(out) / f"attribution_{kind}_verify.json"


def check_free(paths: Sequence[Path]) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that already exists."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; pass --overwrite to replace it (or choose another --out)"
            )


def write_trace(
    result: TraceResult, out: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``result``'s heatmap (PNG), view (HTML) and data (JSON) under ``out``.

    Returns the paths written, keyed by extension.  Without ``overwrite`` an
    existing file raises ``FileExistsError`` and nothing is replaced.
    """
    paths = trace_paths(out, result.kind, result.sever, result.method)
    if not overwrite:
        check_free(paths.values())
    Path(out).mkdir(parents=True, exist_ok=True)

    figure = result.plot()
    png = paths["png"]
    tmp = png.with_name(f".{png.name}.tmp")  # written whole, then renamed: no half PNGs
    figure.savefig(tmp, format="png", dpi=PNG_DPI, bbox_inches="tight")
    tmp.replace(png)

    result.show().save(paths["html"], overwrite=overwrite)
    result.save(paths["json"], overwrite=overwrite)
    return paths


def format_score(result, value: float) -> str:
    return f"{value:.4f}" if result.metric == "prob" else f"{value:.3f}"


def _where(result: TraceResult, position: int) -> str:
    start, end = result.subject_range
    return ("last subject token" if position == end - 1 else
            "subject token" if start <= position < end else
            "last token" if position == len(result.tokens) - 1 else "token")


def _site(layer: int, head: int | None) -> str:
    return f"layer {layer:>3}" if head is None else f"layer {layer:>3} head {head:>2}"


def report(result: TraceResult, paths: dict[str, Path] | None = None, *, n_sites: int = 3,
           indent: str = "") -> str:
    """A few lines on a trace: answer, clean and corrupted scores, top sites, files."""
    label = {"prob": "p", "logprob": "log p", "logit_diff": "logit diff"}[result.metric]
    title = result.kind if result.sever is None else f"{result.kind} (severed {result.sever})"
    if result.kind in ("mlp", "attn"):
        title += f", window {result.window}"
    if result.method == "attribution":
        fixes = [name for name in ("qk_fix", "grad_drop") if result.meta.get(name)]
        title += f" [attribution estimate{', ' + ', '.join(fixes) if fixes else ''}]"
    start, end = result.subject_range
    heads = result.kind == HEAD
    lines = [
        f"{title}: {label}({result.answer!r}) clean {format_score(result, result.high_score)}, "
        f"corrupted {format_score(result, result.low_score)}, "
        f"total effect {format_score(result, result.total_effect)}",
        f"  top {n_sites} restoration sites (token, {'layer, head' if heads else 'layer'} "
        f"-> {label}):",
    ]
    for position, token, layer, *rest in result.top_sites(n_sites):
        head, score = (rest[0], rest[1]) if heads else (None, rest[0])
        lines.append(f"    {position:>3} {token!r:<14} {_site(layer, head)} -> "
                     f"{format_score(result, score)}   ({_where(result, position)})")
    # The top sites of a hidden trace are often the last token's late layers, where
    # restoring is nearly the clean run; the subject's best site is the paper's early site.
    subject_scores = result.scores[start:end]
    best = [int(i) for i in torch.unravel_index(subject_scores.argmax(), subject_scores.shape)]
    position, layer, head = start + best[0], best[1], (best[2] if heads else None)
    lines.append(f"  best site at the subject: {position:>3} {result.tokens[position]!r:<14} "
                 f"{_site(layer, head)} -> "
                 f"{format_score(result, float(subject_scores.max()))}")
    if paths:
        lines.append("  wrote " + ", ".join(str(p) for p in paths.values()))
    return "\n".join(indent + line for line in lines)


def report_verification(checked, path: Path | None = None, indent: str = "") -> str:
    """The exact restorations of an estimate's top sites next to the estimates."""
    heads = checked.kind == HEAD
    lines = [f"  exact restoration of the estimate's top {len(checked.sites)} sites "
             f"(indirect effect, {checked.metric}):",
             f"    rank {'site':<{34 if heads else 26}} estimated      exact"]
    for rank, (site, estimated, exact) in enumerate(
            zip(checked.sites, checked.estimated, checked.exact), start=1):
        where = f"{site[0]:>3} {checked.tokens[site[0]]!r:<10} " + _site(
            site[1], site[2] if heads else None)
        lines.append(f"    {rank:>4} {where:<{34 if heads else 26}} {estimated:>+9.4f} "
                     f"{exact:>+10.4f}")
    lines.append(f"  Spearman over these sites {checked.spearman:.3f}; sign agreement "
                 f"{checked.sign_agreement:.2f}")
    if path is not None:
        lines.append(f"  wrote {path}")
    return "\n".join(indent + line for line in lines)


# --------------------------------------------------------------------------- parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def noise_level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-rome",
        description="Causal tracing of factual recall on TransformerLens models "
                    "(Meng et al. 2022, 'Locating and Editing Factual Associations in GPT').",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_trace(commands)
    add_trace_dataset_parser(commands)
    add_edit_parser(commands)
    add_evaluate_parser(commands)
    _add_precision(commands)
    return parser


def _add_precision(commands) -> None:
    sub = commands.add_parser(
        "precision", help="is bfloat16 fast here? the probe's answer and each command's precision",
        description="Measure once whether bfloat16 matrix products beat float32 on this "
                    "machine, and print the precision each entry point then uses.")
    sub.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    sub.set_defaults(run=_run_precision)


def _run_precision(args: argparse.Namespace) -> int:
    from lens_rome.precision import entry_points, probe_report  # noqa: PLC0415

    probe = probe_report(args.device)
    print(f"device: {args.device} ({probe.get('cpu', probe.get('device'))}"
          + (f", torch CPU capability {probe['cpu_capability']}" if "cpu_capability" in probe
             else "") + ")")
    print(f"bfloat16 is {'fast' if probe['bf16_fast'] else 'slow'} here: {probe['rule']}")
    for name, precision in entry_points(args.device).items():
        print(f"  {precision:9} {name}")
    return 0


def _add_trace(commands) -> None:
    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    trace = commands.add_parser(
        "trace",
        help="causal trace of one fact: where does the model recall it?",
        description="Corrupt the subject's token embeddings with noise, then restore one "
                    "state at a time to its clean value and measure how much of the answer's "
                    "probability comes back.  Writes, per kind, trace_<kind>.png (heatmap), "
                    "trace_<kind>.html (offline interactive view) and trace_<kind>.json "
                    "(the result, reloadable with lens_rome.TraceResult.load).",
        epilog='example: lens-rome trace --prompt "The Eiffel Tower is located in the city of" '
               '--subject "The Eiffel Tower" --kind all --out eiffel',
    )
    trace.add_argument("--prompt", required=True,
                       help="the fact as a prompt the model completes, e.g. "
                            "'The Eiffel Tower is located in the city of'")
    trace.add_argument("--subject", required=True,
                       help="the subject, written exactly as in the prompt; its tokens get the "
                            "noise, e.g. 'The Eiffel Tower'")
    trace.add_argument("--kind", choices=[*KINDS, HEAD, "all"], default="hidden",
                       help="state restored: hidden (residual stream after each block), mlp or "
                            "attn (outputs over a window of layers), all three, or head (one "
                            "attention head's output, attn.hook_z, at one token; its heatmap "
                            "is heads x layers at the token with the largest effect) "
                            "(default: %(default)s)")
    trace.add_argument("--method", choices=METHODS, default="exact",
                       help="exact: restore each state (the paper's); attribution: estimate "
                            "every state from one forward and one backward pass (attribution "
                            "patching), files attribution_<kind>.* (default: %(default)s)")
    trace.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"an embedded model that loads offline ({embedded}) or a "
                            f"TransformerLens model name, which downloads weights "
                            f"(default: %(default)s)")
    trace.add_argument("--samples", type=positive_int, default=10, metavar="N",
                       help="noise draws averaged (default: %(default)s, as in the paper)")
    trace.add_argument("--window", type=positive_int, default=10, metavar="W",
                       help="layers restored together for mlp and attn, centred on each layer "
                            "(default: %(default)s, as in the paper)")
    corruption = trace.add_mutually_exclusive_group()
    corruption.add_argument("--noise", type=noise_level, default=None, metavar="LEVEL",
                            help="standard deviation of the Gaussian noise (default: 3 x the "
                                 "standard deviation of the model's token embeddings, the "
                                 "paper's 's3')")
    corruption.add_argument("--swap", action="append", default=None, metavar="SUBJECT",
                            help="symmetric token replacement instead of noise: put SUBJECT "
                                 "(same number of tokens) in the subject's place; repeat for "
                                 "several, one per sample (Zhang & Nanda 2023)")
    trace.add_argument("--target", default=None,
                       help="the answer to measure, with its leading space, e.g. ' Paris' "
                            "(default: the model's most likely next token on the clean prompt)")
    trace.add_argument("--metric", choices=METRICS, default=None,
                       help="prob: mean probability of the answer (the paper's); logprob: mean "
                            "log-probability; logit_diff (attribution only): the answer's logit "
                            "minus --contrast's, by default minus each sample's corrupted "
                            "answer (default: prob for exact, logprob for attribution)")
    trace.add_argument("--contrast", default=None, metavar="TOKEN",
                       help="with --metric logit_diff: the second answer, e.g. ' London'")
    trace.add_argument("--sever", choices=("mlp", "attn"), default=None,
                       help="with --kind hidden: freeze the restored token's MLP (or attention) "
                            "outputs at their corrupted values (the paper's Figure 3); files are "
                            "named trace_hidden_sever_<mlp|attn>.*")
    trace.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed of the noise draws (default: %(default)s)")
    trace.add_argument("--bf16", action="store_true",
                       help="run the restored passes in bfloat16 (faster on CPUs with bf16 units)")
    trace.add_argument("--qk-fix", action="store_true",
                       help="attribution: recompute the next attention layer's pattern exactly "
                            "instead of linearising its softmax (AtP*)")
    trace.add_argument("--grad-drop", action="store_true",
                       help="attribution: GradDrop against cancelling gradients (AtP*; one extra "
                            "backward pass per layer; magnitudes, for ranking)")
    trace.add_argument("--verify", type=positive_int, default=None, metavar="K",
                       help="attribution: restore the estimate's top K sites exactly and print "
                            "both side by side; writes attribution_<kind>_verify.json")
    trace.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help="folder for the output files (default: %(default)s)")
    trace.add_argument("--overwrite", action="store_true",
                       help="replace output files that already exist (default: refuse and exit)")
    trace.set_defaults(run=run_trace)


# --------------------------------------------------------------------------- commands


def load(name: str):
    """``load_model(name)``, without TransformerLens' printed chatter ("Moving model to ...")."""
    from lens_rome.models import load_model  # noqa: PLC0415 (slow import, after parsing)

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        model = load_model(name)
    if chatter.getvalue().strip():
        log.debug("load_model printed: %s", chatter.getvalue().strip())
    return model


def run_trace(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from lens_rome.tracing import trace  # noqa: PLC0415

    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.sever is not None and kinds != ["hidden"]:
        raise CommandError(f"--sever applies to hidden-state traces only; use --kind hidden "
                           f"(got --kind {args.kind})")
    _check_method_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder")
    if not args.overwrite:  # before any work: never trace for minutes and then refuse
        check_free([p for kind in kinds
                    for p in trace_paths(out, kind, args.sever, args.method).values()])
        if args.verify:
            check_free([verify_path(out, kind) for kind in kinds])

    model = load(args.model)
    print(f"model {args.model}; prompt {args.prompt!r}; subject {args.subject!r}")
    noise = args.noise
    if args.swap:
        from lens_rome.hooks import SubjectSwap  # noqa: PLC0415

        noise = SubjectSwap(args.swap)
    if args.method == "attribution":
        return _run_attribution(model, args, kinds, noise, out)
    metric = args.metric or "prob"
    bar = tqdm(kinds, desc="kinds", unit="kind", disable=len(kinds) == 1)
    for kind in bar:
        bar.set_postfix_str(kind)
        result = trace(
            model, args.prompt, args.subject, kind, samples=args.samples, window=args.window,
            noise=noise, sever=args.sever, target=args.target, metric=metric,
            seed=args.seed, bf16=args.bf16, progress=True,
        )
        paths = write_trace(result, out, overwrite=args.overwrite)
        tqdm.write(report(result, paths))
    bar.close()
    return 0


def _check_method_options(args: argparse.Namespace) -> None:
    """Options that belong to one method only, named before any work."""
    if args.method == "exact":
        wrong = [flag for flag, value in (("--qk-fix", args.qk_fix), ("--grad-drop", args.grad_drop),
                                          ("--verify", args.verify)) if value]
        if wrong:
            raise CommandError(f"{', '.join(wrong)} applies to --method attribution")
        if args.metric == "logit_diff":
            raise CommandError("--metric logit_diff is computed by --method attribution only; "
                               "exact traces score prob or logprob")
    else:
        if args.sever is not None:
            raise CommandError("--sever needs exact restorations; use --method exact")
        if args.bf16:
            raise CommandError("--bf16 applies to exact traces; attribution runs in float32")
    if args.contrast is not None and args.metric != "logit_diff":
        raise CommandError("--contrast is the second answer of --metric logit_diff")


def _run_attribution(model, args: argparse.Namespace, kinds: list[str], noise, out: Path) -> int:
    from lens_rome.attribution import attribute_many, verify  # noqa: PLC0415

    results = attribute_many(
        model, args.prompt, args.subject, kinds, corruption=noise, samples=args.samples,
        window=args.window, metric=args.metric or "logprob", target=args.target,
        contrast=args.contrast, seed=args.seed, qk_fix=args.qk_fix, grad_drop=args.grad_drop,
    )
    for result in results:
        paths = write_trace(result, out, overwrite=args.overwrite)
        print(report(result, paths))
        if args.verify:
            checked = verify(model, result, k=args.verify, corruption=noise,
                             by="magnitude" if args.grad_drop else "effect")
            path = checked.save(verify_path(out, result.kind), overwrite=args.overwrite)
            print(report_verification(checked, path))
    return 0


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
