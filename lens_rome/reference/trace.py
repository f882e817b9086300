"""The paper's causal-tracing algorithm, one restoration per forward pass.

A direct transcription of ``trace_with_patch`` / ``trace_with_repatch`` from
Meng et al.'s repository onto TransformerLens hooks: batch row 0 runs clean,
rows 1.. run corrupted; a restored state is copied from row 0 into the other
rows during the same pass; the score is the answer's probability averaged
over the corrupted rows.  Slow on purpose: it is the yardstick for
``lens_rome.trace``, and imports nothing of lens_rome's tracing code.
"""

from __future__ import annotations

import torch

HOOK = {
    "hidden": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "attn": "blocks.{}.hook_attn_out",
}


def _metric(logits, answer, metric):
    log_probs = torch.log_softmax(logits[1:, -1].float(), dim=-1)[:, answer]
    return float(log_probs.exp().mean() if metric == "prob" else log_probs.mean())


def trace_with_patch(model, tokens, states_to_patch, answer, subject_range, noise,
                     replace=False, states_to_unpatch=(), metric="prob"):
    """One forward pass over [clean, corrupted x samples]; returns the score."""
    samples = noise.shape[0]
    batch = tokens.expand(samples + 1, -1)
    start, end = subject_range

    def corrupt(x, hook):
        if replace:
            x[1:, start:end] = noise
        else:
            x[1:, start:end] += noise
        return x

    def restore(t):
        def fn(x, hook):
            x[1:, t] = x[0, t]
            return x
        return fn

    first_pass = {}
    if states_to_unpatch:  # the paper's trace_with_repatch: a first, purely corrupted pass
        def keep(name):  # by the name asked for (a TransformerBridge's hook.name is its own)
            def fn(x, hook):
                first_pass[name] = x.clone()
            return fn
        names = {name for _, name in states_to_unpatch}
        model.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)] +
                             [(name, keep(name)) for name in names])

    def unpatch(t, name):
        def fn(x, hook):
            x[1:, t] = first_pass[name][1:, t]
            return x
        return fn

    fwd = [("hook_embed", corrupt)]
    fwd += [(name, restore(t)) for t, name in states_to_patch]
    fwd += [(name, unpatch(t, name)) for t, name in states_to_unpatch]
    logits = model.run_with_hooks(batch, fwd_hooks=fwd)
    return _metric(logits, answer, metric)


@torch.no_grad()
def reference_trace(model, tokens, subject_range, answer, noise, kind="hidden", window=10,
                    sever=None, replace=False, metric="prob", positions=None, layers=None):
    """Scores [n_tokens, n_layers], one forward pass (two when severed) per state.

    ``positions`` and ``layers`` limit the restored tokens and layers (other cells stay NaN).
    """
    n_tokens, n_layers = tokens.shape[1], model.cfg.n_layers
    scores = torch.full((n_tokens, n_layers), float("nan"))
    for t in range(n_tokens) if positions is None else positions:
        unpatch = []
        if sever is not None:
            unpatch = [(t, HOOK[sever].format(layer)) for layer in range(n_layers)]
        for layer in range(n_layers) if layers is None else layers:
            # trace_important_window's centring
            restored = [layer] if kind == "hidden" else range(
                max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
            patch = [(t, HOOK[kind].format(l)) for l in restored]
            scores[t, layer] = trace_with_patch(model, tokens, patch, answer, subject_range,
                                                noise, replace, unpatch, metric)
    low = trace_with_patch(model, tokens, [], answer, subject_range, noise, replace, (), metric)
    return scores, low


def _hf_module_names(hf_model) -> tuple[str, str]:
    """The paper's ``layername``: the embedding module and a template for block ``{}``'s
    modules (``""``, ``".mlp"``, ``".attn"`` appended) of a Hugging Face causal LM."""
    if hasattr(hf_model, "transformer"):  # GPT-2, GPT-J
        return "transformer.wte", "transformer.h.{}"
    if hasattr(hf_model, "gpt_neox"):
        return "gpt_neox.embed_in", "gpt_neox.layers.{}"
    return "model.embed_tokens", "model.layers.{}"  # Llama, Gemma, Qwen, Mistral...


def _attention_module(hf_model) -> str:
    if hasattr(hf_model, "transformer"):
        return ".attn"
    return ".attention" if hasattr(hf_model, "gpt_neox") else ".self_attn"


@torch.no_grad()
def reference_trace_hf(hf_model, tokens, subject_range, answer, noise, kind="hidden", window=10,
                       metric="prob", positions=None, layers=None):
    """The paper's ``trace_with_patch`` on the plain Hugging Face model: PyTorch forward
    hooks on its modules (the paper's ``nethook.TraceDict``), no TransformerLens at all.

    Scores ``[n_tokens, n_layers]`` (cells outside ``positions`` x ``layers`` stay NaN) and
    the corrupted score.  Block and attention outputs may be tuples: their first element
    is the hidden state (the paper's ``untuple``).
    """
    embed_name, block = _hf_module_names(hf_model)
    suffix = {"hidden": "", "mlp": ".mlp", "attn": _attention_module(hf_model)}[kind]
    modules = dict(hf_model.named_modules())
    n_layers = hf_model.config.num_hidden_layers
    samples = noise.shape[0]
    batch = tokens.expand(samples + 1, -1)
    start, end = subject_range

    def run(restored: list[tuple[int, str]]) -> float:
        def corrupt(module, inputs, output):
            output[1:, start:end] += noise.to(output.dtype)
            return output

        def restore(t):
            def fn(module, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden[1:, t] = hidden[0, t]
                return output
            return fn

        handles = [modules[embed_name].register_forward_hook(corrupt)]
        handles += [modules[name].register_forward_hook(restore(t)) for t, name in restored]
        try:
            logits = hf_model(batch).logits
        finally:
            for handle in handles:
                handle.remove()
        return _metric(logits, answer, metric)

    n_tokens = tokens.shape[1]
    scores = torch.full((n_tokens, n_layers), float("nan"))
    for t in range(n_tokens) if positions is None else positions:
        for layer in range(n_layers) if layers is None else layers:
            restored = [layer] if kind == "hidden" else range(
                max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))
            scores[t, layer] = run([(t, block.format(l) + suffix) for l in restored])
    return scores, run([])
