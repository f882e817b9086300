"""Attribution patching: a causal trace estimated from one forward and one backward pass.

An exact trace (:func:`lens_rome.trace`) restores one state at a time, so it
costs one restored run per (token, layer) and noise sample.  Attribution
patching (Nanda 2023; Kramar et al. 2024, "AtP*") estimates the whole grid at
once from the gradient of the metric in the corrupted run::

    effect(n) ~ (n_clean - n_corrupted) . d metric / d n      (at the corrupted run)

the first-order Taylor expansion of "restore node n to its clean value".  One
clean forward pass, one corrupted forward pass over the noise samples and one
backward pass give every node of every kind; :func:`attribute` returns the
estimate as a :class:`lens_rome.tracing.TraceResult` laid out exactly like an
exact trace (``scores = low_score + estimated indirect effect``), so
``to_frame``, ``plot``, ``show`` and ``save`` work unchanged.

Nodes, one per kind:

- ``"hidden"``: the residual stream after block ``l`` (``hook_resid_post``);
- ``"mlp"``, ``"attn"``: MLP or attention outputs, summed over the ``window``
  layers centred on ``l`` as the exact trace restores them (a first-order
  estimate of a window adds the layers' estimates, so it also counts effects
  that one restored layer has *through* another restored layer: it estimates
  adding the clean-minus-corrupted difference at every layer of the window,
  which equals restoring them when the restored layers do not feed each other);
- ``"head"``: one attention head's output ``attn.hook_z[:, t, h]``; the
  scores are ``[n_tokens, n_layers, n_heads]``.

Integrated gradients (``steps``).  The estimate above takes the gradient at
one end of the way from the corrupted run to the clean one; when restoring a
state moves the run far (a large effect) the gradient there says little about
the rest of the way.  With ``steps=N > 1`` the corruption of the subject's
embeddings is interpolated, ``embed(a) = lerp(corrupted, clean, a)`` at
``a = 0, 1/(N-1), ..., 1``, and each node's difference is multiplied by the
trapezoid-rule average of the gradient at those N points::

    effect(n) ~ (n_clean - n_corrupted) . mean_a d metric / d n      (at run a)

(integrated gradients for patching: Hanna, Pezzelle & Belinkov 2024, EAP-IG).
The N points are one batched forward and one backward pass (``N x samples``
rows); ``steps=1`` is the first-order estimate itself, bit for bit.  With
``cut=l`` the interpolation is made on the residual stream after block ``l``
instead, at every position (a cut through the whole network): then the
``"hidden"`` attributions of layer ``l`` sum to the total effect as N grows
(the completeness of integrated gradients; the tests check it).

The AtP* fixes, both off by default and defined at the corrupted run only
(``steps=1``):

- ``qk_fix``: the first attention layer downstream of the restored state
  (block ``l + 1``) is not linearised: its queries, keys and values at the
  restored token are recomputed from the restored residual stream and its
  attention pattern is recomputed exactly (a softmax per restored token, no
  forward pass); only what lies after that pattern is linear.  This guards
  against a saturated softmax, where a linear estimate of "attend to the
  subject now" is near zero.
- ``grad_drop``: GradDrop against cancellation.  ``n_layers`` extra backward
  passes, each with the gradient through one block's attention and MLP
  dropped; the estimate is ``sign(plain) * mean_l |estimate without block l|``
  (the paper divides by ``L - 1``; the ranking is the same).  Magnitudes only:
  use it to rank sites, not to read effects.

:func:`verify` takes the top sites of an estimate and restores them exactly
(the AtP* practice: rank by estimate, verify by patching), reporting both side
by side.  :func:`restore_sites` is that exact restoration for any list of
sites, per head included.

Metrics (``metric``): ``"logprob"`` (default; the answer's log-probability,
close to linear), ``"prob"`` (the paper's), or ``"logit_diff"``: the
answer's logit minus a second answer's, ``contrast``; by default each noise
sample's own corrupted answer (its most likely token other than the answer),
which is the natural second answer with symmetric token replacement
(:class:`lens_rome.tracing.noise_rules.SubjectSwap`).  The exact trace scores ``"prob"`` and
``"logprob"``; compare an estimate with the exact trace of the same metric.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float

from lens_rome.checks import positive_int
from lens_rome.errors import InputError, PromptError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.hooks import attached
from lens_rome.tracing.kinds import (
    ATTRIBUTION_KINDS,
    ATTRIBUTION_METRICS,
    HEAD,
    KINDS,
    window_layers,
)
from lens_rome.tracing.noise_rules import (
    Corruption,
    Gaussian,
    Noise,
    corrupt,
    draw_corruption,
)
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.subject import _answer_token, _locate_subject

_UNSET: Any = object()  # ``corruption=`` not given (None is a value: the default noise)
DEFAULT_STEPS = 4  # interpolation points of attribute(); from benchmarks/attribution_quality.py


def _renamed_noise(noise, corruption, function: str):
    """``noise``, or what the deprecated ``corruption=`` (its name until 0.2) gave."""
    if corruption is _UNSET:
        return noise
    if noise is not None:
        raise InputError(f"{function}() got both noise= and corruption=; pass noise= only "
                         f"(corruption= is its deprecated name)")
    warnings.warn(f"{function}(corruption=...) is deprecated: pass noise=..., as to trace()",
                  DeprecationWarning, stacklevel=3)
    return corruption


def _metric(
    logits: Float[torch.Tensor, "rows d_vocab"], answer: int, contrast: torch.Tensor | None,
    metric: str,
) -> Float[torch.Tensor, "rows"]:
    """The score of each row's last-position logits: prob, logprob or logit difference."""
    logits = logits.float()
    if metric == "logit_diff":
        return logits[:, answer] - logits.gather(1, contrast[:, None].to(logits.device))[:, 0]
    log_probs = logits[:, answer] - torch.logsumexp(logits, dim=-1)
    return log_probs.exp() if metric == "prob" else log_probs


