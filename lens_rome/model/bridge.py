"""The seam for a ``TransformerBridge``: TransformerLens' wrapper of a Hugging Face model.

A bridge runs the Hugging Face model itself, so its logits equal Hugging
Face's exactly.  It has the ``HookedTransformer`` hook names as aliases, but
a hook sees its canonical name (``blocks.5.hook_out``), so the bridge's column of
:data:`lens_rome.model.hook_names.HOOK_NAMES` names the canonical points, and caches
are read under the names asked for.
What it lacks, this adapter does another way:

- no ``start_at_layer`` (TransformerLens 3.9 refuses it, 4.x runs every
  lower block anyway) and no key-value cache entries: the tracing engine
  and ROME's v* loop run the blocks as lean functions of the Hugging Face
  weights (:class:`lens_rome.model.fast_blocks.FastBlocks`, Llama-style models
  with no hooks attached) or run whole forward passes;
- ``W_out`` is a transposed view of the Hugging Face ``down_proj.weight``
  (``c_proj`` ...): edits write through the view, optimisers get the
  parameter itself (:meth:`BridgeAdapter.w_out_parameter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lens_rome.model.hook_names import BRIDGE
from lens_rome.model.hooked import ModelAdapter
from lens_rome.model.hooks import Hook, attached



class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is seen."""


@dataclass(frozen=True)
class BridgeAdapter(ModelAdapter):
    """What tracing and editing need to know about a ``TransformerBridge``."""

    backend: str = BRIDGE

    @property
    def hf(self) -> torch.nn.Module:
        """The Hugging Face model the bridge wraps."""
        return self.model.original_model

    @property
    def native_blocks(self) -> bool:
        return False

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.model.cfg, "n_key_value_heads", None) or self.n_heads

    def w_out(self, layer: int) -> torch.Tensor:
        """The MLP output projection of ``layer``, ``[d_mlp, d_model]``: a view of the
        Hugging Face weight (in-place changes reach the model)."""
        return self.model.blocks[self.check_layer(layer)].mlp.W_out

    def mlp_post_norm(self, layer: int) -> torch.nn.Module | None:
        """The Hugging Face layer's norm of its MLP's output (Gemma's
        ``post_feedforward_layernorm``), or None where the MLP's output is added as it is."""
        layers = getattr(getattr(self.hf, "model", None), "layers", None)
        if layers is None:  # GPT-2 and NeoX layouts: no norm after the MLP
            return None
        return getattr(layers[self.check_layer(layer)], "post_feedforward_layernorm", None)

    def w_out_parameter(self, layer: int) -> torch.nn.Parameter:
        """The Hugging Face parameter that :meth:`w_out` views (what an optimiser takes)."""
        view = self.w_out(layer)
        for parameter in self.model.blocks[layer].mlp.parameters():
            if parameter.data_ptr() == view.data_ptr() and parameter.numel() == view.numel():
                return parameter
        raise RuntimeError(f"cannot find the parameter behind W_out of layer {layer}")

    @property
    def w_e(self) -> torch.Tensor:
        """The token embeddings as the embedding hook sees them, ``[d_vocab, d_model]``:
        Gemma's embedding module scales its weight by ``sqrt(d_model)`` (``embed_scale``),
        which ``HookedTransformer`` folds into its ``W_E``."""
        scale = getattr(self.hf.get_input_embeddings(), "embed_scale", None)
        return self.model.W_E if scale is None else self.model.W_E * scale.to(self.dtype)

    def w_o(self, layer: int) -> torch.Tensor:
        return self.model.blocks[self.check_layer(layer)].attn.W_O

    def final_logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream after the last block, as the Hugging Face
        model computes them (final norm, unembedding, Gemma's soft cap)."""
        logits = self.model.unembed(self.model.ln_final(resid))
        cap = getattr(self.hf.config, "final_logit_softcapping", None) or 0.0
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def after_blocks(self, resid: torch.Tensor) -> torch.Tensor:
        return self.final_logits(resid)

    def resid_before(self, tokens: torch.Tensor, layer: int, hooks: Sequence[Hook] = ()
                     ) -> torch.Tensor:
        """The residual stream entering block ``layer`` (``n_layers``: after the last block)
        for ``tokens`` ``[batch, pos]``, with ``hooks`` attached; the pass stops there."""
        name = self.hook_name("embed") if layer == 0 else self.hook_name("hidden", layer - 1)
        seen = {}

        def stop(activation, hook):
            seen["resid"] = activation
            raise _Stop

        try:
            with attached(self.model, [*hooks, (name, stop)]):
                self.model(tokens)
        except _Stop:
            pass
        return seen["resid"]

    def upper_logits(self, tokens: torch.Tensor, layer: int):
        """A function computing the logits of ``tokens`` with gradients to the weights of
        block ``layer`` and above: the bridge cannot start at a layer, so it runs them all."""
        return lambda: self.model(tokens)

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position ``[batch, d_vocab]``."""
        return self.final_logits(self.resid_before(tokens, self.n_layers)[:, -1])

    def embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.resid_before(tokens, 0)

    def fingerprint_tensors(self) -> list[torch.Tensor]:
        return [self.w_e] + [block.mlp.W_in for block in self.model.blocks]

    # -- lean blocks -------------------------------------------------------------------

    def lean_unsupported(self) -> str | None:
        """Why :class:`FastBlocks` cannot stand in for this bridge's blocks, or None."""
        config = self.hf.config
        rope = getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        checks = {
            "a Llama architecture": getattr(config, "model_type", None) == "llama",
            "no attention or MLP biases": not (getattr(config, "attention_bias", False)
                                               or getattr(config, "mlp_bias", False)),
            "default rotary embeddings": rope_type == "default",
            "gated SiLU MLP": getattr(config, "hidden_act", None) == "silu",
        }
        failed = [name for name, ok in checks.items() if not ok]
        return f"{type(self.hf).__name__}: needs {', '.join(failed)}" if failed else None

    def lean_weights(self) -> list[dict]:
        """Per layer, the weights :class:`FastBlocks` fuses, in ``F.linear``'s layout."""
        hf, n_ctx = self.hf, self.n_ctx
        positions = torch.arange(n_ctx, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = hf.model.rotary_emb(probe, positions)
        layers = []
        for layer in hf.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append({
                "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "ln2": (layer.post_attention_layernorm.weight,
                        layer.post_attention_layernorm.variance_epsilon),
                "q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight,
                "o": attn.o_proj.weight,
                "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "out": mlp.down_proj.weight,
                "cos": cos[0], "sin": sin[0], "scale": float(attn.scaling),
            })
        return layers

    @property
    def lean_heads(self) -> tuple[int, int, int, int]:
        """``(n_heads, n_kv_heads, d_head, d_model)`` for :class:`FastBlocks`."""
        return self.n_heads, self.n_kv_heads, self.d_head, self.d_model
