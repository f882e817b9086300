"""The lean Llama block equals TransformerLens' block, and the engine uses it only where it may."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from lens_rome import hooks, tracing
from lens_rome.fast_blocks import FastBlocks, has_user_hooks, unsupported_reason

PROMPT, SUBJECT = "The Space Needle is in downtown", "The Space Needle"


def test_block_equals_transformer_lens_block_with_prefix_and_patches(tiny_llama):
    torch.manual_seed(1)
    fast = FastBlocks(tiny_llama)
    layer, batch, n_prefix, n_pos = 2, 3, 4, 5
    block = tiny_llama.blocks[layer]
    kv_heads, d_head = tiny_llama.cfg.n_key_value_heads, tiny_llama.cfg.d_head
    resid = torch.randn(batch, n_pos, tiny_llama.cfg.d_model)
    keys = torch.randn(batch, n_prefix, kv_heads, d_head)  # TransformerLens caches keys unrotated
    values = torch.randn(batch, n_prefix, kv_heads, d_head)
    patch_attn = hooks.patch(f"blocks.{layer}.hook_attn_out", torch.ones(64), 0, rows=slice(1, 2))
    patch_mlp = hooks.patch(f"blocks.{layer}.hook_mlp_out", -torch.ones(64), [0, 3])

    with torch.no_grad():
        entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        with hooks.attached(tiny_llama, [patch_attn, patch_mlp]):
            expected = block(resid, past_kv_cache_entry=entry)
        got = fast(layer, resid, (fast.rotated_keys(layer, keys), values), [patch_attn, patch_mlp])
        plain = fast(layer, resid, (fast.rotated_keys(layer, keys), values))

    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, got)  # the patches did something


def test_block_without_prefix_equals_transformer_lens_block(tiny_llama):
    torch.manual_seed(2)
    fast = FastBlocks(tiny_llama)
    resid = torch.randn(2, 7, tiny_llama.cfg.d_model)
    with torch.no_grad():
        for layer in range(tiny_llama.cfg.n_layers):
            torch.testing.assert_close(fast(layer, resid), tiny_llama.blocks[layer](resid),
                                       rtol=1e-4, atol=1e-4)


def test_unsupported_models_and_hooks_are_named(tiny_gpt2, tiny_llama):
    reason = unsupported_reason(tiny_gpt2)
    assert "RMSNorm" in reason and "rotary" in reason and "gated SiLU MLP" in reason
    with pytest.raises(ValueError, match="does not support this model"):
        FastBlocks(tiny_gpt2)
    with pytest.raises(ValueError, match="only has blocks.0.hook_attn_out"):
        FastBlocks(tiny_llama)(0, torch.zeros(1, 1, 64), hooks=[("blocks.0.hook_resid_post", None)])
    assert unsupported_reason(tiny_llama) is None and not has_user_hooks(tiny_llama)
    with tiny_llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a)]):
        assert has_user_hooks(tiny_llama)
    assert not has_user_hooks(tiny_llama)


def _spy_fast_calls(monkeypatch) -> list:
    calls = []
    original = FastBlocks.__call__

    def spy(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastBlocks, "__call__", spy)
    return calls


def test_bf16_trace_takes_the_fast_path_and_agrees_with_transformer_lens(tiny_llama, monkeypatch):
    calls = _spy_fast_calls(monkeypatch)
    kwargs = dict(samples=3, window=3, bf16=True, seed=4)
    fast = tracing.trace_all(tiny_llama, PROMPT, SUBJECT, **kwargs)
    assert calls, "a bf16 trace of a Llama-style model should use FastBlocks"
    monkeypatch.setattr(tracing, "unsupported_reason", lambda model: "forced off")
    calls.clear()
    slow = tracing.trace_all(tiny_llama, PROMPT, SUBJECT, **kwargs)
    assert not calls
    for kind in tracing.KINDS:
        assert fast[kind].low_score == slow[kind].low_score  # clean and corrupted runs are float32
        assert (fast[kind].scores - slow[kind].scores).abs().max() < 0.02


def test_float32_traces_and_user_hooks_keep_transformer_lens_blocks(tiny_llama, monkeypatch):
    calls = _spy_fast_calls(monkeypatch)
    tracing.trace(tiny_llama, PROMPT, SUBJECT, "mlp", samples=2, window=3)
    assert not calls
    ablate = ("blocks.1.hook_mlp_out", lambda activation, hook: activation * 0)
    with tiny_llama.hooks(fwd_hooks=[ablate]):
        hooked = tracing.trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2, bf16=True)
    assert not calls
    plain = tracing.trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2, bf16=True)
    assert calls and not torch.allclose(hooked.scores, plain.scores)
