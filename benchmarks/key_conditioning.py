"""How many keys do ROME's statistics need?  Conditioning of ``C`` and the edit it gives.

For a range of corpus sizes (chunks of 128 tokens of the embedded Wikipedia
sample, so ``128 x chunks`` keys), this computes the key statistics ``C`` of
one layer of the embedded SmolLM2 and prints:

- the keys per dimension of a key (``d_mlp`` = 1536), and what
  :func:`lens_rome.editing.statistics.check_conditioning` does with such a ``C``
  (refuse, warn, accept);
- ``C``'s condition number (largest over smallest eigenvalue);
- one ordinary ROME edit ("The Eiffel Tower" -> " Rome") made with that ``C``:
  its update norm and the cosine of its ``W_out`` change with the change made
  with the reference statistics (the default, 2000 chunks).  The v* loop does not
  depend on ``C``, so the differences come from ``C`` alone;
- how much that change moves the layer's output on ordinary text: the RMS of
  ``|k^T dW|`` over the corpus keys (their second moment is the reference ``C``,
  whose sample includes the smaller ones).

Below ``d_mlp`` keys ``C`` is singular; there the edit is made with the
regulariser the error suggests (``stats_ridge=0.1``), and, for comparison, the
same regulariser is shown at a healthy size.  float32 v* loop (``bf16=False``).

Run: ``.venv/bin/python benchmarks/key_conditioning.py --threads 2`` (about five
minutes on a 2-core CPU; the 2000-chunk reference is cached by the first run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging

import torch

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome", "target_true": " Paris"}
CHUNKS = (8, 12, 16, 32, 64, 120, 200, 500)
RIDGE = 0.1


class Warned(logging.Handler):
    """Notes whether lens_rome warned that the statistics come from few keys."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record):
        self.seen = self.seen or "keys" in record.getMessage()


def condition(second_moment: torch.Tensor) -> float:
    values = torch.linalg.eigvalsh(second_moment)
    return float(values[-1] / values[0]) if values[0] > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=None, help="default: ROME's layer")
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("lens_rome").setLevel(logging.WARNING)  # seen by Warned, not printed

    from lens_rome import load_model
    from lens_rome.editing import rome
    from lens_rome.editing.hparams import RomeHyperParams
    from lens_rome.editing.statistics import (
        DEFAULT_SAMPLES,
        FEW_KEYS_PER_DIM,
        MAX_CONDITION,
        key_statistics,
    )
    from lens_rome.errors import InputError
    from lens_rome.model.precision import cpu_name

    with contextlib.redirect_stdout(io.StringIO()):
        model = load_model("smollm2-135m")
    hp = RomeHyperParams.for_model(model).replace(bf16=False)
    if args.layer is not None:
        hp = hp.replace(layer=args.layer)
    reference = key_statistics(model, hp.layer, samples=DEFAULT_SAMPLES, progress=False)
    base = rome.edit(model, REQUEST, hparams=hp, stats=reference)
    base.revert()
    base_delta = base.weight_delta().flatten().double()
    keys_c = reference.second_moment

    def disturbance(edit) -> float:
        """RMS over the corpus' keys k of |k^T dW| (dW = left right^T, |left| = 1):
        how much the edit moves the layer's output on ordinary text."""
        left = edit.left.double()
        return float((left @ keys_c @ left).sqrt() * edit.right.double().norm())
    d_mlp = reference.second_moment.shape[0]
    print(f"smollm2-135m layer {hp.layer}, d_mlp {d_mlp}; CPU {cpu_name()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"rules: refused below {d_mlp} keys (singular); warned below {FEW_KEYS_PER_DIM} x "
          f"{d_mlp} = {FEW_KEYS_PER_DIM * d_mlp}; refused above condition {MAX_CONDITION:.0e}\n")
    print("| chunks | keys | keys / dim | check | condition of C | edit with | update norm "
          "| cosine with reference | RMS output change on corpus keys |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(chunks, stats, ridge=0.0):
        """One edit with ``stats``; the check's verdict is what the library did."""
        with_hp = hp.replace(stats_ridge=ridge) if ridge else hp
        what = f"C + {ridge} x mean eig x I" if ridge else "C"
        start = f"| {chunks} | {stats.count} | {stats.count / d_mlp:.1f} |"
        warned = Warned()
        logging.getLogger("lens_rome").addHandler(warned)
        logging.getLogger("lens_rome").propagate = False
        try:
            done = rome.edit(model, REQUEST, hparams=with_hp, stats=stats)
        except InputError as error:
            reason = "too few keys" if "fewer than" in str(error) else "ill-conditioned"
            print(f"{start} refused ({reason}) | {condition(stats.second_moment):.3g} | {what} "
                  f"| | | |", flush=True)
            return
        finally:
            logging.getLogger("lens_rome").removeHandler(warned)
            logging.getLogger("lens_rome").propagate = True
        done.revert()
        delta = done.weight_delta().flatten().double()
        cosine = float(delta @ base_delta / (delta.norm() * base_delta.norm()))
        verdict = "warned" if warned.seen else "accepted"
        print(f"{start} {verdict} | {condition(stats.second_moment):.3g} | {what} | "
              f"{done.update_norm():.2f} | {cosine:.4f} | {disturbance(done):.3f} |", flush=True)

    for chunks in sorted(args.chunks):
        stats = key_statistics(model, hp.layer, samples=chunks, use_cache=False, progress=False)
        row(chunks, stats)
        if stats.count < 4 * d_mlp:
            row(chunks, stats, ridge=RIDGE)
    row(DEFAULT_SAMPLES, reference)
    row(DEFAULT_SAMPLES, reference, ridge=RIDGE)

if __name__ == "__main__":
    main()
