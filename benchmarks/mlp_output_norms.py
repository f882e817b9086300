"""How large ROME's change is where it is written, on a model whose MLP output is normalised.

Gemma 2 and 3 add ``norm(W_out k)`` to the residual stream (a post-feedforward
RMSNorm), so ``W_out``'s output and what the residual stream gets differ in
scale.  For one edit this prints, at the subject's last token of the edited
layer, the norm of ``W_out k`` (before the norm) and of the MLP's output
(``hook_mlp_out``, after it) for the edited subject and two others, the norm of
the edit's ``delta = v* - W_out k0``, the same norms once the edit is applied, and
each key's share of the update, ``(C^-1 k*) . k / (C^-1 k*) . k0`` (the rank-one
update adds that share of ``delta`` to ``W_out k``).  A ``delta`` much larger than ``W_out k`` moves every subject's MLP
output, not only the edited one's (docs/editing.md, "Models that normalise their
MLP's output").

Run: ``.venv/bin/python benchmarks/mlp_output_norms.py`` (Gemma-3-270M, layer 7,
"Mawson Glacier" -> " Asia"; about a minute once the key statistics are cached).
"""

from __future__ import annotations

import argparse

import torch


def norms(model, layer: int, text: str) -> tuple[float, float, torch.Tensor]:
    """``|W_out k|`` and ``|MLP output|`` at the last token of ``text``, and the key ``k``."""
    from lens_rome import adapter_for

    adapter = adapter_for(model)
    names = (adapter.hook_name("mlp", layer), adapter.hook_name("key", layer))
    _, cache = model.run_with_cache(text, names_filter=names.__contains__)
    key = cache[names[1]][0, -1]
    with torch.no_grad():
        value = adapter.mlp_value(layer, key)
    return float(value.norm()), float(cache[names[0]][0, -1].norm()), key.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layer", type=int, default=7)
    parser.add_argument("--prompt", default="{} is located in the continent of")
    parser.add_argument("--subject", default="Mawson Glacier")
    parser.add_argument("--target", default=" Asia")
    parser.add_argument("--others", nargs="+", default=["Debenham Glacier", "Eiffel Tower"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lens_rome import load_model
    from lens_rome.editing import key_statistics, rome

    model = load_model(args.model)
    stats = key_statistics(model, args.layer, progress=False)
    subjects = [args.subject, *args.others]
    print(f"{args.model}, layer {args.layer}, {args.subject!r} -> {args.target!r}; norms at "
          f"the subject's last token: |W_out k| (before the post-MLP norm), |MLP output| (after)")
    before = {s: norms(model, args.layer, s) for s in subjects}
    request = {"prompt": args.prompt, "subject": args.subject, "target_new": args.target}
    with rome.edited(model, request, stats=stats, layer=args.layer) as change:
        after = {s: norms(model, args.layer, s) for s in subjects}
        delta = change.info["v_history"][-1]["delta_norm"]
        left = change.left.double()  # the unit direction of C^-1 k*
    print(f"delta = v* - W_out k0: norm {delta:.2f}; share: what the update adds to W_out k "
          f"for each key, as a share of what it adds for the edited subject's")
    edited = float(left @ before[args.subject][2])
    for s in subjects:
        (value, out, key), (value2, out2, _) = before[s], after[s]
        print(f"  {s:24} |W_out k| {value:8.2f} -> {value2:8.2f}   |MLP output| {out:9.2f} -> "
              f"{out2:9.2f}   share {float(left @ key) / edited:6.3f}")


if __name__ == "__main__":
    main()