def _last_logits(adapter: ModelAdapter, tokens: Float[torch.Tensor, "rows pos"]
                 ) -> Float[torch.Tensor, "rows d_vocab"]:
    """Logits at the last position only (the unembedding of every position is wasted work)."""
    return adapter.last_logits(tokens)


def _check_common(kinds, metric, samples, window) -> None:
    for kind in kinds:
        if kind not in ATTRIBUTION_KINDS:
            raise InputError(f"unknown kind {kind!r}; expected one of {list(ATTRIBUTION_KINDS)}")
    if metric not in ATTRIBUTION_METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {list(ATTRIBUTION_METRICS)}")
    positive_int(samples, "samples")
    positive_int(window, "window")


@dataclass
class _Prepared:
    """A fact ready to trace: tokens, subject, corruption, answer and contrast."""

    tokens: torch.Tensor
    subject_range: tuple[int, int]
    corruption: Corruption
    noise_text: str
    answer: int
    samples: int


def _prepare(adapter: ModelAdapter, prompt, subject, noise, samples, seed, target) -> _Prepared:
    tokens, subject_range = _locate_subject(adapter, prompt, subject)
    adapter.check_length(tokens.shape[1], f"prompt {prompt[:60]!r}")
    if noise is None:
        noise = Gaussian(scale=3.0)
    subject_tokens = tokens[0, subject_range[0] : subject_range[1]]
    drawn, text = draw_corruption(noise, adapter, subject_tokens, samples, seed)
    if target is None:
        with torch.no_grad():
            answer = int(_last_logits(adapter, tokens)[0].argmax())
    elif isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < adapter.d_vocab:
            raise InputError(f"target token id {target} is outside the vocabulary "
                             f"(0..{adapter.d_vocab - 1})")
        answer = target
    else:
        answer = _answer_token(adapter, target)
    return _Prepared(tokens, subject_range, drawn, text, answer, samples)


def _contrast_tokens(adapter: ModelAdapter, contrast, corrupted_logits, answer) -> torch.Tensor:
    """Second answer per sample: ``contrast``'s token, else each sample's corrupted answer."""
    if contrast is not None:
        token = _answer_token(adapter, contrast)
        if token == answer:
            raise PromptError(f"contrast {contrast!r} is the answer itself; pick another token")
        return torch.full((corrupted_logits.shape[0],), token, dtype=torch.long)
    logits = corrupted_logits.detach().float().clone()
    logits[:, answer] = -torch.inf
    return logits.argmax(-1).cpu()


