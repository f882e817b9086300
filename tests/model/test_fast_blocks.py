"""The lean Llama block equals TransformerLens' block, and the engine uses it only where it may."""


from __future__ import annotations

import pytest
import torch
from transformer_lens.cache.key_value_cache_entry import (
    TransformerLensKeyValueCacheEntry,
)

from lens_rome.model.fast_blocks import FastBlocks, has_user_hooks, unsupported_reason
from lens_rome.model.hooks import attached
from lens_rome.tracing import engine, interventions
from lens_rome.tracing.engine import trace, trace_all
from lens_rome.tracing.interventions import patch
from lens_rome.tracing.kinds import KINDS

PROMPT, SUBJECT = "The Space Needle is in downtown", "The Space Needle"



def assert_float32_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The same function in float32: equal to 1e-5 of the activations' scale.

    The lean block and TransformerLens' differ only in rounding (fused matrices
    sum in another order); the tiny models' activations reach ~50, where one
    float32 step is 4e-6, so the bound is relative to their largest value.
    """
    scale = float(expected.abs().max())
    deviation = float((got - expected).abs().max())
    assert deviation <= 1e-5 * max(scale, 1.0), f"deviation {deviation:.2e} at scale {scale:.1f}"


def test_block_equals_transformer_lens_block_with_prefix_and_patches(tiny_llama):
    torch.manual_seed(1)
    fast = FastBlocks(tiny_llama)
    layer, batch, n_prefix, n_pos = 2, 3, 4, 5
    block = tiny_llama.blocks[layer]
    kv_heads, d_head = tiny_llama.cfg.n_key_value_heads, tiny_llama.cfg.d_head
    resid = torch.randn(batch, n_pos, tiny_llama.cfg.d_model)
    keys = torch.randn(batch, n_prefix, kv_heads, d_head)  # TransformerLens caches keys unrotated
    values = torch.randn(batch, n_prefix, kv_heads, d_head)
    patch_attn = patch(f"blocks.{layer}.hook_attn_out", torch.ones(64), 0, rows=slice(1, 2))
    patch_mlp = patch(f"blocks.{layer}.hook_mlp_out", -torch.ones(64), [0, 3])

    with torch.no_grad():
        entry = TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)
        with attached(tiny_llama, [patch_attn, patch_mlp]):
            expected = block(resid, past_kv_cache_entry=entry)
        got = fast(layer, resid, (fast.rotated_keys(layer, keys), values), [patch_attn, patch_mlp])
        plain = fast(layer, resid, (fast.rotated_keys(layer, keys), values))

    assert_float32_equal(got, expected)
    assert not torch.allclose(plain, got)  # the patches did something


def test_block_without_prefix_equals_transformer_lens_block(tiny_llama):
    torch.manual_seed(2)
    fast = FastBlocks(tiny_llama)
    resid = torch.randn(2, 7, tiny_llama.cfg.d_model)
    with torch.no_grad():
        for layer in range(tiny_llama.cfg.n_layers):
            assert_float32_equal(fast(layer, resid), tiny_llama.blocks[layer](resid))


def test_unsupported_models_and_hooks_are_named(tiny_gpt2, tiny_llama):
    reason = unsupported_reason(tiny_gpt2)
    assert "RMSNorm" in reason and "rotary" in reason and "gated SiLU MLP" in reason
    with pytest.raises(ValueError, match="does not support this model"):
        FastBlocks(tiny_gpt2)
    with pytest.raises(ValueError, match="only has blocks.0.attn.hook_z, blocks.0.hook_attn_out"):
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
    fast = trace_all(tiny_llama, PROMPT, SUBJECT, **kwargs)
    assert calls, "a bf16 trace of a Llama-style model should use FastBlocks"
    monkeypatch.setattr(engine, "unsupported_reason", lambda model: "forced off")
    calls.clear()
    slow = trace_all(tiny_llama, PROMPT, SUBJECT, **kwargs)
    assert not calls
    for kind in KINDS:
        assert fast[kind].low_score == slow[kind].low_score  # clean and corrupted runs are float32
        assert (fast[kind].scores - slow[kind].scores).abs().max() < 0.02


def test_float32_traces_take_the_fast_path_exactly_and_user_hooks_keep_transformer_lens(
        tiny_llama, monkeypatch):
    calls = _spy_fast_calls(monkeypatch)
    fast = trace_all(tiny_llama, PROMPT, SUBJECT, samples=2, window=3)
    assert calls and all(r.meta["blocks"] == "lens_rome.model.fast_blocks" for r in fast.values())
    assert all(r.meta["precision"] == "float32" for r in fast.values())
    monkeypatch.setattr(engine, "unsupported_reason", lambda model: "forced off")
    slow = trace_all(tiny_llama, PROMPT, SUBJECT, samples=2, window=3)
    for kind in KINDS:
        assert slow[kind].meta["blocks"] == "transformer_lens"
        torch.testing.assert_close(fast[kind].scores, slow[kind].scores)
    monkeypatch.undo()
    calls = _spy_fast_calls(monkeypatch)
    ablate = ("blocks.1.hook_mlp_out", lambda activation, hook: activation * 0)
    with tiny_llama.hooks(fwd_hooks=[ablate]):
        hooked = trace(tiny_llama, PROMPT, SUBJECT, "hidden", samples=2)
    assert not calls and hooked.meta["blocks"] == "transformer_lens"
    assert not torch.allclose(hooked.scores, fast["hidden"].scores)


def test_last_only_gives_the_last_position_of_a_full_block(tiny_llama):
    torch.manual_seed(3)
    fast = FastBlocks(tiny_llama)
    resid = torch.randn(3, 5, tiny_llama.cfg.d_model)
    keys, values = torch.randn(2, 3, 4, 2, 16).unbind(0)
    prefix = (fast.rotated_keys(4, keys), values)
    with torch.no_grad():
        full = fast(4, resid, prefix)
        last = fast(4, resid, prefix, last_only=True)
    assert last.shape == (3, 1, tiny_llama.cfg.d_model)
    assert_float32_equal(last, full[:, -1:])


def test_rows_of_different_layouts_in_one_padded_batch(tiny_llama):
    """Per-row positions and masks give each row what it gets alone (ROME's one batch)."""
    torch.manual_seed(4)
    fast, d_model = FastBlocks(tiny_llama), tiny_llama.cfg.d_model
    layouts = [(0, 3), (2, 4), (5, 2)]  # (prefix length, positions computed)
    alone, n_prefix, n_pos = [], 5, 4
    keys = torch.zeros(3, n_prefix, 2, 16)
    values = torch.zeros(3, n_prefix, 2, 16)
    resid = torch.zeros(3, n_pos, d_model)
    positions = torch.zeros(3, n_pos, dtype=torch.long)
    mask = torch.zeros(3, 1, n_pos, n_prefix + n_pos, dtype=torch.bool)
    with torch.no_grad():
        for row, (p, n) in enumerate(layouts):
            x, k, v = torch.randn(1, n, d_model), torch.randn(1, p, 2, 16), torch.randn(1, p, 2, 16)
            k = fast.rotated_keys(1, k)
            alone.append(fast(1, x, (k, v) if p else None)[0])
            keys[row, :p], values[row, :p], resid[row, :n] = k[0], v[0], x[0]
            positions[row] = p + torch.arange(n_pos)
            mask[row, :, :, :p] = True
            mask[row, :, :, n_prefix:] = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
        together = fast(1, resid, (keys, values), positions=positions, mask=mask)
    for row, (p, n) in enumerate(layouts):
        assert_float32_equal(together[row, :n], alone[row])


def test_a_given_mlp_output_equals_patching_it(tiny_llama):
    """``mlp_first`` skips computing what a restoration overwrites, with the same result."""
    torch.manual_seed(5)
    fast, d_model = FastBlocks(tiny_llama), tiny_llama.cfg.d_model
    resid, value = torch.randn(6, 4, d_model), torch.randn(d_model)
    rows = slice(2, 4)
    patch = interventions.patch("blocks.3.hook_mlp_out", value, 0, rows=rows)
    with torch.no_grad():
        for n_pos in (4, 1):
            expected = fast(3, resid[:, :n_pos], hooks=[patch])
            got = fast(3, resid[:, :n_pos], mlp_first=(rows, value))
            assert_float32_equal(got, expected)
