"""Dataset tracing on Ray: two workers against one, on the same facts.

Runs :func:`lens_rome.trace_dataset` twice over the first
``--limit`` facts of the known-facts file that the model answers correctly,
once with one Ray worker and once with two (each a process with one torch
thread, on a local Ray runtime started for the run), into fresh folders, and
prints both wall times (Ray start-up and model loading included), the
speed-up, and the largest difference between the two runs' scores.

Run: ``.venv/bin/python benchmarks/ray_speedup.py --limit 8``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOWN_FACTS = ROOT.parent / "shared" / "data" / "known_facts.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", default=str(KNOWN_FACTS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=8, help="facts traced (default: %(default)s)")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="restored passes in bfloat16 (default: where this CPU runs it "
                             "faster, else float32)")
    args = parser.parse_args()
    if not Path(args.facts).exists():
        sys.exit(f"error: {args.facts} is absent (is the shared data folder beside the project?)")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import numpy as np

    from lens_rome import trace_dataset
    from lens_rome.model.precision import precision_name, probe_report, resolve_bf16

    bf16 = resolve_bf16(args.bf16, what="benchmarks/ray_speedup.py")
    probe = probe_report()
    print(f"CPU {probe['cpu']}; bfloat16 probe: {'fast' if probe['bf16_fast'] else 'slow'} "
          f"({probe['rule']})")

    print(f"model {args.model}; first {args.limit} correctly answered facts of {args.facts}; "
          f"kinds {args.kinds} + severed; {args.samples} samples; "
          f"{precision_name(bf16)}; 1 torch thread per worker")
    seconds, frames = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for workers in (1, 2):
            start = time.perf_counter()
            result = trace_dataset(args.model, args.facts, Path(folder) / f"w{workers}",
                                   args.kinds, limit=args.limit, samples=args.samples,
                                   bf16=bf16, workers=workers, progress=False)
            seconds[workers] = time.perf_counter() - start
            frames[workers] = result.frame.sort_values(
                ["known_id", "kind", "sever", "token", "layer"]).reset_index(drop=True)
            print(f"{workers} Ray worker{'s' if workers > 1 else ''}: {result.n_facts} facts in "
                  f"{seconds[workers]:.1f} s", flush=True)
    deviation = float(np.abs(frames[1]["score"].to_numpy() - frames[2]["score"].to_numpy()).max())
    print(f"speed-up with 2 workers: {seconds[1] / seconds[2]:.2f}x; "
          f"largest score difference between the runs: {deviation:.1e}")


if __name__ == "__main__":
    main()
