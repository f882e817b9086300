"""Seconds per causal trace on the embedded SmolLM2 (``--model``), against the paper's algorithm.

Prints, for each kind (hidden, mlp, attn) on "The Eiffel Tower is located in
the city of" (subject "The Eiffel Tower", 10 samples, window 10):

- lens_rome's ``trace`` in float32 (the exact path; lean blocks on this model);
- the paper's algorithm (one restoration per forward pass, batch = clean row +
  10 corrupted rows; :mod:`lens_rome.reference`) with the same noise, on the same
  model, and its largest deviation from ``trace``;
- ``trace`` in bfloat16 and its largest deviation from float32, only where
  :func:`lens_rome.model.precision.bf16_is_fast` says bf16 is fast here (or with
  ``--bf16``: on a CPU without bf16 units that takes hours);
- with ``--default-layout``, the reference again on TransformerLens' default
  weight layout (what a plain ``HookedTransformer`` runs).

``--backend bridge`` times ``trace`` on a ``TransformerBridge`` instead, and
the paper's algorithm runs on the plain Hugging Face model
(:func:`lens_rome.reference.trace.reference_trace_hf`: PyTorch hooks, no
TransformerLens); ``--backend both`` times both backends side by side, kind by
kind, with that one Hugging Face reference and their deviation from each other.

It prints the CPU, the torch threads and the bfloat16 probe's answer first.
Run: ``.venv/bin/python benchmarks/trace_speed.py --threads 2`` (about 10
minutes on a 2-core CPU).  Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_rome import load_model, locate_subject, trace
from lens_rome.model.backend import DEFAULT_BACKEND, TRANSFORMER_LENS_VERSION
from lens_rome.model.loading import load_hf_model
from lens_rome.model.precision import probe_report
from lens_rome.reference import reference_trace
from lens_rome.reference.trace import reference_trace_hf
from lens_rome.tracing import Gaussian

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
KINDS = ("hidden", "mlp", "attn")


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--default-layout", action="store_true",
                        help="also time the reference on TransformerLens' default weight layout")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="time bfloat16 traces too (default: only where bf16 is fast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; use 1 when another job "
                             "shares the CPU, where spinning threads slow each other down)")
    parser.add_argument("--backend", choices=("hooked", "bridge", "both"), default=DEFAULT_BACKEND)
    parser.add_argument("--model", default="smollm2-135m",
                        help="an embedded model (gemma-3-270m: the bridge runs whole passes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    if args.backend != "hooked":
        bridge_main(args, kinds)
        return

    probe = probe_report()
    with_bf16 = probe["bf16_fast"] if args.bf16 is None else args.bf16
    model = load_model(args.model)
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    subject_tokens = tokens[0, subject_range[0]:subject_range[1]]
    noise = Gaussian().draw(model, subject_tokens, args.samples,
                            torch.Generator().manual_seed(0)).values
    print(f"machine: {probe['cpu']}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__} ({probe['cpu_capability']})")
    print(f"bfloat16 probe: {'fast' if probe['bf16_fast'] else 'slow'} ({probe['rule']}); "
          f"bf16 traces {'timed' if with_bf16 else 'skipped'}")
    print(f"prompt {PROMPT!r}, subject {SUBJECT!r}: {tokens.shape[1]} tokens, "
          f"{model.cfg.n_layers} layers, {args.samples} samples, window 10\n")
    trace(model, PROMPT, SUBJECT, "hidden", samples=2)  # warm-up

    rows = []
    for kind in kinds:
        fast, seconds = timed(trace, model, PROMPT, SUBJECT, kind, samples=args.samples,
                              noise=noise)
        answer = fast.answer_token
        row = {"kind": kind, "trace": seconds}
        print(f"{kind:>6}: trace (float32, {fast.meta['blocks']}) {seconds:6.1f} s   "
              f"p clean {fast.high_score:.3f}, corrupted {fast.low_score:.3f}", flush=True)
        if with_bf16:
            half, row["bf16"] = timed(trace, model, PROMPT, SUBJECT, kind, samples=args.samples,
                                      noise=noise, bf16=True)
            row["bf16_dev"] = (half.scores - fast.scores).abs().max().item()
            print(f"{'':>6}  trace (bfloat16) {row['bf16']:6.1f} s "
                  f"(max |bf16 - fp32| = {row['bf16_dev']:.4f})", flush=True)
        if not args.skip_reference:
            (expected, _), ref_seconds = timed(reference_trace, model, tokens, subject_range,
                                               fast.answer_token, noise, kind, 10)
            row["reference"] = ref_seconds
            row["ref_dev"] = (expected - fast.scores).abs().max().item()
            print(f"{'':>6}  paper's algorithm, same model: {ref_seconds:6.1f} s "
                  f"(max |reference - trace| = {row['ref_dev']:.1e}), "
                  f"ratio {ref_seconds / seconds:.1f}x", flush=True)
        rows.append(row)

    if not args.skip_reference and args.default_layout:
        plain = load_model(args.model, linear_layout=False)
        for row in rows:
            (_, _), seconds = timed(reference_trace, plain, tokens, subject_range,
                                    answer, noise, row["kind"], 10)
            row["reference_default"] = seconds
            print(f"{row['kind']:>6}: paper's algorithm, TransformerLens default layout: "
                  f"{seconds:6.1f} s", flush=True)

    total = {key: sum(row[key] for row in rows) for key in rows[0] if key != "kind"}
    print(f"\nall kinds together ({', '.join(kinds)}):")
    print(f"  lens_rome trace (float32): {total['trace']:7.1f} s")
    if "bf16" in total:
        print(f"  lens_rome trace (bfloat16): {total['bf16']:7.1f} s   "
              f"max |bf16 - fp32| = {max(row['bf16_dev'] for row in rows):.4f}")
    if "reference" in total:
        print(f"  paper's algorithm, same model: {total['reference']:7.1f} s   "
              f"ratio {total['reference'] / total['trace']:.1f}x, "
              f"max |reference - trace| = {max(row['ref_dev'] for row in rows):.1e}")
    if "reference_default" in total:
        print(f"  paper's algorithm, TransformerLens layout: {total['reference_default']:7.1f} s"
              f"   ratio {total['reference_default'] / total['trace']:.1f}x")


def bridge_main(args, kinds) -> None:
    """``--backend bridge`` or ``both``: the bridge (beside the hooked model), against the
    paper's algorithm on the plain Hugging Face model."""
    backends = ["hooked", "bridge"] if args.backend == "both" else ["bridge"]
    models = {backend: load_model(args.model, backend=backend) for backend in backends}
    bridge = models["bridge"]
    tokens, subject_range = locate_subject(bridge, PROMPT, SUBJECT)
    subject_tokens = tokens[0, subject_range[0]:subject_range[1]]
    noise = Gaussian().draw(bridge, subject_tokens, args.samples,
                            torch.Generator().manual_seed(0)).values
    probe = probe_report()
    print(f"machine: {probe['cpu']}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__} ({probe['cpu_capability']}); "
          f"transformer-lens {TRANSFORMER_LENS_VERSION}")
    print(f"model {args.model}; prompt {PROMPT!r}, subject {SUBJECT!r}: {tokens.shape[1]} "
          f"tokens, {bridge.cfg.n_layers} layers, {args.samples} samples, window 10, float32\n")
    for model in models.values():
        trace(model, PROMPT, SUBJECT, "hidden", samples=2)  # warm-up
    hf_model = None if args.skip_reference else load_hf_model(args.model)[0]
    totals = {key: 0.0 for key in [*backends, "reference"]}
    for kind in kinds:
        results = {}
        for backend, model in models.items():  # side by side, kind by kind
            results[backend], seconds = timed(trace, model, PROMPT, SUBJECT, kind,
                                              samples=args.samples, noise=noise)
            totals[backend] += seconds
            print(f"{kind:>6}: {backend:>6} trace ({results[backend].meta['blocks']}) "
                  f"{seconds:6.1f} s   p clean {results[backend].high_score:.4f}, "
                  f"corrupted {results[backend].low_score:.4f}", flush=True)
        if len(results) == 2:
            gap = (results["hooked"].scores - results["bridge"].scores).abs().max().item()
            print(f"{'':>6}  max |bridge - hooked| = {gap:.1e}")
        if hf_model is not None:
            (expected, _), seconds = timed(reference_trace_hf, hf_model, tokens, subject_range,
                                           results["bridge"].answer_token, noise, kind, 10)
            totals["reference"] += seconds
            deviations = ", ".join(f"{backend} {(expected - r.scores).abs().max().item():.1e}"
                                   for backend, r in results.items())
            print(f"{'':>6}  paper's algorithm on the plain HF model: {seconds:6.1f} s; "
                  f"max |reference - trace|: {deviations}", flush=True)
    print(f"\nall kinds together ({', '.join(kinds)}):")
    for backend in backends:
        print(f"  {backend} trace: {totals[backend]:7.1f} s")
    if len(backends) == 2:
        print(f"  bridge / hooked: {totals['bridge'] / totals['hooked']:.2f}x")
    if hf_model is not None:
        print(f"  paper's algorithm on the plain HF model: {totals['reference']:7.1f} s "
              f"(ratio to the bridge trace {totals['reference'] / totals['bridge']:.1f}x)")


if __name__ == "__main__":
    main()
