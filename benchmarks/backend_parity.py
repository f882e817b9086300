"""The same three-kind trace on each backend and TransformerLens version, compared cell by cell.

A TransformerLens installation has one version, so the comparison takes two runs:

    .venv-tl4/bin/python benchmarks/backend_parity.py --save runs/parity_tl4.json
    .venv/bin/python benchmarks/backend_parity.py --compare runs/parity_tl4.json

Each run traces "The Eiffel Tower is located in the city of" (subject "The Eiffel
Tower") on the embedded SmolLM2, kinds hidden, mlp and attn, 10 samples, window
10, seed 0 (the same noise on every backend: it is drawn from the seed and the
embedding matrix, which the backends share), on every backend the installation
has.  ``--save`` writes the scores; ``--compare`` prints the largest difference
of each of this run's traces from each saved one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lens_rome import load_model, trace_all
from lens_rome.model.backend import BACKENDS, TRANSFORMER_LENS_VERSION

PROMPT, SUBJECT, KINDS = "The Eiffel Tower is located in the city of", "The Eiffel Tower", (
    "hidden", "mlp", "attn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", help="write this run's scores here (JSON)")
    parser.add_argument("--compare", help="a file written by --save, from another run")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    here = {}
    for backend in BACKENDS:
        results = trace_all(load_model("smollm2-135m", backend=backend), PROMPT, SUBJECT, KINDS,
                            samples=10, seed=0)
        label = f"{backend} (transformer-lens {TRANSFORMER_LENS_VERSION})"
        here[label] = {kind: r.scores.tolist() for kind, r in results.items()}
        print(f"{label}: p clean {results['hidden'].high_score:.4f}, corrupted "
              f"{results['hidden'].low_score:.4f}")
    runs = dict(here)
    if args.compare:
        runs.update(json.loads(Path(args.compare).read_text()))
    labels = list(runs)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if a not in here and b not in here:
                continue
            gaps = {kind: (torch.tensor(runs[a][kind]) - torch.tensor(runs[b][kind])).abs().max()
                    .item() for kind in KINDS}
            print(f"max |{a} - {b}|: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(here))
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
