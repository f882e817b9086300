"""lens_rome's interventions are plain TransformerLens hooks: mix them with your own.

    python examples/compose_with_hooks.py      # offline; one to two minutes on a 2-core CPU

(a) Per-head restoration.  ``trace(kind="attn")`` restores whole attention
    outputs.  To ask which *head* carries the fact, corrupt the subject with
    ``tracing.corrupt`` and restore one head's clean ``hook_z`` with a five-line
    hook of our own, in the same ``model.run_with_hooks`` call.  All heads of a
    layer go in one batch: rows ``h*SAMPLES .. (h+1)*SAMPLES`` restore head ``h``.
    (``trace(..., kind="head")`` does this for every head at every token, and
    ``lens_rome.attribute(..., kind="head")`` estimates it from one backward pass;
    here the point is that a hand-written hook composes with lens_rome's.)

(b) An ablation active during a whole trace.  Hooks already on the model
    (``with model.hooks(...)``) apply to every run of ``trace``: clean,
    corrupted and restored.  Zero-ablating one MLP shows how the trace of a
    model without it differs.
"""

import torch

from lens_rome import load_model, locate_subject, trace, tracing

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"
SAMPLES = 5  # noise draws (the paper uses 10)

torch.set_grad_enabled(False)
model = load_model("smollm2-135m")
tokens, (start, end) = locate_subject(model, PROMPT, SUBJECT)
answer = model.to_single_token(ANSWER)
n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
names = model.to_str_tokens(tokens)


def p_answer(logits):
    """Mean probability of the answer at the last position, one value per group of SAMPLES rows."""
    return logits[:, -1].softmax(-1)[:, answer].view(-1, SAMPLES).mean(1)


# ----------------------------------------------------------------------------- (a) per-head

# The paper's noise rule (3 x embedding std), drawn once and reused by every run.
generator = torch.Generator().manual_seed(0)
noise = tracing.Gaussian().draw(model, tokens[0, start:end], SAMPLES, generator)
corrupt = tracing.corrupt(noise.values.repeat(n_heads, 1, 1), (start, end))  # same draws per head
batch = tokens.expand(n_heads * SAMPLES, -1)

_, clean = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_z"))
p_clean = float(p_answer(model(tokens.expand(SAMPLES, -1)))[0])
p_corrupted = float(p_answer(model.run_with_hooks(batch, fwd_hooks=[corrupt]))[0])
print(f"(a) p({ANSWER!r}): clean {p_clean:.3f}, subject corrupted {p_corrupted:.3f}")


def restore_heads(position):
    """Our own hook: in row group h, put head h's clean output back at ``position``."""

    def hook(z, hook):  # z: [batch, pos, head, d_head]
        for head in range(n_heads):
            rows = slice(head * SAMPLES, (head + 1) * SAMPLES)
            z[rows, position, head] = clean[hook.name][0, position, head]
        return z

    return hook


# The paper's two sites: the last subject token in lower layers, the last token in upper ones.
half = n_layers // 2
scans = [(end - 1, "last subject token", range(0, half)),
         (len(names) - 1, "last token", range(half, n_layers))]
for position, where, layers in scans:
    effect = {}  # (layer, head) -> restored p - corrupted p
    for layer in layers:
        user_hook = (f"blocks.{layer}.attn.hook_z", restore_heads(position))
        logits = model.run_with_hooks(batch, fwd_hooks=[corrupt, user_hook])
        for head, p in enumerate(p_answer(logits).tolist()):
            effect[layer, head] = p - p_corrupted
    best = sorted(effect, key=effect.get, reverse=True)[:4]
    heads = ", ".join(f"L{layer}H{head} {effect[layer, head]:+.3f}" for layer, head in best)
    print(f"    one head restored at the {where} {names[position]!r}, layers "
          f"{layers.start}-{layers.stop - 1}: top heads {heads}")

# ----------------------------------------------------------------------------- (b) ablation

LAYER = 2  # the MLP whose window scores highest at "iffel" in the MLP trace
zero_mlp = (f"blocks.{LAYER}.hook_mlp_out", lambda mlp_out, hook: torch.zeros_like(mlp_out))

plain = trace(model, PROMPT, SUBJECT, "hidden", samples=SAMPLES, target=ANSWER)
with model.hooks(fwd_hooks=[zero_mlp]):
    ablated = trace(model, PROMPT, SUBJECT, "hidden", samples=SAMPLES, target=ANSWER)
# The ablation was active in the clean run of the trace too:
direct = float(p_answer(model.run_with_hooks(tokens.expand(SAMPLES, -1), fwd_hooks=[zero_mlp]))[0])

print(f"\n(b) hidden-state trace, with and without MLP {LAYER} zero-ablated "
      f"(ablated clean p from a direct run: {direct:.3f})")
print(f"    {'':24}{'plain':>10}{'ablated':>10}")
for label, a, b in [("clean p", plain.high_score, ablated.high_score),
                    ("corrupted p", plain.low_score, ablated.low_score),
                    ("total effect", plain.total_effect, ablated.total_effect)]:
    print(f"    {label:24}{a:>10.3f}{b:>10.3f}")
for position in range(start, end):
    label = f"best restore at {names[position]!r}"
    a, b = plain.scores[position].max(), ablated.scores[position].max()
    print(f"    {label:24}{a:>10.3f}{b:>10.3f}   (layer {int(plain.scores[position].argmax())} "
          f"vs {int(ablated.scores[position].argmax())})")
for name, result in [("plain", plain), ("ablated", ablated)]:
    sites = ", ".join(f"{token!r}@L{layer} {score:.3f}"
                      for _, token, layer, score in result.top_sites(3))
    print(f"    top sites, {name:8} {sites}")
