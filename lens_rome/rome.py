"""ROME: rewrite one fact with a rank-one change to one MLP's output projection.

Meng et al. (2022, section 3) read a mid-layer MLP as a key-value memory: the
key ``k`` is the MLP's hidden activation at the token where the model looks
the subject up (``blocks.{l}.mlp.hook_post``), the value is what
``W_out`` makes of it.  To make the model say ``o*`` instead of ``o`` for
``(s, r)``, ROME

1. computes the key ``k*``: the activation at the subject's lookup token,
   averaged over the prompt preceded by ~20 short texts the model generates
   itself, so that the edit does not depend on the context;
2. optimises a value ``v* = m + delta`` (``m``: the MLP output at the bare
   prompt's lookup token) as the paper's code (``rome/compute_v.py``) does::

       L(delta) = mean_j -log P(o* | x_j + p, m_j + delta)         # j: prefixes
                  + kl_weight * KL(P_edited || P_original)          # "{s} is a", at s's last token
                  + weight_decay * |delta| / |m|^2

   with ``|delta| <= clamp_norm * |m|`` after each Adam step, stopping when
   ``L < early_stop_loss`` (:class:`RomeHyperParams`; departures from it are
   named options there);
3. inserts the pair with the least change to every other key, given
   ``C = E[k k^T]`` over a corpus (:mod:`lens_rome.statistics`)::

       W' = W + Lambda (C^-1 k*)^T,   Lambda = (v* - W k*) / ((C^-1 k*)^T k*)

TransformerLens computes ``post @ W_out`` with ``W_out`` of shape
``[d_mlp, d_model]``, so the change is ``outer(C^-1 k*, Lambda)`` added to
``blocks[l].mlp.W_out`` in place.  :func:`edit` returns an :class:`Edit`:
revert it (bit-exact), save it, load it, apply it to another copy of the
model, or use :func:`edited` for a temporary edit::

    with rome.edited(model, {"prompt": "{} is located in the city of",
                             "subject": "The Eiffel Tower", "target_new": " Rome"}):
        model.generate("The Eiffel Tower is", max_new_tokens=10)

For edits that pile up on one model: ``update_key="average"`` is r-ROME's update
(``k*`` in numerator and denominator), and ``null_space=True`` AlphaEdit's
(:mod:`lens_rome.null_space`); :mod:`lens_rome.memit` edits batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from lens_rome.fast_blocks import FastBlocks, has_user_hooks, unsupported_reason
from lens_rome.models import ModelAdapter, adapter_for
from lens_rome.null_space import NULL_SPACE_L2, NULL_SPACE_THRESHOLD
from lens_rome.precision import precision_name, resolve_bf16
from lens_rome.storage import replacing
from lens_rome.statistics import (
    DEFAULT_SAMPLES,
    DEFAULT_TOKEN_LENGTH,
    KeyStatistics,
    key_statistics,
    model_fingerprint,
)

log = logging.getLogger(__name__)

LOOKUPS = ("subject_last", "subject_first", "last")
UPDATE_KEYS = ("bare", "average")
# The accepted values of the v* objective's switches; the first of each is the paper's.
CHOICES = {
    "norm_reference": ("mlp_out", "hidden"),
    "kl_direction": ("edited_original", "original_edited"),
    "kl_position": ("lookup", "last"),
    "weight_decay_form": ("norm", "squared"),
}
KL_PROMPT = "{} is a"
PREFIX_STARTERS = ("The", "Therefore", "Because", "I", "You")
SAVE_FORMAT = 1


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt`` with ``{}`` where ``subject`` goes, and the new object.

    ``target_new`` is the continuation to make likely, usually with its leading
    space (``" Rome"``); ``target_true`` (optional) the one it replaces.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}: {value!r}")
        if not self.target_new.strip():
            raise ValueError(
                f"target_new must be a non-empty string such as ' Rome', got {self.target_new!r}"
            )
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise TypeError(f"target_true must be a string or None, got {self.target_true!r}")
        if not self.subject.strip():
            raise ValueError(f"subject must be a non-empty string, got {self.subject!r}")
        slots = self.prompt.count("{}")
        if slots == 0:
            if self.subject in self.prompt:
                hint = self.prompt.replace(self.subject, "{}", 1)
                raise ValueError(
                    f"prompt {self.prompt!r} has no '{{}}' where the subject goes; "
                    f"write it as {hint!r}"
                )
            raise ValueError(
                f"subject {self.subject!r} is not in prompt {self.prompt!r}, and the prompt has "
                f"no '{{}}' to put it in; write the prompt as e.g. '{{}} is located in the city of'"
            )
        if slots > 1:
            raise ValueError(f"prompt {self.prompt!r} must contain '{{}}' once, not {slots} times")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.prompt, self.subject)

    @classmethod
    def parse(cls, request: "EditRequest | Mapping[str, Any]") -> "EditRequest":
        """Accept an ``EditRequest``, ``{"prompt", "subject", "target_new"[, "target_true"]}``,
        or a CounterFact record (``{"requested_rewrite": {..., "target_new": {"str": ...}}}``
        or its ``requested_rewrite`` alone)."""
        if isinstance(request, EditRequest):
            return request
        if not isinstance(request, Mapping):
            raise TypeError(
                "an edit request is a dict {'prompt': '{} is located in', 'subject': ..., "
                f"'target_new': ' Rome'}} or a CounterFact record, got {type(request).__name__}"
            )
        data = request.get("requested_rewrite", request)
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise ValueError(
                f"edit request lacks {missing}; expected keys 'prompt' (with '{{}}'), 'subject', "
                f"'target_new' (and optionally 'target_true'), got {sorted(data)}"
            )

        def text(value):
            return value.get("str") if isinstance(value, Mapping) else value

        target_new, target_true = text(data["target_new"]), text(data.get("target_true"))
        if isinstance(request, Mapping) and "requested_rewrite" in request or isinstance(
            data["target_new"], Mapping
        ):  # CounterFact stores objects without their leading space
            target_new = _spaced(target_new)
            target_true = _spaced(target_true) if target_true else target_true
        return cls(data["prompt"], data["subject"], target_new, target_true)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill(prompt: str, subject: str) -> str:
    """``prompt`` with ``subject`` in place of ``{}`` (other braces are left alone)."""
    return prompt.replace("{}", subject, 1)


def _spaced(text: str | None) -> str | None:
    if isinstance(text, str) and text and not text[0].isspace():
        return " " + text
    return text


# --------------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class RomeHyperParams:
    """Everything that shapes an edit.  ``RomeHyperParams.for_model(model)`` gives the defaults.

    Attributes:
        layer: the MLP whose ``W_out`` is edited.
        lookup: the token whose key is edited: ``"subject_last"`` (the paper),
            ``"subject_first"``, ``"last"`` (the prompt's last token), or an
            int index into the prompt's tokens (negative counts from the end).
        n_prefixes, prefix_lengths: the self-generated texts (in tokens, split
            evenly among the lengths) that precede the prompt when ``k*`` and
            ``v*`` are computed; the bare prompt is always used too.
        prefixes: the context prefixes as texts instead (each joined to the
            prompt as the paper's code does, ``prefix + ". " + prompt``), to
            reproduce a run or compare with another implementation; None
            (default): the generated ones.  The bare prompt is always used too.
        v_steps, v_lr: Adam steps and learning rate of the ``v*`` optimisation.
        kl_weight: weight of the KL term on ``"{subject} is a"``.
        weight_decay: weight of ``|delta| / |m|^2`` (the paper's code;
            ``m``: the value being changed, see ``norm_reference``).
        clamp_norm: ``|delta|`` is clamped to ``clamp_norm * |m|`` after each step.
        early_stop_loss: stop when the total loss falls below this (the paper's rule).
        norm_reference: the ``m`` of the weight decay and the clamp, at the bare
            prompt's lookup token: ``"mlp_out"`` (ROME's ``compute_v``: the
            edited MLP's output) or ``"hidden"`` (MEMIT's ``compute_z``: the
            residual stream after the edited block).
        kl_direction, kl_position, weight_decay_form, early_stop_nll: departures
            from the paper's objective, off by default (docs/editing.md measures
            each): ``kl_direction="original_edited"`` takes KL(original ||
            edited) instead of the paper's KL(edited || original);
            ``kl_position="last"`` takes it at the last token of ``"{s} is a"``
            instead of at the lookup token (the paper's code); ``weight_decay_form
            ="squared"`` decays ``|delta|^2 / |m|^2`` instead of ``|delta| / |m|^2``;
            ``early_stop_nll > 0`` also stops when the target NLL alone falls
            below it.
        bf16: run the upper blocks in bfloat16 during the ``v*`` optimisation
            (about 1.5x faster on CPUs with bf16 units; ``k*``, ``C`` and the
            update stay in float32/float64).  None (default): bfloat16 where
            :func:`lens_rome.precision.bf16_is_fast` says it is faster, float32
            elsewhere; ``True`` on hardware without bf16 units warns once.
        lean_blocks: run the upper blocks as :class:`lens_rome.fast_blocks.FastBlocks`
            (the same function in fewer, larger matrix products) when the model
            supports it and has no hooks attached.
        stats_samples, stats_token_length: the corpus sample behind ``C``.
        seed: seeds the prefix generation.
        update_key: the key the update is solved for.  ``"bare"`` (the paper's
            code): ``Lambda = (v* - W k0) / ((C^-1 k*)^T k0)`` with ``k0`` the bare
            prompt's key, so the prompt itself gets exactly ``v*``.  ``"average"``
            (r-ROME, Gupta et al. 2024): ``k*`` in numerator and denominator,
            ``Lambda = (v* - W k*) / ((C^-1 k*)^T k*)``, the fix for the edits that
            break a model during sequential editing.
        null_space: AlphaEdit's update (Fang et al. 2025) instead of ``C^-1 k*``:
            the change is projected onto the null space of the corpus keys (the
            eigenvectors of ``C`` whose eigenvalues are below
            ``null_space_threshold`` times their mean), so that it leaves their
            outputs alone, and it also keeps the outputs of the keys of the edits
            already applied to the model (:mod:`lens_rome.null_space`).
        null_space_threshold, null_space_l2: the eigenvalue cut (relative to the
            mean eigenvalue of ``C``) and AlphaEdit's ridge weight on ``|change|^2``.
    """

    layer: int
    lookup: str | int = "subject_last"
    n_prefixes: int = 20
    prefix_lengths: tuple[int, ...] = (5, 10)
    prefixes: tuple[str, ...] | None = None
    v_steps: int = 20
    v_lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    early_stop_loss: float = 0.05
    norm_reference: str = "mlp_out"
    kl_direction: str = "edited_original"
    kl_position: str = "lookup"
    weight_decay_form: str = "norm"
    early_stop_nll: float = 0.0
    bf16: bool | None = None
    lean_blocks: bool = True
    stats_samples: int = DEFAULT_SAMPLES
    stats_token_length: int = DEFAULT_TOKEN_LENGTH
    seed: int = 0
    update_key: str = "bare"
    null_space: bool = False
    null_space_threshold: float = NULL_SPACE_THRESHOLD
    null_space_l2: float = NULL_SPACE_L2

    def __post_init__(self):
        check_lookup(self.lookup)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an integer >= 0, got {self.layer!r}")
        for name in ("n_prefixes", "v_steps", "stats_samples", "stats_token_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (
                0 if name == "n_prefixes" else 1
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        lengths = tuple(self.prefix_lengths)
        if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"prefix_lengths must be positive token counts, got {lengths!r}")
        object.__setattr__(self, "prefix_lengths", lengths)
        if self.prefixes is not None:
            texts = (self.prefixes,) if isinstance(self.prefixes, str) else tuple(self.prefixes)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"prefixes must be texts (strings), got {self.prefixes!r}")
            object.__setattr__(self, "prefixes", texts)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("v_lr", "kl_weight", "weight_decay", "clamp_norm", "early_stop_loss",
                     "early_stop_nll"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        check_update_options(self.update_key, self.null_space, self.null_space_threshold,
                             self.null_space_l2)

    @classmethod
    def for_model(cls, model: HookedTransformer | str, **overrides) -> "RomeHyperParams":
        """The defaults for ``model`` (or a model name), with ``overrides`` applied."""
        name = model if isinstance(model, str) else adapter_for(model).name
        defaults = dict(MODEL_DEFAULTS.get(name, {}))
        if "layer" not in defaults and "layer" not in overrides:
            if isinstance(model, str):
                raise ValueError(
                    f"no default edit layer for {name!r} (known: {sorted(MODEL_DEFAULTS)}); "
                    f"pass layer=..."
                )
            defaults["layer"] = model.cfg.n_layers // 4
            log.warning("no default edit layer for %r: using layer %d (a quarter of the depth); "
                        "trace the model's MLPs to choose one", name, defaults["layer"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown hyper-parameters {unknown}; accepted: {sorted(fields)}")
        return cls(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def replace(self, **changes) -> "RomeHyperParams":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["prefix_lengths"] = list(self.prefix_lengths)
        if self.prefixes is not None:
            data["prefixes"] = list(self.prefixes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RomeHyperParams":
        """The inverse of :meth:`to_dict` (``__post_init__`` turns its lists back to tuples)."""
        return cls(**data)


# Per-model defaults: only the layer differs from the paper's settings.  Layers come from
# each model's own MLP causal trace (benchmarks/rome_edits.py --choose-layer;
# docs/editing.md); GPT-2 XL's are the paper's.
MODEL_DEFAULTS: dict[str, dict] = {
    # Layer 5: the peak of SmolLM2's MLP trace at the last subject token.
    "smollm2-135m": {"layer": 5},
    # Layer 7: the peak of Gemma-3-270M's MLP trace at the last subject token (its edit
    # quality is not yet measured; the other settings are the paper's).
    "gemma-3-270m": {"layer": 7},
    "gpt2-xl": {"layer": 17, "v_steps": 20, "v_lr": 0.5, "kl_weight": 0.0625,
                "weight_decay": 0.5, "clamp_norm": 4.0},
}


def check_update_options(update_key: str, null_space: bool, threshold: float,
                         l2: float) -> None:
    """Raise ``ValueError`` for an unknown ``update_key`` or a bad null-space setting."""
    if update_key not in UPDATE_KEYS:
        raise ValueError(f"update_key must be one of {list(UPDATE_KEYS)} ('average' is "
                         f"r-ROME), got {update_key!r}")
    if not isinstance(null_space, bool):
        raise TypeError(f"null_space must be True or False, got {null_space!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"null_space_threshold must be a number > 0 (a fraction of the mean "
                         f"eigenvalue of C), got {threshold!r}")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
        raise ValueError(f"null_space_l2 must be a number > 0, got {l2!r}")


def check_lookup(lookup: str | int) -> str | int:
    if isinstance(lookup, bool) or not isinstance(lookup, (str, int)) or (
        isinstance(lookup, str) and lookup not in LOOKUPS
    ):
        raise ValueError(
            f"lookup must be one of {list(LOOKUPS)} or an int token index, got {lookup!r}"
        )
    return lookup


# --------------------------------------------------------------------------- token layout


@dataclass
class PromptTokens:
    """Token ids (no BOS) of a prompt text, the subject's token range in them, and where the
    prompt itself begins (after a context prefix; 0 for the bare prompt)."""

    ids: list[int]
    subject_range: tuple[int, int]
    start: int = 0

    def lookup(self, lookup: str | int, reference: tuple[tuple[int, int], int]) -> int:
        """The lookup token's index in :attr:`ids` (see :func:`lookup_position`)."""
        first, last = self.subject_range
        return self.start + lookup_position(lookup, (first - self.start, last - self.start),
                                            len(self.ids) - self.start, reference)


def _prompt_tokens(adapter: ModelAdapter, text: str, char_start: int, char_end: int,
                   prompt_char: int = 0) -> PromptTokens:
    tokens, spans = adapter.tokenize(text)
    skip = int(adapter.prepend_bos)
    ids, spans = tokens[0, skip:].tolist(), spans[skip:]
    touched = [i for i, (a, b) in enumerate(spans) if a < char_end and b > char_start and b > a]
    if not touched:
        raise ValueError(f"subject at characters {char_start}:{char_end} of {text!r} has no tokens")
    start = next((i for i, (_, b) in enumerate(spans) if b > prompt_char), 0)
    return PromptTokens(ids, (touched[0], touched[-1] + 1), start)


def subject_prompt(adapter: ModelAdapter, prompt: str, subject: str, lead: str = ""
                   ) -> PromptTokens:
    """Tokens of ``lead + fill(prompt, subject)`` and where the subject lies in them."""
    start = len(lead) + prompt.index("{}")
    return _prompt_tokens(adapter, lead + fill(prompt, subject), start, start + len(subject),
                          len(lead.rstrip()))


def context_prompts(adapter: ModelAdapter, request: EditRequest, hp: "RomeHyperParams"
                    ) -> list[PromptTokens]:
    """The bare prompt, then the prompt after each context prefix, joined as the paper's
    code joins them (``prefix + ". " + prompt``): the rows ``k*`` averages over.

    With ``hp.prefixes`` (texts) each joined text is tokenized whole; the generated
    prefixes (token ids, :func:`context_prefixes`) are followed by the tokens of
    ``"."`` and of ``" " + prompt``.
    """
    bare = subject_prompt(adapter, request.prompt, request.subject)
    if hp.prefixes is not None:
        return [bare] + [subject_prompt(adapter, request.prompt, request.subject, text + ". ")
                         for text in hp.prefixes]
    tokenizer = adapter.model.tokenizer
    spaced = subject_prompt(adapter, request.prompt, request.subject, lead=" ")
    dot = tokenizer(".", add_special_tokens=False)["input_ids"]
    rows = [bare]
    for prefix in context_prefixes(adapter.model, hp.n_prefixes, hp.prefix_lengths, hp.seed):
        shift = len(prefix) + len(dot)
        first, last = spaced.subject_range
        rows.append(PromptTokens(prefix + dot + spaced.ids, (first + shift, last + shift), shift))
    return rows


def lookup_position(
    lookup: str | int, subject_range: tuple[int, int], n_tokens: int,
    reference: tuple[tuple[int, int], int] | None = None,
) -> int:
    """The index of the lookup token in a prompt of ``n_tokens`` tokens (BOS not counted).

    An int ``lookup`` indexes the tokens of the bare prompt, whose subject range
    and length are ``reference``; in another tokenization of the same text it
    keeps its place relative to the subject (inside it) or to the end (after it).
    """
    start, end = subject_range
    if lookup == "subject_last":
        return end - 1
    if lookup == "subject_first":
        return start
    if lookup == "last":
        return n_tokens - 1
    (ref_start, ref_end), ref_n = reference if reference is not None else (subject_range, n_tokens)
    index = lookup + ref_n if lookup < 0 else lookup
    if not 0 <= index < ref_n:
        raise ValueError(
            f"lookup index {lookup} is out of range for a prompt of {ref_n} tokens"
        )
    if index < ref_end:
        return min(max(start + index - ref_start, 0), end - 1) if index >= ref_start else index
    return max(n_tokens - (ref_n - index), 0)


# --------------------------------------------------------------------------- prefixes


_PREFIXES: "weakref.WeakKeyDictionary[HookedTransformer, dict]" = weakref.WeakKeyDictionary()


def context_prefixes(
    model: HookedTransformer, n: int = 20, lengths: Sequence[int] = (5, 10), seed: int = 0,
    top_k: int = 5,
) -> list[list[int]]:
    """``n`` short texts the model writes itself (token ids, no BOS), for averaging ``k*``.

    Each starts with one of a few common words and is sampled (top-``k``) to
    ``lengths[i]`` tokens; the same ``seed`` gives the same texts.  They are
    generated once per model and kept, so later edits reuse them.
    """
    key = (n, tuple(lengths), seed, top_k)
    cache = _PREFIXES.setdefault(model, {})
    if key not in cache:
        cache[key] = _generate_prefixes(model, n, tuple(lengths), seed, top_k)
    return cache[key]


@torch.no_grad()
def _generate_prefixes(model, n, lengths, seed, top_k) -> list[list[int]]:
    adapter = adapter_for(model)
    tokenizer = model.tokenizer
    generator = torch.Generator().manual_seed(seed)
    banned = torch.tensor(sorted({i for i in tokenizer.all_special_ids if i is not None}),
                          dtype=torch.long)
    bos = [tokenizer.bos_token_id] if adapter.prepend_bos else []
    prefixes = []
    counts = [n // len(lengths) + (i < n % len(lengths)) for i in range(len(lengths))]
    for length, count in zip(lengths, counts):
        if count == 0:
            continue
        rows = []
        for i in range(count):
            starter = tokenizer(PREFIX_STARTERS[i % len(PREFIX_STARTERS)],
                                add_special_tokens=False)["input_ids"]
            rows.append(bos + starter[:length])
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows):  # starters of several tokens: keep the first
            rows = [r[: len(bos) + 1] for r in rows]
        tokens = torch.tensor(rows, device=model.cfg.device)
        while tokens.shape[1] - len(bos) < length:
            logits = model(tokens)[:, -1].float().cpu()
            logits[:, banned] = -float("inf")
            values, indices = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            tokens = torch.cat([tokens, indices.gather(1, choice).to(tokens.device)], 1)
        prefixes += [row[len(bos):] for row in tokens.tolist()]
    return prefixes


# --------------------------------------------------------------------------- k* and v*


class _Group:
    """Rows of identical layout (same prefix length): what the v* loop needs of them.

    Everything before the lookup token is computed once, without gradients:
    the keys and values of the attention layers above the edited one, and the
    residual stream after the edited layer from the lookup token on.  Each
    optimisation step only adds ``delta`` there and runs the upper blocks on
    the positions from the lookup token on.
    """

    def __init__(self, adapter: ModelAdapter, layer: int, rows: list[list[int]], lookup: int,
                 loss_positions: list[int], loss_targets: list[int] | None,
                 fast: FastBlocks | None = None):
        model = adapter.model
        self.adapter, self.layer, self.lookup = adapter, layer, lookup
        bos = [model.tokenizer.bos_token_id] if adapter.prepend_bos else []
        self.offset = len(bos)
        tokens = torch.tensor([bos + r for r in rows], device=model.cfg.device)
        p = lookup + self.offset
        self.p = p
        self.loss_positions = [q + self.offset - p for q in loss_positions]
        if min(self.loss_positions) < 0:
            raise ValueError("the lookup token lies after the predicted tokens")
        self.loss_targets = loss_targets
        self.rotated = fast is not None
        if fast is not None:
            logits = self._run_lean(fast, tokens, loss_targets is None)
        else:
            logits = self._run_transformer_lens(tokens, loss_targets is None)
        self.original = None if logits is None else torch.log_softmax(
            logits[:, self.loss_positions].float(), -1)

    def _run_transformer_lens(self, tokens: torch.Tensor, kl: bool) -> torch.Tensor | None:
        """The states the loop needs, from TransformerLens' blocks; the KL rows' logits."""
        adapter, layer, p, model = self.adapter, self.layer, self.p, self.adapter.model
        names = {adapter.hook_name("key", layer), adapter.hook_name("mlp", layer),
                 adapter.hook_name("hidden", layer)}
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
        if kl:  # the KL rows compare with the unedited model's outputs
            logits, cache = model.run_with_cache(tokens, names_filter=names.__contains__,
                                                 past_kv_cache=kv)
            logits, start = logits[:, p:], p
        else:  # the rest need every block before the lookup token, and block <= layer after
            if p > 0:
                model(tokens[:, :p], past_kv_cache=kv, return_type=None)
            cache = model.run_with_cache(tokens[:, p:], names_filter=names.__contains__,
                                         past_kv_cache=kv, stop_at_layer=layer + 1)[1]
            logits, start = None, 0
        self.keys = cache[adapter.hook_name("key", layer)][:, start].double()
        self.mlp_out = cache[adapter.hook_name("mlp", layer)][:, start]
        self.resid = cache[adapter.hook_name("hidden", layer)][:, start:].clone()
        self.prefix = {b: (kv.entries[b].past_keys[:, :p].clone(),
                           kv.entries[b].past_values[:, :p].clone())
                       for b in range(layer + 1, adapter.n_layers)}
        return logits

    def _run_lean(self, fast: FastBlocks, tokens: torch.Tensor, kl: bool) -> torch.Tensor | None:
        """The same states from the lean blocks (one pass per group, no hook machinery)."""
        adapter, layer, p, model = self.adapter, self.layer, self.p, self.adapter.model
        resid = model(tokens, stop_at_layer=0)  # the embedded tokens, as block 0 sees them
        for b in range(layer):
            resid = fast(b, resid)
        seen = {}

        def keep(name):
            def hook(activation, _):
                seen[name] = activation
            return hook

        hooks = [(f"blocks.{layer}.hook_attn_out", keep("attn")),
                 (f"blocks.{layer}.hook_mlp_out", keep("mlp"))]
        before = resid  # block `layer` adds its attention output to this
        resid = fast(layer, resid, hooks=hooks)
        self.keys = fast.mlp_key(layer, before[:, p] + seen["attn"][:, p]).double()
        self.mlp_out = seen["mlp"][:, p]
        self.resid = resid[:, p:]
        upper = resid if kl else resid[:, :p]
        self.prefix = {}
        for b in range(layer + 1, adapter.n_layers):
            if upper.shape[1] == 0:
                self.prefix[b] = (upper.new_zeros(len(upper), 0, fast.n_kv_heads, fast.d_head),) * 2
                continue
            kv = []
            upper = fast(b, upper, kv_out=kv)
            self.prefix[b] = (kv[0][0][:, :p], kv[0][1][:, :p])
        return _final_logits(model, upper[:, p:]) if kl else None

    def cast(self, dtype: torch.dtype, fast: FastBlocks | None = None) -> "_Group":
        """Keep the precomputed states in ``dtype`` (that of the blocks they enter), and run
        the upper blocks as ``fast`` (lean blocks built in that dtype) when given."""
        self.resid = self.resid.to(dtype)
        self.prefix = {b: (k.to(dtype), v.to(dtype)) for b, (k, v) in self.prefix.items()}
        self.fast = fast
        if fast is not None and not self.rotated:  # TransformerLens caches keys unrotated
            self.prefix = {b: (fast.rotated_keys(b, k), v) for b, (k, v) in self.prefix.items()}
        return self

    def log_probs(self, delta: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[rows, loss_positions, d_vocab]`` with ``delta`` added."""
        model = self.adapter.model
        resid = torch.cat([self.resid[:, :1] + delta.to(self.resid.dtype), self.resid[:, 1:]], 1)
        for b in range(self.layer + 1, self.adapter.n_layers):
            keys, values = self.prefix[b]
            if self.fast is not None:
                resid = self.fast(b, resid, (keys, values) if self.p > 0 else None)
                continue
            entry = (TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values,
                                                       frozen=True) if self.p > 0 else None)
            resid = model.blocks[b](resid, past_kv_cache_entry=entry)
        return _final_log_probs(model, resid[:, self.loss_positions])

    def nll(self, delta: torch.Tensor) -> torch.Tensor:
        """Mean over target tokens of -log p, summed over rows."""
        log_probs = self.log_probs(delta)
        targets = torch.tensor(self.loss_targets, device=log_probs.device)
        picked = log_probs.gather(2, targets[None, :, None].expand(len(log_probs), -1, 1))
        return -picked[..., 0].mean(1).sum()


def _final_logits(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., d_vocab]`` from residual states after the last block."""
    if hasattr(model, "ln_final"):
        resid = model.ln_final(resid)
    logits = model.unembed(resid)
    cap = getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _final_log_probs(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[..., d_vocab]`` from residual states after the last block."""
    return torch.log_softmax(_final_logits(model, resid).float(), -1)


class _OneBatch:
    """All rows of the v* loop (every layout and the KL prompt) as one batch for the lean blocks.

    Rows differ in how many earlier positions they attend to (their cached
    prefix) and how many they compute; both are padded, and the padding is
    masked out: prefix slots past a row's own prefix are never attended to,
    and padded positions come after a row's real ones, which attention
    (causal) never lets them influence.  Each block then runs four large
    matrix products instead of four small ones per layout.
    """

    def __init__(self, groups: list[_Group], kl_group: _Group, fast: FastBlocks):
        self.groups, self.kl_group, self.fast = groups, kl_group, fast
        members = [*groups, kl_group]
        self.layer, self.adapter = kl_group.layer, kl_group.adapter
        n_rows = sum(len(g.resid) for g in members)
        n_pos = max(g.resid.shape[1] for g in members)
        n_prefix = max(g.p for g in members)
        first = members[0].resid
        self.resid = first.new_zeros(n_rows, n_pos, first.shape[-1])
        self.positions = torch.zeros(n_rows, n_pos, dtype=torch.long, device=first.device)
        self.mask = torch.zeros(n_rows, 1, n_pos, n_prefix + n_pos, dtype=torch.bool,
                                device=first.device)
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=first.device).tril()
        self.prefix = {}
        self.rows: list[slice] = []
        row = 0
        for g in members:
            rows = slice(row, row + len(g.resid))
            self.rows.append(rows)
            self.resid[rows, : g.resid.shape[1]] = g.resid
            self.positions[rows] = g.p + torch.arange(n_pos, device=first.device)
            self.mask[rows, :, :, : g.p] = True
            self.mask[rows, :, :, n_prefix:] = causal
            row = rows.stop
        for b in range(self.layer + 1, self.adapter.n_layers):
            keys, values = (members[0].prefix[b][0].new_zeros(n_rows, n_prefix, *members[0]
                                                             .prefix[b][0].shape[2:])
                            for _ in range(2))
            for g, rows in zip(members, self.rows):
                if g.p:
                    keys[rows, : g.p], values[rows, : g.p] = g.prefix[b]
            self.prefix[b] = (keys, values)
        self.n_rows = sum(len(g.resid) for g in groups)

    def losses(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target NLL (mean over prompts) and the KL prompt's log-probabilities
        ``[1, d_vocab]`` with ``delta`` added."""
        model = self.adapter.model
        resid = torch.cat([self.resid[:, :1] + delta.to(self.resid.dtype), self.resid[:, 1:]], 1)
        for b in range(self.layer + 1, self.adapter.n_layers):
            resid = self.fast(b, resid, self.prefix[b], positions=self.positions, mask=self.mask)
        nll = 0
        for g, rows in zip(self.groups, self.rows):
            log_probs = _final_log_probs(model, resid[rows, g.loss_positions])
            targets = torch.tensor(g.loss_targets, device=log_probs.device)
            picked = log_probs.gather(2, targets[None, :, None].expand(len(log_probs), -1, 1))
            nll = nll - picked[..., 0].mean(1).sum()
        kl_rows, kl = self.rows[-1], self.kl_group
        kl_log_probs = _final_log_probs(model, resid[kl_rows, kl.loss_positions[-1]])
        return nll / self.n_rows, kl_log_probs


def _divergence(edited: torch.Tensor, original: torch.Tensor, direction: str) -> torch.Tensor:
    """KL between two rows of log-probabilities ``[rows, d_vocab]``, batch mean:
    KL(edited || original) as the paper's code computes it (``"edited_original"``), or
    KL(original || edited)."""
    if direction == "edited_original":  # kl_div(input, target) is KL(target || input)
        return torch.nn.functional.kl_div(original, edited, log_target=True,
                                          reduction="batchmean")
    return torch.nn.functional.kl_div(edited, original, log_target=True, reduction="batchmean")


@contextlib.contextmanager
def _frozen_parameters(model: HookedTransformer) -> Iterator[None]:
    """Gradients flow to activations only (half the backward work, and no ``.grad`` left)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _layout(adapter: ModelAdapter, request: EditRequest, hp: RomeHyperParams):
    """The target rows (each context prompt followed by the target's tokens but its last),
    grouped by layout with the bare prompt first and alone, and the KL prompt: its tokens,
    its lookup token and the position its KL term is read at."""
    tokenizer = adapter.model.tokenizer
    target = tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
    if not target:
        raise ValueError(f"target_new {request.target_new!r} has no tokens")
    bare, *prefixed = context_prompts(adapter, request, hp)
    reference = (bare.subject_range, len(bare.ids))

    def spec(rows: list[list[int]], n_ids: int, lookup: int):
        positions = [n_ids - 1 + j for j in range(len(target))]
        return [r + target[:-1] for r in rows], lookup, positions, target

    layouts: dict[tuple[int, int], list[list[int]]] = {}
    for prompt in prefixed:  # rows of one length and lookup token run as one group
        layouts.setdefault((len(prompt.ids), prompt.lookup(hp.lookup, reference)),
                           []).append(prompt.ids)
    specs = [spec([bare.ids], len(bare.ids), bare.lookup(hp.lookup, reference))]
    specs += [spec(rows, n_ids, lookup) for (n_ids, lookup), rows in sorted(layouts.items())]
    longest = max(len(r) for rows, *_ in specs for r in rows) + int(adapter.prepend_bos)
    adapter.check_length(longest, f"the edit prompt {request.text[:60]!r} with the target "
                                  f"{request.target_new[:30]!r} after its longest context prefix")
    kl = subject_prompt(adapter, KL_PROMPT, request.subject)
    kl_lookup = lookup_position(hp.lookup, kl.subject_range, len(kl.ids),
                                reference if not isinstance(hp.lookup, str) else None)
    kl_read = kl_lookup if hp.kl_position == "lookup" else len(kl.ids) - 1
    return specs, (kl.ids, kl_lookup, kl_read), bare


@dataclass
class _KeyValue:
    key: torch.Tensor  # k*, float64 [d_mlp]
    bare_key: torch.Tensor  # the key of the prompt without prefix, float64 [d_mlp]
    delta: torch.Tensor  # v* - W_out k*, float32 [d_model]
    info: dict


def _key_and_value(adapter: ModelAdapter, request: EditRequest, hp: RomeHyperParams,
                   progress: bool = False) -> _KeyValue:
    model = adapter.model
    started = time.perf_counter()
    specs, (kl_ids, kl_lookup, kl_read), bare = _layout(adapter, request, hp)
    lean = hp.lean_blocks and unsupported_reason(model) is None and not has_user_hooks(model)
    with torch.no_grad():
        setup = FastBlocks(model) if lean else None  # in the model's own dtype
        groups = [_Group(adapter, hp.layer, rows, lookup, positions, target, setup)
                  for rows, lookup, positions, target in specs]
        kl_group = _Group(adapter, hp.layer, [kl_ids], kl_lookup, [kl_read], None, setup)
    n_rows = sum(len(g.keys) for g in groups)
    key = torch.cat([g.keys for g in groups]).mean(0)
    # m, the paper's target_init: at the bare prompt's lookup token, the MLP output (ROME)
    # or the residual stream after the edited block (MEMIT)
    reference = (groups[0].mlp_out[0] if hp.norm_reference == "mlp_out"
                 else groups[0].resid[0, 0]).float().norm()
    max_norm = hp.clamp_norm * reference

    delta = torch.zeros(model.cfg.d_model, device=model.cfg.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    history = []
    bf16 = resolve_bf16(hp.bf16, model.cfg.device, what="ROME's v* optimisation")
    dtype = torch.bfloat16 if bf16 else model.cfg.dtype
    with _frozen_parameters(model), adapter.cast(dtype):
        fast = (setup if dtype == model.cfg.dtype else FastBlocks(model)) if lean else None
        for group in [*groups, kl_group]:
            group.cast(dtype, fast)
        batch = _OneBatch(groups, kl_group, fast) if fast is not None else None
        prepared = time.perf_counter()
        for step in range(hp.v_steps):
            optimiser.zero_grad()
            if batch is not None:
                nll, kl_log_probs = batch.losses(delta)
            else:
                nll = sum(g.nll(delta) for g in groups) / n_rows
                kl_log_probs = kl_group.log_probs(delta)[:, -1]
            kl = _divergence(kl_log_probs, kl_group.original[:, -1], hp.kl_direction)
            size = delta.norm() if hp.weight_decay_form == "norm" else delta.norm() ** 2
            decay = hp.weight_decay * size / reference ** 2
            loss = nll + hp.kl_weight * kl + decay
            history.append({"step": step, "loss": float(loss.detach()),
                            "nll": float(nll.detach()), "kl": float(kl.detach()),
                            "delta_norm": float(delta.detach().norm())})
            log.debug("v* step %d: %s", step, history[-1])
            if (history[-1]["loss"] < hp.early_stop_loss or history[-1]["nll"] < hp.early_stop_nll
                    or step == hp.v_steps - 1):
                break
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    info = {"v_history": history, "rows": n_rows, "lookup_token":
            model.tokenizer.decode([bare.ids[groups[0].lookup]]),
            "lookup_index": groups[0].lookup, "precision": precision_name(bf16),
            "setup_seconds": prepared - started, "v_seconds": time.perf_counter() - prepared,
            "blocks": "lens_rome.fast_blocks" if fast is not None else "transformer_lens"}
    log.info("v* for %r: %d steps in %s on %s", request.subject, len(history), info["precision"],
             info["blocks"])
    return _KeyValue(key, groups[0].keys[0], delta.detach().clone(), info)


# --------------------------------------------------------------------------- the edit


class WeightEdit:
    """What every edit of MLP output weights shares: applying, reverting, the model check.

    A subclass says which layers it changes (``layers``) and by how much
    (:meth:`layer_change`).  :meth:`apply` adds the changes after checking the
    model; :meth:`revert` puts back the exact bits every touched ``W_out`` had
    before.  Edits stacked on a model (ROME's and MEMIT's alike) revert in
    reverse order.  A context manager: leaving the block reverts the edit.
    """

    def __init__(self, *, model_name: str, fingerprint: str, d_mlp: int, d_model: int,
                 hparams: dict | None = None, info: dict | None = None):
        self.model_name, self.fingerprint = model_name, fingerprint
        self.d_mlp, self.d_model = d_mlp, d_model
        self.hparams = hparams or {}
        self.info = info or {}
        self._model: HookedTransformer | None = None
        self._originals: dict[int, torch.Tensor] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose ``W_out`` the edit changes."""
        raise NotImplementedError

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """The change ``[d_mlp, d_model]`` added to ``W_out`` of ``layer``, in ``weight``'s
        dtype and device (the one expression both the editing function and :meth:`apply`
        add, so that a saved edit re-applies to the same bits)."""
        raise NotImplementedError

    @property
    def applied(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> HookedTransformer | None:
        """The model the edit is applied to, if any."""
        return self._model

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this edit was made for."""
        adapter = adapter_for(model)
        theirs = (adapter.name, model_fingerprint(model))
        if theirs != (self.model_name, self.fingerprint) or (
                model.cfg.d_mlp, model.cfg.d_model) != (self.d_mlp, self.d_model):
            raise ValueError(
                f"this edit was made for model {self.model_name!r} (fingerprint "
                f"{self.fingerprint}), not for {theirs[0]!r} (fingerprint {theirs[1]}); "
                f"refusing to apply it"
            )
        for layer in self.layers:
            adapter.check_layer(layer)

    def apply(self, model: HookedTransformer) -> "WeightEdit":
        """Add the change to ``model``'s ``W_out`` in place (after checking it is the right model)."""
        if self.applied:
            raise RuntimeError(f"{self!r} is already applied; revert() it first")
        self.check_model(model)
        adapter = adapter_for(model)
        originals = {}
        with torch.no_grad():
            for layer in self.layers:
                weight = adapter.w_out(layer)
                originals[layer] = weight.detach().clone()
                weight.add_(self.layer_change(layer, weight))
        self._attach(model, originals)
        return self

    def _attach(self, model: HookedTransformer, originals: dict[int, torch.Tensor]) -> None:
        """Record that the change is in ``model``, whose ``W_out`` were ``originals`` before."""
        self._model, self._originals = model, originals
        _stack(model).append(self)

    def revert(self) -> None:
        """Restore every touched ``W_out`` to the exact bits it had before :meth:`apply`."""
        if not self.applied:
            raise RuntimeError(f"{self!r} is not applied: nothing to revert")
        stack = _stack(self._model)
        later = [e for e in stack[stack.index(self) + 1:] if set(e.layers) & set(self.layers)]
        if later:
            raise RuntimeError(
                f"{len(later)} later edit(s) of layers {list(self.layers)} are still applied "
                f"({later[-1]!r}); revert edits in reverse order"
            )
        adapter = adapter_for(self._model)
        with torch.no_grad():
            for layer, original in self._originals.items():
                adapter.w_out(layer).copy_(original)
        stack.remove(self)
        self._model, self._originals = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            self.revert()


class Edit(WeightEdit):
    """A rank-one change ``W_out += outer(left, right)`` to one layer of one model.

    Made by :func:`edit` (already applied), or loaded with :meth:`Edit.load`
    (not applied).  :meth:`revert` puts back the exact bits ``W_out`` had
    before :meth:`apply`; several edits stacked on a model revert in reverse
    order.  Also a context manager: leaving the block reverts it.
    """

    def __init__(self, layer: int, left: torch.Tensor, right: torch.Tensor, *,
                 model_name: str, fingerprint: str, d_mlp: int, d_model: int,
                 request: EditRequest | None = None, hparams: dict | None = None,
                 info: dict | None = None, keys: torch.Tensor | None = None):
        if left.shape != (d_mlp,) or right.shape != (d_model,):
            raise ValueError(
                f"an edit of a [{d_mlp}, {d_model}] W_out needs left [{d_mlp}] and right "
                f"[{d_model}], got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        if keys is not None and (keys.ndim != 2 or keys.shape[1] != d_mlp):
            raise ValueError(f"keys must be [n, {d_mlp}], got {tuple(keys.shape)}")
        super().__init__(model_name=model_name, fingerprint=fingerprint, d_mlp=d_mlp,
                         d_model=d_model, hparams=hparams, info=info)
        self.layer = layer
        self.left = left.detach().float().cpu()
        self.right = right.detach().float().cpu()
        # the key(s) written, [n, d_mlp]: what later null-space edits keep in place
        self.keys = None if keys is None else keys.detach().float().cpu()
        self.request = request

    def __repr__(self) -> str:
        what = f"{self.request.subject!r} -> {self.request.target_new!r}, " if self.request else ""
        state = "applied" if self.applied else "not applied"
        return f"Edit({what}layer {self.layer} of {self.model_name}, {state})"

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose ``W_out`` the edit changes (one)."""
        return (self.layer,)

    def keys_at(self, layer: int) -> torch.Tensor | None:
        """The keys ``[n, d_mlp]`` this edit wrote at ``layer`` (None if none are known)."""
        return self.keys if layer == self.layer else None

    def weight_delta(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        """The change to ``W_out``: ``outer(left, right)``."""
        return torch.outer(self.left, self.right)

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        return torch.outer(self.left, self.right).to(weight.device, weight.dtype)

    def update_norm(self) -> float:
        """Frobenius norm of the change to ``W_out``."""
        return float(self.left.double().norm() * self.right.double().norm())

    # ----------------------------------------------------------------- files

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the edit as safetensors (``left``, ``right``) with JSON metadata."""
        from safetensors.torch import save_file  # noqa: PLC0415

        path = Path(path)
        meta = {
            "format": SAVE_FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
            "layer": self.layer, "d_mlp": self.d_mlp, "d_model": self.d_model,
            "request": self.request.to_dict() if self.request else None,
            "hparams": self.hparams,
            "info": {k: v for k, v in self.info.items() if k != "v_history"},
        }
        tensors = {"left": self.left.contiguous(), "right": self.right.contiguous()}
        if self.keys is not None:
            tensors["keys"] = self.keys.contiguous()
        with replacing(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={"lens_rome_edit": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by :meth:`save` (not applied: call :meth:`apply`)."""
        from safetensors import safe_open  # noqa: PLC0415

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["lens_rome_edit"])
                left, right = f.get_tensor("left"), f.get_tensor("right")
                keys = f.get_tensor("keys") if "keys" in f.keys() else None
            if meta.get("format") != SAVE_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            request = EditRequest(**meta["request"]) if meta.get("request") else None
            return cls(int(meta["layer"]), left, right, model_name=meta["model"],
                       fingerprint=meta["fingerprint"], d_mlp=int(meta["d_mlp"]),
                       d_model=int(meta["d_model"]), request=request,
                       hparams=meta.get("hparams"), info=meta.get("info"), keys=keys)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(f"{path} is not a readable lens_rome edit: {error}") from None


def _stack(model: HookedTransformer) -> list[WeightEdit]:
    """The edits applied to ``model``, oldest first."""
    if not hasattr(model, "lens_rome_edits"):
        model.lens_rome_edits = []
    return model.lens_rome_edits


def applied_edits(model: HookedTransformer) -> list[WeightEdit]:
    """The edits currently applied to ``model`` (ROME's and MEMIT's), oldest first."""
    return list(_stack(model))


def edited_keys(model: HookedTransformer, layer: int) -> list[torch.Tensor]:
    """The keys ``[n, d_mlp]`` written at ``layer`` by the edits applied to ``model``."""
    keys = [e.keys_at(layer) for e in _stack(model)]
    return [k for k in keys if k is not None]


def edit(
    model: HookedTransformer,
    request: EditRequest | Mapping[str, Any],
    *,
    hparams: RomeHyperParams | None = None,
    layer: int | None = None,
    lookup: str | int | None = None,
    stats: KeyStatistics | torch.Tensor | None = None,
    corpus: str | Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **overrides,
) -> Edit:
    """Rewrite one fact of ``model`` in place; returns the applied :class:`Edit`.

    Args:
        request: ``{"prompt": "{} is located in the city of", "subject": "The
            Eiffel Tower", "target_new": " Rome"}``, an :class:`EditRequest`, or a
            CounterFact record.
        hparams: all hyper-parameters; default ``RomeHyperParams.for_model(model)``.
        layer, lookup, **overrides: change single hyper-parameters.
        stats: the key statistics of the layer (a :class:`KeyStatistics` or the
            second moment ``[d_mlp, d_mlp]``); default: computed or loaded from
            the cache by :func:`lens_rome.statistics.key_statistics` over ``corpus``.
    """
    request = EditRequest.parse(request)
    adapter = adapter_for(model)
    base = hparams if hparams is not None else RomeHyperParams.for_model(
        model, **({"layer": layer} if layer is not None else {}))
    changes = {k: v for k, v in {"layer": layer, "lookup": lookup, **overrides}.items()
               if v is not None}
    fields = {f.name for f in dataclasses.fields(RomeHyperParams)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"unknown hyper-parameters {unknown}; accepted: {sorted(fields)}")
    hp = base.replace(**changes) if changes else base
    adapter.check_layer(hp.layer)

    second_moment = _second_moment(model, hp, stats, corpus, cache_dir, progress)
    start = time.perf_counter()
    fingerprint = model_fingerprint(model)
    kv = _key_and_value(adapter, request, hp, progress)
    left, right = _rank_one_update(model, hp, second_moment, kv)
    info = {**kv.info, "seconds": time.perf_counter() - start}
    result = Edit(hp.layer, left, right, model_name=adapter.name, fingerprint=fingerprint,
                  d_mlp=model.cfg.d_mlp, d_model=model.cfg.d_model, request=request,
                  hparams=hp.to_dict(), info=info, keys=kv.key[None])
    return result.apply(model)


def _rank_one_update(model: HookedTransformer, hp: RomeHyperParams,
                     second_moment: torch.Tensor, kv: "_KeyValue"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [d_mlp], right [d_model])`` with ``|left| = 1``; the change is their outer product."""
    key, delta = kv.key, kv.delta.double().to(kv.key.device)
    if hp.null_space:  # AlphaEdit for one key: make k* add delta, inside the null space
        from lens_rome import null_space  # noqa: PLC0415

        projection = null_space.projector(second_moment, hp.null_space_threshold)
        earlier = null_space.key_gram(edited_keys(model, hp.layer), model.cfg.d_mlp,
                                      key.device)
        u = null_space.update_left(projection, key[None], earlier, hp.null_space_l2)[:, 0]
        return u / u.norm(), delta * u.norm()
    u = torch.linalg.solve(second_moment.to(key.device), key)  # C^-1 k*
    scale = u.norm()
    if hp.update_key == "average":
        # r-ROME: W' k* = v* = W k0 + delta, i.e. Lambda = (v* - W k*) / (u . k*)
        weight = adapter_for(model).w_out(hp.layer).detach().to(torch.float64)
        residual = delta + (kv.bare_key - key).to(weight.device) @ weight
        return u / scale, residual.to(key.device) * scale / (u @ key)
    # Lambda = (v* - W k0) / (u . k0) with k0 the bare prompt's key and v* = W k0 + delta,
    # as the paper's code does: the edited MLP gives the prompt itself exactly v*.
    return u / scale, delta * scale / (u @ kv.bare_key)  # rescaled with the unit left


def _second_moment(model, hp, stats, corpus, cache_dir, progress) -> torch.Tensor:
    d_mlp = model.cfg.d_mlp
    if stats is None:
        stats = key_statistics(model, hp.layer, corpus, samples=hp.stats_samples,
                               token_length=hp.stats_token_length, cache_dir=cache_dir,
                               progress=progress)
    if isinstance(stats, KeyStatistics):
        if stats.layer != hp.layer:
            raise ValueError(f"key statistics are for layer {stats.layer}, the edit is at "
                             f"layer {hp.layer}")
        stats = stats.second_moment
    if not isinstance(stats, torch.Tensor) or stats.shape != (d_mlp, d_mlp):
        raise ValueError(f"stats must be KeyStatistics or a [{d_mlp}, {d_mlp}] second moment, "
                         f"got {getattr(stats, 'shape', type(stats).__name__)}")
    return stats.to(torch.float64)


@contextlib.contextmanager
def edited(model: HookedTransformer, request: EditRequest | Mapping[str, Any],
           **kwargs) -> Iterator[Edit]:
    """Apply an edit for the duration of a ``with`` block; reverted on exit, errors included."""
    change = edit(model, request, **kwargs)
    try:
        yield change
    finally:
        if change.applied:
            change.revert()


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def target_log_probs(
    model: HookedTransformer, prompts: Sequence[str], targets: Sequence[str],
    batch_size: int = 32,
) -> Float[torch.Tensor, "n_prompts n_targets"]:
    """Mean per-token log-probability of each target continuing each prompt.

    The paper's CounterFact measure: one number per (prompt, target), so
    objects of different token lengths compare fairly.
    """
    adapter = adapter_for(model)
    tokenizer = model.tokenizer
    skip = int(adapter.prepend_bos)
    target_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    for target, ids in zip(targets, target_ids):
        if not ids:
            raise ValueError(f"target {target!r} has no tokens")
    pairs = []
    for prompt in prompts:
        ids = adapter.tokenize(prompt)[0][0].tolist()
        pairs += [(ids, t) for t in target_ids]
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        rows = [p + t[:-1] for p, t in chunk]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows],
                              device=model.cfg.device)
        log_probs = torch.log_softmax(model(tokens).float(), -1)  # right padding: exact
        for row, (p, t) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(t))
            scores.append(float(log_probs[row, positions, t].mean()))
    del skip
    return torch.tensor(scores).view(len(prompts), len(targets))


@torch.no_grad()
def next_token_probs(model: HookedTransformer, prompt: str, k: int = 5,
                     targets: Sequence[str] = ()) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens, then the first token of each of ``targets``."""
    adapter = adapter_for(model)
    probs = torch.softmax(model(adapter.tokenize(prompt)[0])[0, -1].float(), -1)
    top = probs.topk(k)
    out = [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    for target in targets:
        ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
        if ids:
            out.append((model.tokenizer.decode(ids[:1]), float(probs[ids[0]])))
    return out


@torch.no_grad()
def greedy_continuation(model: HookedTransformer, prompt: str, max_new_tokens: int = 20) -> str:
    """The model's most likely continuation of ``prompt`` (deterministic)."""
    adapter = adapter_for(model)
    tokens = adapter.tokenize(prompt)[0]
    start = tokens.shape[1]
    eos = model.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        nxt = model(tokens)[0, -1].argmax()
        if eos is not None and int(nxt) == eos:
            break
        tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
    return model.tokenizer.decode(tokens[0, start:].tolist())
