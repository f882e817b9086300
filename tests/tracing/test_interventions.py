"""The hook factories are plain TransformerLens hooks that compose with a user's own."""

from __future__ import annotations

import torch

from lens_rome.model.hooks import attached
from lens_rome.tracing import noise_rules
from lens_rome.tracing.engine import trace
from lens_rome.tracing.interventions import record, restore, restore_window, sever
from lens_rome.tracing.noise_rules import corrupt
from lens_rome.tracing.subject import locate_subject

PROMPT = "The Space Needle is in downtown"
SUBJECT = "The Space Needle"


def _setup(model, samples=3):
    tokens, subject_range = locate_subject(model, PROMPT, SUBJECT)
    n_subject = subject_range[1] - subject_range[0]
    noise = torch.randn(samples, n_subject, model.cfg.d_model,
                        generator=torch.Generator().manual_seed(0))
    return tokens, subject_range, noise


def test_corrupt_touches_only_subject_embeddings(tiny_llama):
    tokens, subject_range, noise = _setup(tiny_llama)
    store = {}
    batch = tokens.expand(3, -1)
    tiny_llama.run_with_hooks(batch, fwd_hooks=[
        corrupt(noise, subject_range), record("hook_embed", store)])
    clean = tiny_llama.embed(tokens)
    start, end = subject_range
    assert torch.allclose(store["hook_embed"][:, start:end], clean[:, start:end] + noise)
    assert torch.equal(store["hook_embed"][:, end:], clean[:, end:].expand(3, -1, -1))


def test_restoring_every_layer_at_every_position_gives_the_clean_run(tiny_gpt2):
    tokens, subject_range, noise = _setup(tiny_gpt2)
    clean_logits, clean = tiny_gpt2.run_with_cache(tokens)
    every = range(tokens.shape[1])
    restore = restore_window(tiny_gpt2, "hidden", range(tiny_gpt2.cfg.n_layers), every,
                                   clean)
    logits = tiny_gpt2.run_with_hooks(tokens.expand(3, -1),
                                      fwd_hooks=[corrupt(noise, subject_range)] + restore)
    assert torch.allclose(logits, clean_logits.expand(3, -1, -1), atol=1e-5)


def test_sever_freezes_outputs_at_corrupted_values(tiny_llama):
    tokens, subject_range, noise = _setup(tiny_llama)
    batch, corrupt = tokens.expand(3, -1), noise_rules.corrupt(noise, subject_range)
    with tiny_llama.hooks(fwd_hooks=[corrupt]):
        _, corrupted = tiny_llama.run_with_cache(batch)
    _, clean = tiny_llama.run_with_cache(tokens)
    last_subject = subject_range[1] - 1
    store = {}
    tiny_llama.run_with_hooks(batch, fwd_hooks=[
        corrupt,
        restore("blocks.1.hook_resid_post", clean, last_subject),
        *sever(tiny_llama, "mlp", last_subject, corrupted),
        record("blocks.3.hook_mlp_out", store),
    ])
    assert torch.equal(store["blocks.3.hook_mlp_out"][:, last_subject],
                       corrupted["blocks.3.hook_mlp_out"][:, last_subject])


def test_a_users_ablation_applies_during_a_trace_and_survives_it(tiny_llama):
    plain = trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2)
    calls = []

    def ablate_mlp(activation, hook):
        calls.append(hook.name)
        return torch.zeros_like(activation)

    with tiny_llama.hooks(fwd_hooks=[("blocks.2.hook_mlp_out", ablate_mlp)]):
        ablated = trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2, target=plain.answer)
        assert len(tiny_llama.hook_dict["blocks.2.hook_mlp_out"].fwd_hooks) == 1
    assert calls, "the user's hook never ran"
    assert not torch.equal(plain.scores, ablated.scores)
    assert not tiny_llama.hook_dict["blocks.2.hook_mlp_out"].fwd_hooks


def test_attached_removes_only_its_own_hooks(tiny_gpt2):
    seen = []
    point = tiny_gpt2.hook_dict["blocks.0.hook_resid_post"]
    with tiny_gpt2.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: seen.append(1))]):
        with attached(tiny_gpt2, [("blocks.0.hook_resid_post",
                                         lambda a, hook: seen.append(2))]):
            tiny_gpt2(torch.tensor([[3, 4, 5]]))
        assert seen == [1, 2]
        tiny_gpt2(torch.tensor([[3, 4, 5]]))
        assert seen == [1, 2, 1]
    assert not point.fwd_hooks
