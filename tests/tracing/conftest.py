"""Models shared by the attribution tests."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


@pytest.fixture(scope="module")
def linear_model(tiny_tokenizer):
    """A transformer that is affine in its embeddings: no norms, attention with zero queries
    and keys (a fixed, uniform causal pattern) and ReLU MLPs whose bias keeps every
    pre-activation positive (ReLU acts as the identity; the output bias cancels it)."""
    torch.manual_seed(1)
    cfg = HookedTransformerConfig(
        n_layers=4, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64,
        d_vocab=len(tiny_tokenizer), act_fn="relu", normalization_type=None,
        initializer_range=0.1, default_prepend_bos=False, model_name="linear",
    )
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer, move_to_device=False)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("W_Q", "W_K", "b_Q", "b_K"):
                getattr(block.attn, name).zero_()
            block.mlp.b_in.fill_(50.0)
            block.mlp.b_out.copy_(-block.mlp.b_in @ block.mlp.W_out)
    return model.eval()
