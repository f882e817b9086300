"""A lean forward pass of Llama-style blocks, for the tracing engine's restored runs.

A causal trace spends nearly all its time pushing a few hundred restored
copies of a prompt through the blocks.  TransformerLens' block is general and
hookable; its small element-wise steps (zero biases added, einops copies,
keys re-rotated on every call, each query head expanded to its own copy of
the shared key head) cost as much as the matrix products in bfloat16, and a
tenth of the time in float32.  :class:`FastBlocks` computes the same function
with fused weights (one matmul for Q/K/V, one for gate/up), causal attention
as two batched products over the grouped heads, and cached keys rotated once.
In the last block it can compute the last position only (``last_only``): that
is all the logits need.

Only the hook points the tracing engine patches exist here (the model's
``"head"``, ``"attn"`` and ``"mlp"`` points of :data:`HOOK_NAMES`:
``blocks.{i}.attn.hook_z``, ``blocks.{i}.hook_attn_out`` and
``blocks.{i}.hook_mlp_out`` on a ``HookedTransformer``), called as
``fn(activation, None)``.  On a ``TransformerBridge`` of a Llama-style model
the weights come from the Hugging Face modules.  The engine
uses this path for a supported model with no user hooks attached, in float32
or bfloat16; a model with hooks attached runs TransformerLens' own blocks, so
the hooks see every activation.  In float32 the two agree to ~1e-6
(tests/model/test_fast_blocks.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformer_lens.hook_points import HookPoint

from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.hook_names import BRIDGE, HOOK_NAMES
from lens_rome.model.hooks import Hook

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", None)  # None: a config built by hand


def unsupported_reason(model: Model) -> str | None:
    """Why :class:`FastBlocks` cannot stand in for ``model``'s blocks, or None."""
    adapter = adapter_for(model)
    if adapter.backend == BRIDGE:
        return adapter.lean_unsupported()
    cfg = model.cfg
    checks = {
        "a Llama architecture": cfg.original_architecture in SUPPORTED_ARCHITECTURES,
        "RMSNorm before attention and MLP only": (
            cfg.normalization_type == "RMS" and not cfg.use_normalization_before_and_after
            and not cfg.use_qk_norm and not cfg.parallel_attn_mlp
        ),
        "rotary positions (rotate-half, full head)": (
            cfg.positional_embedding_type == "rotary" and not cfg.rotary_adjacent_pairs
            and cfg.rotary_dim == cfg.d_head and not cfg.use_dynamic_ntk_rope
        ),
        "gated SiLU MLP": cfg.gated_mlp and cfg.act_fn == "silu" and not cfg.num_experts,
        "plain causal attention": (
            cfg.attention_dir == "causal" and cfg.window_size is None and cfg.clip_qkv is None
            and not (cfg.use_attn_result or cfg.use_split_qkv_input or cfg.use_attn_in
                     or cfg.attn_scores_soft_cap > 0 or cfg.use_logn_attn
                     or cfg.use_attention_sinks)
        ),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        return f"{cfg.original_architecture}: needs {', '.join(failed)}"
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        biases = [attn.b_Q, _kv(attn, "b_K"), _kv(attn, "b_V"), attn.b_O, mlp.b_in, mlp.b_out]
        if hasattr(mlp, "b_gate"):
            biases.append(mlp.b_gate)
        if any(bias is not None and bool(bias.any()) for bias in biases):
            return "non-zero biases"
    return None


def has_user_hooks(model: Model) -> bool:
    """Whether any module of ``model`` has a forward hook (``with model.hooks(...)`` adds some).

    On a ``TransformerBridge``, the hook points only: the bridge itself keeps
    hooks on the Hugging Face modules it wraps.
    """
    modules = model.modules()
    if adapter_for(model).backend == BRIDGE:
        modules = (m for m in modules if isinstance(m, HookPoint))
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _kv(attn, name: str) -> torch.Tensor:
    """Grouped-query attention keeps the unrepeated K/V weights as ``_W_K``, ``_b_K``..."""
    return getattr(attn, "_" + name) if hasattr(attn, "_" + name) else getattr(attn, name)


def rotate(x: Float[torch.Tensor, "batch pos head d_head"], cos, sin) -> torch.Tensor:
    """Rotary embedding, GPT-NeoX style (halves); ``cos``/``sin`` are ``[pos, 1, d_head]``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class FastBlocks:
    """The model's blocks as plain functions of fused weights in the model's current dtype.

    Build it inside ``adapter.cast(dtype)`` so the weights are taken in that
    dtype; it holds copies, so it is valid only while the weights it was
    built from are unchanged.
    """

    def __init__(self, model: Model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise InputError(f"FastBlocks does not support this model ({reason})")
        adapter = adapter_for(model)
        self.hook_names = {kind: HOOK_NAMES[adapter.backend][kind] for kind in ("head", "attn", "mlp")}
        if adapter.backend == BRIDGE:  # the Hugging Face weights, already in F.linear's layout
            self.n_heads, self.n_kv_heads, self.d_head, self.d_model = adapter.lean_heads
            self.layers = [{
                "ln1": w["ln1"], "ln2": w["ln2"], "qkv": torch.cat([w["q"], w["k"], w["v"]]),
                "o": w["o"], "gate_up": torch.cat([w["gate"], w["up"]]), "out": w["out"],
                "cos": w["cos"], "sin": w["sin"], "scale": w["scale"],
            } for w in adapter.lean_weights()]
            return
        cfg = model.cfg
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads
        self.d_head, self.d_model = cfg.d_head, cfg.d_model
        self.layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            qkv = [attn.W_Q, _kv(attn, "W_K"), _kv(attn, "W_V")]  # [head, d_model, d_head]
            self.layers.append({
                "ln1": (block.ln1.w, block.ln1.eps),
                "ln2": (block.ln2.w, block.ln2.eps),
                "qkv": torch.cat([w.permute(0, 2, 1).reshape(-1, self.d_model) for w in qkv]),
                "o": attn.W_O.reshape(-1, self.d_model).T.contiguous(),
                "gate_up": torch.cat([mlp.W_gate.T, mlp.W_in.T]).contiguous(),
                "out": mlp.W_out.T.contiguous(),
                "cos": attn.rotary_cos,
                "sin": attn.rotary_sin,
                "scale": 1.0 / float(attn.attn_scale),
            })

    def rotated_keys(self, layer: int, keys: Float[torch.Tensor, "batch pos kv_head d_head"]):
        """Rotate cached keys (TransformerLens caches them unrotated) for positions 0..pos-1."""
        weights = self.layers[layer]
        n = keys.shape[1]
        return rotate(keys, weights["cos"][:n, None].to(keys.dtype),
                      weights["sin"][:n, None].to(keys.dtype))

    def __call__(
        self,
        layer: int,
        resid: Float[torch.Tensor, "batch pos d_model"],
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        hooks: Sequence[Hook] = (),
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mlp_first: tuple[slice, torch.Tensor] | None = None,
        kv_out: list | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Block ``layer`` on ``resid``, whose first position is ``prefix_len`` into the prompt.

        ``prefix``: rotated keys and values ``[batch, prefix_len, kv_head, d_head]``
        of the earlier positions.  ``hooks``: ``(name, fn)`` at
        ``blocks.{layer}.attn.hook_z``, ``.hook_attn_out`` or ``.hook_mlp_out``.
        ``last_only``: return the last position alone, ``[batch, 1, d_model]``
        (the other positions still serve as keys and values); hooks then see
        that position only.  ``positions`` ``[batch, pos]`` and ``mask``
        ``[batch, 1, pos, prefix_len + pos]`` (True: may attend) give each row its own
        token positions and visible keys, for rows of different layouts padded
        into one batch; by default every row's positions follow the prefix and
        attention is causal.  ``mlp_first = (rows, value)``: the MLP output
        of those rows at the first position is ``value`` ``[d_model]`` (a
        restored state), so it is not computed.  ``kv_out``: a list to which
        the block appends the rotated keys and the values of ``resid``'s positions
        (``[batch, pos, kv_head, d_head]`` each), as ``prefix`` takes them.
        """
        weights = self.layers[layer]
        z_hooks, attn_hooks, mlp_hooks = self._split_hooks(layer, hooks)
        batch, n_pos, _ = resid.shape
        heads, kv_heads, d_head = self.n_heads, self.n_kv_heads, self.d_head
        offset = 0 if prefix is None else prefix[0].shape[1]
        n_query = 1 if last_only else n_pos

        normed = _rms_norm(resid, *weights["ln1"])
        if positions is None:
            cos = weights["cos"][offset : offset + n_pos, None].to(resid.dtype)
            sin = weights["sin"][offset : offset + n_pos, None].to(resid.dtype)
        else:  # [batch, pos, 1, d_head]
            cos = weights["cos"][positions][:, :, None].to(resid.dtype)
            sin = weights["sin"][positions][:, :, None].to(resid.dtype)
        if last_only:
            k, v = F.linear(normed, weights["qkv"][heads * d_head:]).split(kv_heads * d_head, -1)
            q = F.linear(normed[:, -1:], weights["qkv"][: heads * d_head])
        else:
            q, k, v = F.linear(normed, weights["qkv"]).split(
                [heads * d_head, kv_heads * d_head, kv_heads * d_head], dim=-1)
        q = rotate(q.view(batch, n_query, heads, d_head), cos[..., -n_query:, :, :],
                   sin[..., -n_query:, :, :])
        k = rotate(k.view(batch, n_pos, kv_heads, d_head), cos, sin)
        v = v.view(batch, n_pos, kv_heads, d_head)
        if kv_out is not None:
            kv_out.append((k, v))
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
        z = _attention(q, k, v, offset + n_pos - n_query, weights["scale"],
                       None if mask is None else mask[:, :, -n_query:])
        for _, fn in z_hooks:
            z = _hooked(fn, z)
        attn_out = F.linear(z.reshape(batch, n_query, heads * d_head), weights["o"])
        for _, fn in attn_hooks:
            attn_out = _hooked(fn, attn_out)
        resid = resid[:, -n_query:] + attn_out

        if mlp_first is None:
            mlp_out = self._mlp(weights, resid)
        else:  # the first position's output of mlp_first's rows is given: compute the rest
            rows, value = mlp_first
            mlp_out = torch.empty_like(resid)
            mlp_out[:, 1:] = self._mlp(weights, resid[:, 1:])
            for other in _complement(rows, batch):
                mlp_out[other, :1] = self._mlp(weights, resid[other, :1])
            mlp_out[rows, 0] = value.to(resid.dtype)
        for _, fn in mlp_hooks:
            mlp_out = _hooked(fn, mlp_out)
        return resid + mlp_out

    def mlp_residual(self, layer: int, resid: Float[torch.Tensor, "batch pos d_model"]
                     ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The second half of block ``layer``: ``resid`` plus its MLP's output."""
        return resid + self._mlp(self.layers[layer], resid)

    def mlp_key(self, layer: int, resid_mid: Float[torch.Tensor, "*batch d_model"]
                ) -> Float[torch.Tensor, "*batch d_mlp"]:
        """The MLP's hidden activation (``mlp.hook_post``, ROME's key) at the residual
        stream ``resid_mid`` between block ``layer``'s attention and its MLP."""
        return self._post(self.layers[layer], resid_mid)

    @staticmethod
    def _post(weights: dict, resid: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(_rms_norm(resid, *weights["ln2"]), weights["gate_up"]).chunk(2, dim=-1)
        return F.silu(gate) * up

    @classmethod
    def _mlp(cls, weights: dict, resid: torch.Tensor) -> torch.Tensor:
        return F.linear(cls._post(weights, resid), weights["out"])

    def _split_hooks(self, layer: int, hooks: Sequence[Hook]) -> tuple[list[Hook], ...]:
        names = tuple(self.hook_names[kind].format(layer=layer) for kind in ("head", "attn", "mlp"))
        unknown = [name for name, _ in hooks if name not in names]
        if unknown:
            raise InputError(f"FastBlocks only has {', '.join(names)}; got hooks at {unknown}")
        return tuple([h for h in hooks if h[0] == name] for name in names)


def _complement(rows: slice, batch: int) -> list[slice]:
    """The row ranges of a batch of ``batch`` rows outside the step-1 slice ``rows``."""
    start, stop, _ = rows.indices(batch)
    return [r for r in (slice(0, start), slice(stop, batch)) if r.stop > r.start]


def _attention(
    q: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch kv_pos kv_head d_head"],
    v: Float[torch.Tensor, "batch kv_pos kv_head d_head"],
    offset: int,
    scale: float,
    mask: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """Causal grouped-query attention; queries start ``offset`` positions into the keys.

    ``mask`` (``[batch, 1, pos, kv_pos]``, True: may attend) replaces the causal rule.
    """
    batch, n_pos, heads, d_head = q.shape
    kv_pos, kv_heads = k.shape[1], k.shape[2]
    if mask is not None:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads,
        )
        return z.transpose(1, 2)
    # Causal: the query heads of one key head as one matrix of rows, two batched products.
    # The trace's few positions leave torch's CPU flash kernel mostly overhead (~2x slower).
    group = heads // kv_heads
    grouped = q.view(batch, n_pos, kv_heads, group, d_head).permute(0, 2, 3, 1, 4)
    scores = grouped.reshape(batch, kv_heads, group * n_pos, d_head) @ k.permute(0, 2, 3, 1)
    causal = torch.ones(n_pos, kv_pos, dtype=torch.bool).tril(offset)
    scores = scores.view(batch, kv_heads, group, n_pos, kv_pos).mul_(scale)
    weights = scores.masked_fill_(~causal, float("-inf")).softmax(-1)
    z = weights.view(batch, kv_heads, group * n_pos, kv_pos) @ v.transpose(1, 2)
    return z.view(batch, kv_heads, group, n_pos, d_head).permute(0, 3, 1, 2, 4).reshape(
        batch, n_pos, heads, d_head)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """TransformerLens' RMSNorm, step for step: normalised in float32, scaled in the weight's dtype."""
    x = x.float()
    return (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()).to(weight.dtype) * weight


def _hooked(fn: Callable, activation: torch.Tensor) -> torch.Tensor:
    result = fn(activation, None)
    return activation if result is None else result
