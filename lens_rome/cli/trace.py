"""``lens-rome trace``: one fact, three kinds, exact or estimated.

``lens-rome trace`` runs a causal trace of one fact and writes, per kind of
state, a paper-style heatmap (PNG), an offline circuitsvis view (HTML) and the
result itself (JSON, reloadable with ``TraceResult.load``)::

    lens-rome trace --prompt "The Eiffel Tower is located in the city of" \
        --subject "The Eiffel Tower" --kind all --out eiffel

``--method attribution`` estimates the same grids from one batched forward and
backward pass (attribution patching, with ``--steps N`` integrated-gradient
points: :mod:`lens_rome.tracing.attribution`) and writes ``attribution_<kind>.*``;
``--verify K`` then restores its top K sites exactly and prints both side by
side.  ``--method hybrid`` estimates every cell and restores exactly the
``--verify K`` best of each token and the ``--verify-best M`` best of the grid
(:mod:`lens_rome.tracing.hybrid`), written as ``hybrid_<kind>.*``.  ``--kind
head`` traces single attention heads.

It never replaces an existing file unless ``--overwrite`` is given, and it
checks that before any tracing starts.  Errors in the input (a subject that is
not in the prompt, an unknown model, ...) print ``error: ...`` and exit with
status 2.

Library code never prints; this module is where results meet the terminal.
The files and the report come from :mod:`lens_rome.cli.output`, shared with the demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_rome.cli import arguments
from lens_rome.cli.arguments import (
    add_model_option,
    command,
    count,
    noise_level,
    positive_int,
)
from lens_rome.cli.paths import DEFAULT_OUT, check_free, trace_paths, verify_path
from lens_rome.errors import InputError
from lens_rome.tracing.kinds import ATTRIBUTION_METRICS, HEAD, HYBRID, KINDS, METHODS

DEFAULT_STEPS, DEFAULT_VERIFY, DEFAULT_VERIFY_BEST = 4, 0, 0.15  # the library's; a test checks


def add_trace_parser(commands) -> None:
    """Add the ``trace`` command to an ``argparse`` subparsers object."""
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
    trace.add_argument("--method", choices=(*METHODS, HYBRID), default="exact",
                       help="exact: restore each state (the paper's); attribution: estimate "
                            "every state from one batched forward and backward pass "
                            "(attribution patching, integrated gradients), files "
                            "attribution_<kind>.*; hybrid: the estimate with its best cells "
                            "restored exactly, files hybrid_<kind>.* (default: %(default)s)")
    add_model_option(trace)
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
    trace.add_argument("--metric", choices=ATTRIBUTION_METRICS, default=None,
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
    estimate = trace.add_argument_group("estimates (--method attribution or hybrid)")
    estimate.add_argument("--steps", type=positive_int, default=None, metavar="N",
                          help="integrated-gradient points between the corrupted and the clean "
                               f"run; 1 is plain attribution patching (default: {DEFAULT_STEPS})")
    estimate.add_argument("--qk-fix", action="store_true",
                          help="recompute the next attention layer's pattern exactly instead of "
                               "linearising its softmax (AtP*)")
    estimate.add_argument("--grad-drop", action="store_true",
                          help="GradDrop against cancelling gradients (AtP*; one extra backward "
                               "pass per layer; magnitudes, for ranking)")
    estimate.add_argument("--verify", type=count, default=None, metavar="K",
                          help="attribution: restore the estimate's top K sites exactly and "
                               "print both side by side, written to "
                               "attribution_<kind>_verify.json; hybrid: the cells restored "
                               f"exactly at each token (default: {DEFAULT_VERIFY})")
    estimate.add_argument("--verify-best", type=cells_or_share, default=None, metavar="M",
                          help="hybrid: also restore exactly the estimate's M best cells of the "
                               "whole grid, a count (e.g. 60) or a share of its cells (e.g. "
                               f"0.15) (default: {DEFAULT_VERIFY_BEST})")
    trace.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help="folder for the output files (default: %(default)s)")
    trace.add_argument("--overwrite", action="store_true",
                       help="replace output files that already exist (default: refuse and exit)")
    trace.set_defaults(run=run_trace)


@command
def run_trace(args: argparse.Namespace) -> int:
    """Run ``lens-rome trace``; returns the exit status (2 for bad input)."""
    from tqdm.auto import tqdm  # noqa: PLC0415 (heavy import after parsing)

    from lens_rome.cli.output import report, write_trace  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.tracing.engine import trace  # noqa: PLC0415 (heavy import after parsing)

    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    if args.sever is not None and kinds != ["hidden"]:
        raise InputError(f"--sever applies to hidden-state traces only; use --kind hidden "
                         f"(got --kind {args.kind})")
    _check_method_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if not args.overwrite:  # before any work: never trace for minutes and then refuse
        check_free([p for kind in kinds
                    for p in trace_paths(out, kind, args.sever, args.method).values()])
        if args.verify and args.method == "attribution":
            check_free([verify_path(out, kind) for kind in kinds])

    model = arguments.load(args.model, args.backend)
    print(f"model {args.model}; prompt {args.prompt!r}; subject {args.subject!r}")
    noise = args.noise
    if args.swap:
        from lens_rome.tracing.noise_rules import SubjectSwap  # noqa: PLC0415 (heavy import after parsing)

        noise = SubjectSwap(args.swap)
    if args.method == "attribution":
        return _run_attribution(model, args, kinds, noise, out)
    metric = args.metric or "prob"
    bar = tqdm(kinds, desc="kinds", unit="kind", disable=len(kinds) == 1)
    for kind in bar:
        bar.set_postfix_str(kind)
        hybrid = {} if args.method == "exact" else dict(
            method=HYBRID, verify=args.verify, verify_best=args.verify_best, steps=args.steps)
        result = trace(
            model, args.prompt, args.subject, kind, samples=args.samples, window=args.window,
            noise=noise, sever=args.sever, target=args.target, metric=metric,
            seed=args.seed, bf16=args.bf16, progress=True, **hybrid,
        )
        paths = write_trace(result, out, overwrite=args.overwrite)
        tqdm.write(report(result, paths))
    bar.close()
    return 0


def cells_or_share(text: str) -> int | float:
    """A count of cells (``60``) or a share of them (``0.15``)."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number of cells nor a "
                                         f"share such as 0.15") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0 or a share in [0, 1)")
    return value


