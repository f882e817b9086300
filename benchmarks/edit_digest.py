"""Bit-level fingerprint of one ordinary ROME edit on an embedded model (SmolLM2 by default).

Prints sha256 digests of the key statistics ``C``, of the update's two
vectors and of ``W_out`` after the edit and after its revert.  Run it on two
commits and compare the lines: equal digests mean the two commits compute the
same bits (a check that adds no arithmetic, such as a finite test, must leave
them unchanged).  float32 throughout (``bf16=False``), so the result does not
depend on whether the CPU has bfloat16 units.

Run: ``.venv/bin/python benchmarks/edit_digest.py`` (about a minute on a
2-core CPU: 200 chunks of statistics, not cached, and one edit); ``--model
gemma-3-270m`` for Gemma, whose ROME passes ``v*`` through the post-MLP norm.
"""

from __future__ import annotations

import argparse
import hashlib

import torch

REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
           "target_new": " Rome", "target_true": " Paris"}


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, with its dtype and shape (first 16 hex digits)."""
    tensor = tensor.detach().cpu().contiguous()
    head = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(head + tensor.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="chunks of key statistics")
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    from lens_rome import adapter_for, load_model
    from lens_rome.editing import rome
    from lens_rome.editing.hparams import RomeHyperParams
    from lens_rome.editing.statistics import key_statistics

    model = load_model(args.model)
    hp = RomeHyperParams.for_model(model).replace(bf16=False)
    stats = key_statistics(model, hp.layer, samples=args.samples, use_cache=False,
                           progress=False)
    w_out = adapter_for(model).w_out(hp.layer)
    before = digest(w_out)
    done = rome.edit(model, REQUEST, hparams=hp, stats=stats)
    after = digest(adapter_for(model).w_out(hp.layer))
    done.revert()
    reverted = digest(adapter_for(model).w_out(hp.layer))
    print(f"{args.model}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"layer {hp.layer}")
    print(f"C          {digest(stats.second_moment)}  ({stats.count} keys)")
    print(f"left       {digest(done.left)}")
    print(f"right      {digest(done.right)}")
    print(f"update     {done.update_norm():.9f}")
    print(f"W_out      before {before}  edited {after}  reverted {reverted}")
    print(f"revert restores W_out bit for bit: {reverted == before}")


if __name__ == "__main__":
    main()
