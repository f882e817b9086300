"""The seam for a ``HookedTransformer``, and the adapter interface every backend follows.

:class:`ModelAdapter` answers everything tracing and editing ask of a model
for a ``HookedTransformer``; :class:`lens_rome.model.bridge.BridgeAdapter`
answers the same for a ``TransformerBridge`` where the two differ.  Only
:func:`lens_rome.model.adapter.adapter_for` chooses between them.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from lens_rome.errors import InputError, PromptError, WrongTypeError
from lens_rome.model.backend import Model
from lens_rome.model.hook_names import HOOK_NAMES, HOOKED
from lens_rome.model.hooks import Hook, attached


@dataclass
class ModelState:
    """What lens_rome remembers about one model: its name and the edits applied to it."""

    name: str | None = None
    edits: list = field(default_factory=list)  # WeightEdit objects, oldest first
    memo: dict = field(default_factory=dict)  # per-model caches (e.g. generated prefixes)


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, ModelState]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelAdapter:
    """What tracing and editing need to know about a ``HookedTransformer``.

    Everything that depends on how the model is built goes through here: hook
    names (:data:`HOOK_NAMES`), config fields, blocks, BOS handling, where
    ``W_out`` lives, and the per-model :class:`ModelState`.
    """

    model: Model
    backend: str = HOOKED

    @property
    def HOOKS(self) -> dict[str, str]:  # noqa: N802 (kept from 0.1's class attribute)
        return HOOK_NAMES[self.backend]

    @property
    def EMBED_HOOK(self) -> str:  # noqa: N802
        return HOOK_NAMES[self.backend]["embed"]

    @property
    def state(self) -> ModelState:
        """This model's :class:`ModelState` (created on first use, dropped with the model)."""
        if self.model not in _STATES:
            _STATES[self.model] = ModelState()
        return _STATES[self.model]


    @property
    def config(self):
        """The backend's config object (for TransformerLens internals such as KV caches)."""
        return self.model.cfg

    @property
    def d_mlp(self) -> int:
        return self.model.cfg.d_mlp

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def d_head(self) -> int:
        return self.model.cfg.d_head

    @property
    def device(self) -> torch.device | str:
        return self.model.cfg.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cfg.dtype

    @property
    def rotary(self) -> bool:
        """Whether positions enter through rotary embeddings of queries and keys."""
        return self.model.cfg.positional_embedding_type == "rotary"

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def n_heads(self) -> int:
        return self.model.cfg.n_heads

    @property
    def n_ctx(self) -> int:
        """The longest token sequence the model accepts."""
        return self.model.cfg.n_ctx

    def check_length(self, n_tokens: int, what: str) -> None:
        """Raise ``ValueError`` if ``n_tokens`` tokens (``what`` they are) exceed the context."""
        if n_tokens > self.n_ctx:
            raise PromptError(
                f"{what} is {n_tokens} tokens long, but {self.name} accepts at most "
                f"{self.n_ctx} tokens (its context length); shorten it by "
                f"{n_tokens - self.n_ctx} tokens"
            )

    @property
    def name(self) -> str:
        return self.state.name or self.model.cfg.model_name

    @property
    def prepend_bos(self) -> bool:
        return bool(self.model.cfg.default_prepend_bos)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise WrongTypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise InputError(
                f"layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}"
            )
        return layer

    def hook_name(self, kind: str, layer: int | None = None) -> str:
        """The hook point for a kind of state (at ``layer``; ``"embed"`` has none)."""
        hooks = HOOK_NAMES[self.backend]
        if kind not in hooks:
            raise InputError(f"unknown kind {kind!r}; expected one of {sorted(hooks)}")
        if "{layer}" not in hooks[kind]:
            return hooks[kind]
        if layer is None:
            raise WrongTypeError(f"hook {kind!r} needs a layer")
        return hooks[kind].format(layer=self.check_layer(layer))

    def layer_hook_names(self, kind: str) -> list[str]:
        """The hook point of ``kind`` at every layer, bottom to top."""
        return [self.hook_name(kind, layer) for layer in range(self.n_layers)]

    def w_out(self, layer: int) -> torch.nn.Parameter:
        """The MLP output projection of ``layer``, shape ``[d_mlp, d_model]``."""
        return self.model.blocks[self.check_layer(layer)].mlp.W_out

    def mlp_post_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm a block applies to its MLP's output before adding it to the residual
        stream (Gemma 2 and 3's post-feedforward RMSNorm, ``ln2_post``), or None where the
        residual stream gets ``W_out k`` as it is (GPT-2, Llama, NeoX)."""
        if not getattr(self.model.cfg, "use_normalization_before_and_after", False):
            return None
        return self.block(layer).ln2_post

    def mlp_value(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """What ``W_out`` outputs for ``keys`` ``[..., d_mlp]``: ``keys @ W_out + b_out``
        ``[..., d_model]`` (no bias where the MLP has none), before any post-MLP norm
        (ROME's value space)."""
        weight = self.w_out(layer)
        value = keys.to(weight.dtype) @ weight
        bias = getattr(self.block(layer).mlp, "b_out", None)
        return value if bias is None else value + bias

    def block(self, layer: int) -> torch.nn.Module:
        """Transformer block ``layer`` (call it as ``block(resid, past_kv_cache_entry=...)``)."""
        return self.model.blocks[self.check_layer(layer)]

    def w_o(self, layer: int) -> torch.Tensor:
        """Attention output weights of ``layer``, ``[head, d_head, d_model]``."""
        return self.block(layer).attn.W_O

    @property
    def w_e(self) -> torch.Tensor:
        """The token embedding matrix, ``[d_vocab, d_model]``."""
        return self.model.embed.W_E

    def final_logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the residual stream after the last block: ``[..., d_model] -> [..., d_vocab]``.

        As the model's forward computes them: the final norm (if the model has
        one), the unembedding, and the output soft cap (if set).
        """
        if hasattr(self.model, "ln_final"):
            resid = self.model.ln_final(resid)
        logits = self.model.unembed(resid)
        cap = getattr(self.model.cfg, "output_logits_soft_cap", 0.0) or 0.0
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def kv_cache(self, batch: int):
        """An empty TransformerLens key-value cache for ``batch`` rows."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache  # noqa: PLC0415

        return TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, batch)

    def kv_entry(self, keys: torch.Tensor, values: torch.Tensor):
        """A frozen cache entry of earlier positions' ``keys`` and ``values``
        ``[batch, pos, head, d_head]``, for ``block(layer)(resid, past_kv_cache_entry=...)``."""
        from transformer_lens.cache.key_value_cache_entry import (  # noqa: PLC0415 (lazy, as kv_cache)
            TransformerLensKeyValueCacheEntry,
        )

        return TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)


    @property
    def n_bos(self) -> int:
        """How many tokens the model puts before a text (1 with a BOS token, else 0)."""
        return int(self.prepend_bos)

    @property
    def bos(self) -> list[int]:
        """The ids put before every text: ``[bos_token_id]`` or ``[]``."""
        return [self.model.tokenizer.bos_token_id] if self.prepend_bos else []

    def token_ids(self, text: str) -> list[int]:
        """The ids of ``text`` alone, with no BOS token."""
        return self.tokenize(text)[0][0, self.n_bos:].tolist()

    def as_tokens(self, rows: list[list[int]] | list[int]) -> torch.Tensor:
        """``rows`` of ids as a long tensor on the model's device (``[rows, pos]`` or ``[pos]``)."""
        return torch.tensor(rows, device=self.device)

    def tokenize(self, text: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Tokens ``[1, pos]`` and each token's character span in ``text``.

        A prepended BOS token gets the empty span ``(0, 0)``.
        """
        tokenizer = self.model.tokenizer
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        spans = [tuple(span) for span in encoding["offset_mapping"]]
        if self.prepend_bos:
            ids = [tokenizer.bos_token_id] + ids
            spans = [(0, 0)] + spans
        return torch.tensor([ids], device=self.model.cfg.device), spans

    def token_strings(self, tokens: torch.Tensor) -> list[str]:
        """Decoded text of each token in ``tokens`` ``[1, pos]``."""
        return [self.model.tokenizer.decode([int(t)]) for t in tokens[0]]

    def decode(self, ids: list[int]) -> str:
        """The text of token ``ids``."""
        return self.model.tokenizer.decode(ids)

    @property
    def pad_id(self) -> int:
        """The id that pads rows to one length (the tokenizer's pad token, else 0)."""
        pad = self.model.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @property
    def eos_id(self) -> int | None:
        """The end-of-text id (None when the tokenizer has none)."""
        return self.model.tokenizer.eos_token_id

    @property
    def special_ids(self) -> list[int]:
        """The ids of the tokenizer's special tokens (BOS, EOS, padding, ...) that the
        model has, sorted (a bridge's tokenizer may have gained a pad token past them)."""
        ids = self.model.tokenizer.all_special_ids
        return sorted({i for i in ids if i is not None and i < self.d_vocab})

    @contextlib.contextmanager
    def cast(self, dtype: torch.dtype) -> Iterator[Model]:
        """Run the model in ``dtype`` inside the block; the original tensors come back after.

        The float32 parameters are set aside, not converted back, so the model
        leaves the block bit for bit as it entered.
        """
        model = self.model
        if dtype == model.cfg.dtype:
            yield model
            return
        originals = [(t, t.data) for t in [*model.parameters(), *model.buffers()]
                     if t.is_floating_point()]
        original_dtype = model.cfg.dtype
        try:
            for tensor, data in originals:
                tensor.data = data.to(dtype)
            model.cfg.dtype = dtype
            yield model
        finally:
            for tensor, data in originals:
                tensor.data = data
            model.cfg.dtype = original_dtype

    def embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """What ``hook_embed`` sees for ``tokens`` ``[batch, pos]``: ``[batch, pos, d_model]``."""
        return self.model.embed(tokens)

    # -- what differs between backends ---------------------------------------------------

    @property
    def native_blocks(self) -> bool:
        """Whether the blocks are TransformerLens' own modules: callable one at a time
        with cache entries (:meth:`kv_cache`, :meth:`kv_entry`, :meth:`block`), with
        their attention methods (attribution's QK fix)."""
        return True

    @property
    def has_kv_cache(self) -> bool:
        """Whether blocks run one at a time from TransformerLens cache entries."""
        return self.native_blocks

    def w_out_parameter(self, layer: int) -> torch.nn.Parameter:
        """The parameter that holds ``W_out`` of ``layer`` (what an optimiser takes)."""
        return self.w_out(layer)

    def after_blocks(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits of residual streams after the last block, ``[batch, pos, d_model]``."""
        return self.model(resid, start_at_layer=self.n_layers)

    def resid_before(self, tokens: torch.Tensor, layer: int, hooks: Sequence[Hook] = ()
                     ) -> torch.Tensor:
        """The residual stream entering block ``layer`` (``n_layers``: after the last block)
        for ``tokens`` ``[batch, pos]``, with ``hooks`` attached; blocks above it do not run."""
        with attached(self.model, hooks):
            return self.model(tokens, stop_at_layer=layer)

    def upper_logits(self, tokens: torch.Tensor, layer: int):
        """A function computing the logits of ``tokens`` with gradients to the weights of
        block ``layer`` and above (the blocks below run once, now, without gradients)."""
        with torch.no_grad():
            resid = self.resid_before(tokens, layer)
        return lambda: self.model(resid, start_at_layer=layer)

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position ``[batch, d_vocab]`` (the others are not unembedded)."""
        residual = self.resid_before(tokens, self.n_layers)
        return self.model(residual[:, -1:], start_at_layer=self.n_layers)[:, -1]

    def fingerprint_tensors(self) -> list[torch.Tensor]:
        """Weights edits never change, in TransformerLens' layout: ``W_E`` and each ``W_in``."""
        return [self.model.embed.W_E] + [block.mlp.W_in for block in self.model.blocks]