class _GradGate(torch.autograd.Function):
    """Identity forward; backward drops the gradient while ``state["drop"] == layer``."""

    @staticmethod
    def forward(ctx, x, state, layer):
        ctx.state, ctx.layer = state, layer
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.state.get("drop") == ctx.layer:
            return torch.zeros_like(grad), None, None
        return grad, None, None


@dataclass
class _Runs:
    """Clean and corrupted activations, and gradients of the metric in the corrupted run.

    ``grads[0]`` is the plain gradient (with ``steps > 1`` its trapezoid-rule
    average over the interpolation points, ``[samples, ...]`` like the rest);
    with GradDrop ``grads[1 + l]`` has the gradient through block ``l``'s
    attention and MLP dropped.
    """

    clean: dict[str, torch.Tensor]
    corrupted: dict[str, torch.Tensor]
    grads: list[dict[str, torch.Tensor]]
    low_score: float
    high_score: float
    contrast: torch.Tensor | None


def _qk_names(adapter: ModelAdapter, layer: int) -> list[str]:
    """What the QK fix reads of block ``layer``: residual stream in and middle, queries
    and keys (rotated where the model rotates them), values, scores and pattern."""
    q, k = ("rot_q", "rot_k") if adapter.rotary else ("q", "k")
    kinds = ("resid_pre", "resid_mid", q, k, "v", "attn_scores", "pattern")
    return [adapter.hook_name(kind, layer) for kind in kinds]


