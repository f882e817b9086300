"""How many floating-point operations does one dataset fact cost, and what floor does that set here?

Runs what ``lens-rome trace-dataset`` runs for one fact with its default
settings (hidden, mlp and attn traces plus the two severed hidden traces at the
last subject token; 10 samples, window 10, float32) under torch's profiler,
which counts the FLOPs of the matrix products, then measures this machine's
float32 matrix-product rate (the best of a few 2048x2048 products) and prints
the time the counted FLOPs need at that rate: no exact float32 trace with
this work can be faster here.

    .venv/bin/python benchmarks/trace_flops.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """The best float32 rate (FLOP/s) of ``repeats`` ``size x size`` products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="Catalonia belongs to the continent of")
    parser.add_argument("--subject", default="Catalonia")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lens_rome import load_model, locate_subject, trace_many
    from lens_rome.tracing.dataset import TraceSettings

    model = load_model(args.model)
    settings = TraceSettings(model=args.model)
    tokens, (_, end) = locate_subject(model, args.prompt, args.subject)
    requests = [(kind, None, None) for kind in settings.kinds]
    requests += [("hidden", part, [end - 1]) for part in ("mlp", "attn")]
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"fact: {args.prompt!r} ({tokens.shape[1]} tokens), subject {args.subject!r}; "
          f"{', '.join(settings.kinds)} + severed mlp/attn; {args.samples} samples, "
          f"window {settings.window}, float32")
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        seconds = _timed(lambda: trace_many(
            model, args.prompt, args.subject, requests, samples=args.samples,
            window=settings.window))  # noise: the paper's Gaussian (FLOPs do not depend on it)
    events = [e for e in prof.key_averages() if e.flops]
    total = sum(e.flops for e in events)
    for e in sorted(events, key=lambda e: -e.flops)[:4]:
        print(f"  {e.key:<12} {e.flops / 1e9:8.1f} GFLOP")
    rate = matmul_rate()
    print(f"counted: {total / 1e12:.2f} TFLOP; traced in {seconds:.1f} s under the profiler")
    print(f"float32 matrix products here: {rate / 1e9:.0f} GFLOP/s (best 2048x2048 product)")
    print(f"floor for this fact at that rate: {total / rate:.1f} s")


if __name__ == "__main__":
    main()
