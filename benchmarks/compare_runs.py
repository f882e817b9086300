"""How far apart are two dataset-trace runs of the same facts?

Reads the per-fact stores of two ``lens-rome trace-dataset`` output folders,
pairs their scores by fact, kind, severing, token and layer, and prints how
many pair up and the largest, mean and 99th-percentile absolute difference.
Used to check that a faster engine gives the same science (docs/replication.md).

Run: ``.venv/bin/python benchmarks/compare_runs.py runs/known_smollm2 runs/known_smollm2_v2``
"""

from __future__ import annotations

import argparse

from lens_rome.tracing.dataset import FactStore

KEYS = ["known_id", "kind", "sever", "token", "layer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="a trace-dataset --out folder")
    parser.add_argument("second", help="another, over the same facts")
    args = parser.parse_args()
    first, second = FactStore(args.first).read(), FactStore(args.second).read()
    paired = first.merge(second, on=KEYS, suffixes=("_first", "_second"))
    gap = (paired["score_first"] - paired["score_second"]).abs()
    print(f"{len(paired)} scores in both runs ({len(first)} in {args.first}, "
          f"{len(second)} in {args.second})")
    print(f"|score difference|: max {gap.max():.4f}, mean {gap.mean():.5f}, "
          f"99th percentile {gap.quantile(0.99):.4f}")


if __name__ == "__main__":
    main()