def interpolation_points(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where integrated gradients evaluates the gradient and how it weighs each point.

    ``(alphas [steps], weights [steps])``: ``alpha = 0`` is the corrupted run and
    ``alpha = 1`` the clean one; the trapezoid rule on ``steps`` equal intervals'
    ends (``steps=1``: the corrupted run alone, weight 1).
    """
    positive_int(steps, "steps")
    if steps == 1:
        return torch.zeros(1), torch.ones(1)
    alphas = torch.linspace(0.0, 1.0, steps)
    weights = torch.full((steps,), 1.0 / (steps - 1))
    weights[[0, -1]] /= 2
    return alphas, weights


def _interpolating(name: str, clean: torch.Tensor, alphas: torch.Tensor, samples: int):
    """A hook moving row block ``k`` (``samples`` rows each) of ``name``'s activation from
    the corrupted value towards ``clean [1, pos, d_model]`` by ``alphas[k]`` (0: unchanged)."""
    weight = alphas.repeat_interleave(samples)[:, None, None]

    def interpolate(activation, hook):
        return torch.lerp(activation, clean.to(activation.dtype).expand_as(activation),
                          weight.to(activation.device, activation.dtype))

    return name, interpolate


def _run(adapter: ModelAdapter, prepared: _Prepared, names: Sequence[str], metric: str,
         contrast: str | None, grad_drop: bool, steps: int = 1, cut: int | None = None) -> _Runs:
    """One clean pass (cached), one corrupted pass with gradients, one backward pass
    (plus one per layer with GradDrop); with ``steps > 1`` the corrupted pass runs the
    ``steps`` interpolation points together (rows point-major: point, then sample)."""
    model = adapter.model
    tokens, samples = prepared.tokens, prepared.samples
    embed = adapter.hook_name("embed")
    path = embed if cut is None else adapter.hook_name("hidden", cut)
    wanted = set(names) | ({path} if steps > 1 else set())
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=wanted.__contains__)
    clean = {name: cache[name] for name in names}

    captured: dict[str, torch.Tensor] = {}

    def keep(activation, hook):
        captured[hook.name] = activation

    def track(activation, hook):  # a graph even when the weights do not require gradients
        if not activation.requires_grad:
            activation.requires_grad_(True)

    alphas, weights = interpolation_points(steps)
    values = prepared.corruption.values.to(tokens.device)
    corrupting = corrupt(values.repeat(steps, 1, 1), prepared.subject_range,
                         replace=prepared.corruption.replace, hook_name=embed)
    fwd = [corrupting]
    if steps > 1 and cut is None:
        fwd.append(_interpolating(embed, cache[embed], alphas, samples))
    fwd.append((embed, track))
    if steps > 1 and cut is not None:
        fwd.append(_interpolating(path, cache[path], alphas, samples))
    fwd += [(name, keep) for name in names]
    state: dict = {}
    handles = []
    if grad_drop:
        for layer in range(adapter.n_layers):
            block = adapter.block(layer)
            for norm in (block.ln1, block.ln2):
                handles.append(norm.register_forward_hook(
                    lambda module, inputs, output, layer=layer: _GradGate.apply(output, state,
                                                                                layer)))
    try:
        with torch.enable_grad(), attached(model, fwd):
            logits = _last_logits(adapter, tokens.expand(steps * samples, -1))
    finally:
        for handle in handles:
            handle.remove()
    contrast_tokens = (_contrast_tokens(adapter, contrast, logits[:samples], prepared.answer)
                       if metric == "logit_diff" else None)
    per_row = _metric(logits, prepared.answer,
                      None if contrast_tokens is None else contrast_tokens.repeat(steps), metric)
    with torch.no_grad():
        clean_rows = _metric(clean_logits[:, -1].expand(samples, -1), prepared.answer,
                             contrast_tokens, metric)
    objective = per_row.sum() if steps == 1 else (
        weights.to(per_row.device).repeat_interleave(samples) * per_row).sum()
    inputs = [captured[name] for name in names]
    passes = [None] + (list(range(adapter.n_layers)) if grad_drop else [])
    grads = []
    for i, drop in enumerate(passes):
        state["drop"] = drop
        found = torch.autograd.grad(objective, inputs, retain_graph=i < len(passes) - 1,
                                    allow_unused=True)
        grads.append({name: _summed_over_points(torch.zeros_like(x) if g is None else g.detach(),
                                                steps)
                      for name, x, g in zip(names, inputs, found)})
    corrupted = {name: captured[name].detach()[:samples] for name in names}
    return _Runs(clean, corrupted, grads, float(per_row.detach()[:samples].mean()),
                 float(clean_rows.mean()), contrast_tokens)


def _summed_over_points(grad: torch.Tensor, steps: int) -> torch.Tensor:
    """``[steps * samples, ...]`` weighted gradients summed over the points: ``[samples, ...]``."""
    return grad if steps == 1 else grad.view(steps, -1, *grad.shape[1:]).sum(0)


def qk_fix_unsupported(model: Model) -> str | None:
    """Why the QK fix cannot recompute this model's attention exactly, or None."""
    return _qk_fix_unsupported(adapter_for(model))


def _qk_fix_unsupported(adapter: ModelAdapter) -> str | None:
    if not adapter.native_blocks:
        return f"{adapter.backend}: the fix recomputes attention with TransformerLens' blocks"
    cfg = adapter.config
    checks = [
        (cfg.positional_embedding_type in ("standard", "rotary"),
         f"positional embeddings {cfg.positional_embedding_type!r}"),
        (not (cfg.use_attn_in or cfg.use_split_qkv_input), "split attention inputs"),
        (not cfg.parallel_attn_mlp, "parallel attention and MLP"),
        (not cfg.attn_only, "attention-only blocks"),
        (not getattr(cfg, "use_attention_sinks", False), "attention sinks"),
        (not getattr(cfg, "use_logn_attn", False), "log-n attention scaling"),
        (getattr(cfg, "clip_qkv", None) is None, "clipped queries and keys"),
        (not (cfg.use_qk_norm and cfg.positional_embedding_type != "rotary"),
         "query/key norms without rotary embeddings"),
        (cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM",
                                           "Olmo3ForCausalLM"), "OLMo query/key norms"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return ", ".join(reasons) if reasons else None


def recompute_qkv(model: Model, layer: int, resid: Float[torch.Tensor, "rows pos d_model"]):
    """Block ``layer``'s queries, keys and values (rotated where the model rotates them) for
    the residual stream ``resid`` entering it: ``q [rows, pos, head, d_head]``, ``k`` and
    ``v [rows, pos, kv_head, d_head]``; position ``i`` depends on ``resid[:, i]`` only."""
    return _recompute_qkv(adapter_for(model), layer, resid)


def _recompute_qkv(adapter: ModelAdapter, layer: int, resid: Float[torch.Tensor, "rows pos d_model"]):
    block = adapter.block(layer)
    x = block.ln1(resid)
    q, k, v = block.attn.calculate_qkv_matrices(x, x, x)
    if adapter.rotary:
        q, k = block.attn.apply_rotary(q, 0, None), block.attn.apply_rotary(k, 0, None)
    return q, k, v


def _qk_fixed_effects(adapter: ModelAdapter, layer: int, delta: torch.Tensor, runs: _Runs, grads,
                      start: int, drop: int | None, groups: int) -> torch.Tensor:
    """First-order effect of adding ``delta [groups*samples, pos, d_model]`` to the residual
    stream entering block ``layer`` at one token at a time, with that block's attention
    pattern recomputed exactly: ``[groups*samples, pos]``."""
    names = _qk_names(adapter, layer)
    resid_pre, resid_mid, q_name, k_name, v_name, scores_name, pattern_name = names
    rep = lambda x: x.repeat(groups, *([1] * (x.ndim - 1)))  # noqa: E731 (rows group-major)
    effect = (delta * rep(grads[resid_mid])).sum(-1)  # the residual connection
    if drop == layer:  # GradDrop of this block: its attention carries nothing back
        return effect
    with torch.no_grad():
        q_new, k_new, v_new = _recompute_qkv(adapter, layer,
                                             rep(runs.corrupted[resid_pre]) + delta)
        effect += ((v_new - rep(runs.corrupted[v_name])) * rep(grads[v_name])).sum((-1, -2))
        q, k = rep(runs.corrupted[q_name]), rep(runs.corrupted[k_name])
        cached = rep(runs.corrupted[scores_name])
        pattern, g_pattern = rep(runs.corrupted[pattern_name]), rep(grads[pattern_name])
        attn = adapter.block(layer).attn
        for t in range(start, delta.shape[1]):
            queries = q[:, t:].clone()
            queries[:, 0] = q_new[:, t]
            keys = k.clone()
            keys[:, t] = k_new[:, t]
            scores = attn.calculate_attention_scores(queries, keys)  # [rows, head, pos - t, pos]
            scores = scores.masked_fill(torch.isneginf(cached[:, :, t:]), -torch.inf)
            new = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0)
            effect[:, t] += ((new - pattern[:, :, t:]) * g_pattern[:, :, t:]).sum((1, 2, 3))
    return effect


def _names_for(adapter: ModelAdapter, kinds, qk_fix: bool) -> list[str]:
    names = []
    for kind in kinds:
        names += adapter.layer_hook_names(kind)
    if qk_fix:
        for layer in range(adapter.n_layers):
            names += _qk_names(adapter, layer)
            names.append(adapter.hook_name("hidden", layer))
    return list(dict.fromkeys(names))


def _per_sample(adapter: ModelAdapter, kind: str, runs: _Runs, grads, qk_fix: bool, start: int,
                drop: int | None) -> torch.Tensor:
    """Estimated effect of restoring each single node: ``[samples, pos, n_layers(, head)]``."""
    n_layers = adapter.n_layers
    out = []
    for layer in range(n_layers):
        name = adapter.hook_name(kind, layer)
        delta = (runs.clean[name] - runs.corrupted[name]).float()  # [samples, pos, ...]
        grad = grads[name].float()
        if not qk_fix or layer == n_layers - 1:
            plain = (delta * grad).sum(-1)  # [samples, pos] or [samples, pos, head]
            out.append(plain)
            continue
        samples, n_pos = delta.shape[0], delta.shape[1]
        if kind == HEAD:  # one head's change of z, written into the residual stream
            w_o = adapter.w_o(layer).float()  # [head, d_head, d_model]
            stream = torch.einsum("sphd,hde->hspe", delta, w_o)
            groups = stream.shape[0]
            stream = stream.reshape(groups * samples, n_pos, -1)
        else:
            groups, stream = 1, delta
        effect = _qk_fixed_effects(adapter, layer + 1, stream, runs, grads, start, drop, groups)
        if kind in ("attn", HEAD):  # the way through this block's own MLP stays linear
            mid = grads[adapter.hook_name("resid_mid", layer)].float()
            post = grads[adapter.hook_name("hidden", layer)].float()
            rep = (mid - post).repeat(groups, 1, 1)
            effect = effect + (stream * rep).sum(-1)
        if kind == HEAD:
            effect = effect.view(groups, samples, n_pos).permute(1, 2, 0)
        out.append(effect)
    return torch.stack(out, dim=2)


def _estimate(adapter: ModelAdapter, kind, runs: _Runs, qk_fix: bool, grad_drop: bool,
              window: int, start: int) -> torch.Tensor:
    """Estimated indirect effects ``[pos, n_layers(, head)]``, windows summed."""
    plain = _per_sample(adapter, kind, runs, runs.grads[0], qk_fix, start, None).mean(0)
    if grad_drop:
        dropped = [_per_sample(adapter, kind, runs, grads, qk_fix, start, layer).mean(0).abs()
                   for layer, grads in enumerate(runs.grads[1:])]
        plain = torch.sign(plain) * torch.stack(dropped).mean(0)
    if kind in ("mlp", "attn") and window > 1:
        n_layers = plain.shape[1]
        plain = torch.stack([plain[:, window_layers(layer, window, n_layers)].sum(1)
                             for layer in range(n_layers)], dim=1)
    return plain


def attribute(
    model: Model,
    prompt: str,
    subject: str,
    kind: str = "hidden",
    **options,
) -> TraceResult:
    """Attribution-patching estimate of ``trace(model, prompt, subject, kind)``.

    Returns a :class:`TraceResult` whose ``scores`` (``[n_tokens, n_layers]``,
    or ``[n_tokens, n_layers, n_heads]`` for ``kind="head"``) are the corrupted
    score plus the estimated indirect effect of restoring each state;
    ``low_score`` and ``high_score`` are measured.  Its ``method`` is
    ``"attribution"``.  ``options`` are :func:`attribute_many`'s.
    """
    return attribute_many(model, prompt, subject, [kind], **options)[0]


def attribute_many(
    model: Model,
    prompt: str,
    subject: str,
    kinds: Sequence[str] = KINDS,
    *,
    noise: float | torch.Tensor | Noise | None = None,
    samples: int = 10,
    window: int = 10,
    metric: str = "logprob",
    target: str | None = None,
    contrast: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    cut: int | None = None,
    qk_fix: bool = False,
    grad_drop: bool = False,
    corruption: float | torch.Tensor | Noise | None = _UNSET,
) -> list[TraceResult]:
    """:func:`attribute` for several kinds from the same forward and backward passes.

    Args:
        kinds: of ``"hidden"``, ``"mlp"``, ``"attn"`` (windows of ``window``
            layers, as in :func:`lens_rome.trace`) and ``"head"`` (one head's
            ``attn.hook_z`` at one token, no window).
        noise: as ``trace``'s: a :class:`lens_rome.tracing.noise_rules.Noise` rule (default:
            Gaussian at 3x the embedding std), a float level, or a tensor
            ``[samples, n_subject_tokens, d_model]``; ``hooks.SubjectSwap([...])``
            for symmetric token replacement.
        metric: ``"logprob"``, ``"prob"`` or ``"logit_diff"`` (module docstring).
        target: the answer (default: the clean run's most likely token).
        contrast: the second answer of ``"logit_diff"`` (default: each
            sample's corrupted answer).
        steps: integrated-gradient points between the corrupted and the clean
            run (module docstring); 1 is the first-order estimate at the
            corrupted run.  Default: ``DEFAULT_STEPS``, or 1 with ``qk_fix`` or
            ``grad_drop``.
        cut: interpolate the residual stream after block ``cut`` (every
            position) instead of the subject's embeddings (``steps > 1`` only).
        qk_fix, grad_drop: the AtP* fixes (module docstring; ``steps=1`` only);
            ``grad_drop`` is deprecated (measured no better than the plain estimate).
        corruption: the old name of ``noise`` (deprecated).
    """
    noise = _renamed_noise(noise, corruption, "attribute_many")
    if grad_drop:
        warnings.warn("grad_drop is deprecated and will be removed in 0.3: on 30 known facts "
                      "(benchmarks/attribution_quality.py, docs/tracing.md) it ranked sites no "
                      "better than the plain estimate at 13x its cost", DeprecationWarning,
                      stacklevel=2)
    return _attribute_many(adapter_for(model), prompt, subject, kinds, noise=noise,
                           samples=samples, window=window, metric=metric, target=target,
                           contrast=contrast, seed=seed, steps=steps, cut=cut, qk_fix=qk_fix,
                           grad_drop=grad_drop)


def _checked_steps(adapter: ModelAdapter, steps, cut, qk_fix: bool, grad_drop: bool) -> int:
    """The number of interpolation points to run, after checking it fits the other options."""
    fixes = [name for name, on in (("qk_fix", qk_fix), ("grad_drop", grad_drop)) if on]
    if steps is None:
        steps = 1 if fixes else DEFAULT_STEPS
    positive_int(steps, "steps")
    if steps > 1 and fixes:
        raise InputError(f"{' and '.join(fixes)} apply at the corrupted run only (steps=1); "
                         f"got steps={steps}: pass steps=1, or drop {', '.join(fixes)}")
    if cut is not None:
        if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut < adapter.n_layers:
            raise InputError(f"cut={cut!r} must be a layer, 0..{adapter.n_layers - 1}")
        if steps == 1:
            raise InputError("cut= chooses where integrated gradients interpolates; it needs "
                             "steps > 1")
    return steps


def _attribute_many(adapter: ModelAdapter, prompt, subject, kinds, *, noise, samples, window,
                    metric, target, contrast, seed, qk_fix, grad_drop, steps=None, cut=None
                    ) -> list[TraceResult]:
    steps = _checked_steps(adapter, steps, cut, qk_fix, grad_drop)
    kinds = list(kinds)
    if not kinds:
        raise InputError(f"kinds must name at least one of {list(ATTRIBUTION_KINDS)}")
    _check_common(kinds, metric, samples, window)
    if contrast is not None and metric != "logit_diff":
        raise InputError(f"contrast applies to metric='logit_diff' only; got metric={metric!r}")
    if qk_fix and (reason := _qk_fix_unsupported(adapter)) is not None:
        raise InputError(f"qk_fix cannot recompute this model's attention exactly ({reason}); "
                         f"use qk_fix=False")
    prepared = _prepare(adapter, prompt, subject, noise, samples, seed, target)
    names = _names_for(adapter, kinds, qk_fix)
    runs = _run(adapter, prepared, names, metric, contrast, grad_drop, steps, cut)
    start = prepared.subject_range[0]
    contrast_tokens = None if runs.contrast is None else [int(t) for t in runs.contrast]
    contrast_text = None if runs.contrast is None else [adapter.decode([t]) for t in contrast_tokens]
    results = []
    for kind in kinds:
        with torch.no_grad():
            effects = _estimate(adapter, kind, runs, qk_fix, grad_drop, window, start)
        effects[:start] = 0.0  # positions before the subject are never corrupted
        results.append(TraceResult(
            scores=(effects + runs.low_score).float().cpu(),
            low_score=runs.low_score,
            high_score=runs.high_score,
            answer=adapter.decode([prepared.answer]),
            answer_token=prepared.answer,
            tokens=adapter.token_strings(prepared.tokens),
            subject_range=prepared.subject_range,
            kind=kind,
            window=window if kind in ("mlp", "attn") else 1,
            prompt=prompt,
            subject=subject,
            metric=metric,
            samples=samples,
            noise=prepared.noise_text,
            model_name=adapter.name,
            method="attribution",
            seed=seed,
            contrast=None if contrast_text is None else list(contrast_text),
            contrast_tokens=None if contrast_tokens is None else list(contrast_tokens),
            meta={"qk_fix": qk_fix, "grad_drop": grad_drop, "steps": steps,
                  **({} if cut is None else {"cut": cut})},
        ))
    return results
