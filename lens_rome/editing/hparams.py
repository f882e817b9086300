"""ROME's hyper-parameters: the paper's by default, each departure a named option."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from lens_rome.checks import finite_number, positive_int
from lens_rome.editing.null_space import NULL_SPACE_L2, NULL_SPACE_THRESHOLD
from lens_rome.editing.statistics import DEFAULT_SAMPLES, DEFAULT_TOKEN_LENGTH
from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model

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
        norm_reference: what ``delta`` changes, and so the ``m`` of the weight decay
            and the clamp, at the bare prompt's lookup token: ``"mlp_out"`` (ROME's
            ``compute_v``: the output of ``W_out``, which a model such as Gemma then
            normalises before the residual stream gets it) or ``"hidden"`` (MEMIT's
            ``compute_z``: the residual stream after the edited block).
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
            update stay in float32/float64).  False (default): float32, the
            paper's numbers on every machine; None: bfloat16 where
            :func:`lens_rome.model.precision.bf16_is_fast` says it is faster, float32
            elsewhere; ``True`` on hardware without bf16 units warns once.
        lean_blocks: run the upper blocks as :class:`lens_rome.model.fast_blocks.FastBlocks`
            (the same function in fewer, larger matrix products) when the model
            supports it and has no hooks attached.
        stats_samples, stats_token_length: the corpus sample behind ``C``.
        stats_ridge: solve with ``C + stats_ridge * mean_eigenvalue(C) * I``
            instead of ``C`` (0, the paper: none).  The way to edit with
            statistics from few keys, which are refused otherwise
            (:func:`lens_rome.editing.statistics.check_conditioning`).
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
            already applied to the model (:mod:`lens_rome.editing.null_space`).
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
    bf16: bool | None = False
    lean_blocks: bool = True
    stats_samples: int = DEFAULT_SAMPLES
    stats_token_length: int = DEFAULT_TOKEN_LENGTH
    stats_ridge: float = 0.0
    seed: int = 0
    update_key: str = "bare"
    null_space: bool = False
    null_space_threshold: float = NULL_SPACE_THRESHOLD
    null_space_l2: float = NULL_SPACE_L2

    def __post_init__(self):
        check_lookup(self.lookup)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"layer must be an integer >= 0, got {self.layer!r}")
        if isinstance(self.n_prefixes, bool) or not isinstance(self.n_prefixes, int) \
                or self.n_prefixes < 0:
            raise InputError(f"n_prefixes must be an integer >= 0, got {self.n_prefixes!r}")
        for name in ("v_steps", "stats_samples", "stats_token_length"):
            positive_int(getattr(self, name), name)
        lengths = tuple(self.prefix_lengths)
        if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
            raise InputError(f"prefix_lengths must be positive token counts, got {lengths!r}")
        object.__setattr__(self, "prefix_lengths", lengths)
        if self.prefixes is not None:
            texts = (self.prefixes,) if isinstance(self.prefixes, str) else tuple(self.prefixes)
            if not all(isinstance(t, str) for t in texts):
                raise WrongTypeError(f"prefixes must be texts (strings), got {self.prefixes!r}")
            object.__setattr__(self, "prefixes", texts)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {list(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("v_lr", "kl_weight", "weight_decay", "clamp_norm", "early_stop_loss",
                     "early_stop_nll", "stats_ridge"):
            finite_number(getattr(self, name), name, minimum=0)
        check_update_options(self.update_key, self.null_space, self.null_space_threshold,
                             self.null_space_l2)

    @classmethod
    def for_model(cls, model: Model | str, **overrides) -> "RomeHyperParams":
        """The defaults for ``model`` (or a model name), with ``overrides`` applied."""
        adapter = None if isinstance(model, str) else adapter_for(model)
        name = model if adapter is None else adapter.name
        defaults = dict(MODEL_DEFAULTS.get(name, {}))
        if "layer" not in defaults and "layer" not in overrides:
            if adapter is None:
                raise InputError(
                    f"no default edit layer for {name!r} (known: {sorted(MODEL_DEFAULTS)}); "
                    f"pass layer=..."
                )
            defaults["layer"] = adapter.n_layers // 4
            log.warning("no default edit layer for %r: using layer %d (a quarter of the depth); "
                        "trace the model's MLPs to choose one", name, defaults["layer"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise WrongTypeError(f"unknown hyper-parameters {unknown}; accepted: {sorted(fields)}")
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
    """Raise ``InputError`` for an unknown ``update_key`` or a bad null-space setting."""
    if update_key not in UPDATE_KEYS:
        raise InputError(f"update_key must be one of {list(UPDATE_KEYS)} ('average' is "
                         f"r-ROME), got {update_key!r}")
    if not isinstance(null_space, bool):
        raise WrongTypeError(f"null_space must be True or False, got {null_space!r}")
    finite_number(threshold, "null_space_threshold (a fraction of the mean eigenvalue of C)",
                  positive=True)
    finite_number(l2, "null_space_l2", positive=True)


def check_lookup(lookup: str | int) -> str | int:
    """``lookup`` if it is one of :data:`LOOKUPS` or an int token index."""
    if isinstance(lookup, bool) or not isinstance(lookup, (str, int)) or (
        isinstance(lookup, str) and lookup not in LOOKUPS
    ):
        raise InputError(
            f"lookup must be one of {list(LOOKUPS)} or an int token index, got {lookup!r}"
        )
    return lookup