def _check_method_options(args: argparse.Namespace) -> None:
    """Options that belong to one method only, named before any work."""
    flags = (("--qk-fix", args.qk_fix), ("--grad-drop", args.grad_drop),
             ("--verify", args.verify is not None), ("--steps", args.steps is not None),
             ("--verify-best", args.verify_best is not None))
    allowed = {"exact": (), "attribution": ("--qk-fix", "--grad-drop", "--verify", "--steps"),
               HYBRID: ("--verify", "--steps", "--verify-best")}[args.method]
    wrong = [flag for flag, given in flags if given and flag not in allowed]
    if wrong:
        raise InputError(f"{', '.join(wrong)} does not apply to --method {args.method}")
    if args.method != "attribution":
        if args.metric == "logit_diff":
            raise InputError("--metric logit_diff is computed by --method attribution only; "
                             f"{args.method} traces score prob or logprob")
    if args.method == "attribution":
        if args.sever is not None:
            raise InputError("--sever needs exact restorations; use --method exact")
        if args.bf16:
            raise InputError("--bf16 applies to exact traces; attribution runs in float32")
    if args.contrast is not None and args.metric != "logit_diff":
        raise InputError("--contrast is the second answer of --metric logit_diff")


def _run_attribution(model, args: argparse.Namespace, kinds: list[str], noise, out: Path) -> int:
    from lens_rome.cli import output  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.tracing.attribution import attribute_many  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.tracing.verify import verify  # noqa: PLC0415 (heavy import after parsing)

    results = attribute_many(
        model, args.prompt, args.subject, kinds, noise=noise, samples=args.samples,
        window=args.window, metric=args.metric or "logprob", target=args.target,
        contrast=args.contrast, seed=args.seed, steps=args.steps, qk_fix=args.qk_fix,
        grad_drop=args.grad_drop,
    )
    for result in results:
        paths = output.write_trace(result, out, overwrite=args.overwrite)
        print(output.report(result, paths))
        if args.verify:
            checked = verify(model, result, k=args.verify, noise=noise,
                             by="magnitude" if args.grad_drop else "effect")
            path = checked.save(verify_path(out, result.kind), overwrite=args.overwrite)
            print(output.report_verification(checked, path))
    return 0
