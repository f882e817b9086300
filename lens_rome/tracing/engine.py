"""Causal tracing: where in the network does the model recall a fact?

The paper (Meng et al. 2022, section 2) runs the model three ways: clean;
corrupted (noise on the subject's token embeddings); and corrupted with one
state restored to its clean value.  The score of a state is the answer's
probability in the third run; its indirect effect is that minus the
corrupted probability.  Kinds of state: the residual stream after a block
(``"hidden"``), or the MLP or attention output over a window of layers
centred on a layer (``"mlp"``, ``"attn"``).  A *severed* hidden trace also
freezes the MLP (or attention) outputs of the restored token at their
corrupted values, so the restored state cannot act through them.

The paper runs one forward pass per restored state.  :func:`trace` computes
the same numbers with far less work, because most of a restored run equals
the corrupted run:

- a restoration at token ``t`` changes nothing before ``t`` (attention is
  causal), so later blocks run only positions ``t..`` and read the keys and
  values of earlier positions from the corrupted run's cache;
- a restoration at layer ``l`` changes nothing below ``l``, so the run starts
  from the corrupted residual stream at that layer (``start_at_layer``), and
  all restorations of one token share one pass through the blocks: each
  joins the batch at the block where it starts;
- tokens before the subject are never corrupted, so restoring them changes
  nothing: their scores are the corrupted score without any pass;
- logits are computed at the last position only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lens_rome.checks import positive_int
from lens_rome.errors import InputError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.fast_blocks import FastBlocks, has_user_hooks, unsupported_reason
from lens_rome.model.hooks import Hook, attached
from lens_rome.model.precision import precision_name, resolve_bf16
from lens_rome.tracing.attribution import _attribute_many
from lens_rome.tracing.hybrid import (
    DEFAULT_VERIFY,
    DEFAULT_VERIFY_BEST,
    cells_to_verify,
    merged,
)
from lens_rome.tracing.interventions import patch, patch_head
from lens_rome.tracing.kinds import (
    HEAD,
    HYBRID,
    KINDS,
    TRACE_METHODS,
    TRACE_METRICS,
    window_layers,
)
from lens_rome.tracing.noise_rules import Gaussian, Noise, corrupt, draw_corruption
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.subject import _answer_token, _locate_subject

log = logging.getLogger(__name__)


def trace(
    model: Model,
    prompt: str,
    subject: str,
    kind: str = "hidden",
    *,
    samples: int = 10,
    window: int = 10,
    noise: float | torch.Tensor | Noise | None = None,
    sever: str | None = None,
    target: str | None = None,
    metric: str = "prob",
    seed: int = 0,
    bf16: bool | str = False,
    positions: Sequence[int] | None = None,
    method: str = "exact",
    verify: int | None = None,
    verify_best: int | float | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> TraceResult:
    """Causal trace of ``subject``'s fact in ``prompt``: scores ``[n_tokens, n_layers]``.

    Args:
        kind: ``"hidden"`` (residual stream after each block), ``"mlp"`` or
            ``"attn"`` (outputs over ``window`` layers centred on each layer),
            or ``"head"`` (one attention head's output, ``attn.hook_z``, at one
            layer; scores ``[n_tokens, n_layers, n_heads]``).
        samples: corrupted runs averaged (each its own noise draw).
        noise: a :class:`lens_rome.tracing.noise_rules.Noise` rule (default: spherical
            Gaussian at 3x the embedding std, the paper's "s3"), a float level
            (std of the Gaussian), or an explicit tensor
            ``[samples, n_subject_tokens, d_model]`` added to the embeddings.
        sever: with ``kind="hidden"``, freeze ``"mlp"`` or ``"attn"`` outputs of
            the restored token at their corrupted values (the paper's Figure 3).
        target: the answer to score (its first token); default: the clean
            run's most likely next token.
        metric: ``"prob"`` (the paper's mean probability over samples) or
            ``"logprob"`` (mean log-probability).
        seed: seeds the noise draws, so a trace is reproducible.
        bf16: run the restored passes in bfloat16 (clean and corrupted runs
            stay float32); ``"auto"``: where :func:`lens_rome.model.precision.bf16_is_fast`
            says it is faster.  Default float32, the exact path.
        positions: restore only at these token positions (default: all); the
            scores of other positions are NaN.  The paper's Figure 3 restores
            the last subject token only.

    A Llama-style model with no hooks attached runs the restored passes
    through :class:`lens_rome.model.fast_blocks.FastBlocks` (the same function as
    TransformerLens' blocks, to ~1e-6 in float32); hooks already active on
    ``model`` (``with model.hooks(...)``) apply to every run of the trace, on
    TransformerLens' own blocks.  ``result.meta`` names the precision and
    blocks that ran.
    """
    return trace_many(
        model, prompt, subject, [(kind, sever, positions)], samples=samples, window=window,
        noise=noise, target=target, metric=metric, seed=seed, bf16=bf16, method=method,
        verify=verify, verify_best=verify_best, steps=steps, progress=progress,
    )[0]


def trace_many(
    model: Model,
    prompt: str,
    subject: str,
    traces: Sequence[tuple[str, str | None, Sequence[int] | None]],
    *,
    samples: int = 10,
    window: int = 10,
    noise: float | torch.Tensor | Noise | None = None,
    target: str | None = None,
    metric: str = "prob",
    seed: int = 0,
    bf16: bool | str = False,
    method: str = "exact",
    verify: int | None = None,
    verify_best: int | float | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> list[TraceResult]:
    """Several traces of one fact with the same noise: one per ``(kind, sever, positions)``.

    The same numbers as calling :func:`trace` for each, but the clean and
    corrupted runs (and the weights of the lean blocks) are made once; a hybrid
    trace estimates all its kinds from one attribution pass.
    """
    return _trace_many(adapter_for(model), prompt, subject, traces, samples=samples,
                       window=window, noise=noise, target=target, metric=metric, seed=seed,
                       bf16=bf16, progress=progress, method=method, verify=verify,
                       verify_best=verify_best, steps=steps)


def _trace_many(adapter: ModelAdapter, prompt, subject, traces, *, samples, window, noise, target,
                metric, seed, bf16, progress, method="exact", verify=None, verify_best=None,
                steps=None) -> list[TraceResult]:
    model = adapter.model
    if method not in TRACE_METHODS:
        raise InputError(f"unknown method {method!r}; expected one of {list(TRACE_METHODS)} "
                         f"(estimates alone: lens_rome.attribute)")
    for name, value in (("verify", verify), ("verify_best", verify_best), ("steps", steps)):
        if method != HYBRID and value is not None:
            raise InputError(f"{name}={value!r} applies to method='hybrid'; got method={method!r}")
    if method == HYBRID:
        verify = DEFAULT_VERIFY if verify is None else verify
        verify_best = DEFAULT_VERIFY_BEST if verify_best is None else verify_best
        if any(sever is not None for _, sever, _ in traces):
            raise InputError("sever needs every cell restored; use method='exact'")
    if metric not in TRACE_METRICS:
        raise InputError(f"unknown metric {metric!r}; expected one of {list(TRACE_METRICS)}")
    positive_int(samples, "samples")
    positive_int(window, "window")
    for kind, sever, _ in traces:
        if kind not in (*KINDS, HEAD):
            raise InputError(f"unknown kind {kind!r}; expected one of {[*KINDS, HEAD]}")
        if sever is not None:
            if sever not in ("mlp", "attn"):
                raise InputError(f"sever must be None, 'mlp' or 'attn', got {sever!r}")
            if kind != "hidden":
                raise InputError(f"sever applies to hidden-state traces; got kind={kind!r}")
    tokens, subject_range = _locate_subject(adapter, prompt, subject)
    adapter.check_length(tokens.shape[1], f"prompt {prompt[:60]!r}")
    traces = [(kind, sever, _check_positions(positions, tokens.shape[1]))
              for kind, sever, positions in traces]
    if noise is None:
        noise = Gaussian(scale=3.0)
    subject_tokens = tokens[0, subject_range[0] : subject_range[1]]
    corruption, noise_text = draw_corruption(noise, adapter, subject_tokens, samples, seed)
    bf16 = resolve_bf16(bf16, adapter.device, what="trace")
    estimates = cells = None
    dtype = torch.bfloat16 if bf16 else adapter.dtype

    with torch.no_grad():
        if target is None:
            answer = int(model(tokens)[0, -1].argmax())
        else:
            answer = _answer_token(adapter, target)
    if method == HYBRID:  # the same noise draws (same rule and seed) and the same answer
        kinds = list(dict.fromkeys(kind for kind, _, _ in traces))
        estimated = dict(zip(kinds, _attribute_many(
            adapter, prompt, subject, kinds, noise=noise, samples=samples, window=window,
            metric=metric, target=answer, contrast=None, seed=seed, steps=steps, qk_fix=False,
            grad_drop=False)))
        estimates = [estimated[kind] for kind, _, _ in traces]
        cells = [cells_to_verify(estimate, verify, verify_best, positions)
                 for estimate, (_, _, positions) in zip(estimates, traces)]
    with torch.no_grad():
        with_heads = any(kind == HEAD for kind, _, _ in traces)
        engine = _TraceEngine(adapter, tokens, subject_range, answer, corruption, metric,
                              with_heads)
        with adapter.cast(dtype):  # once for all traces: casting the weights is not free
            reason = unsupported_reason(model) or (
                "hooks are attached" if has_user_hooks(model) else None)
            if reason is None:
                engine.fast = FastBlocks(model)
            blocks = ("lens_rome.model.fast_blocks" if reason is None else
                      "transformer_lens" if adapter.has_kv_cache else "whole forward passes")
            log.info("tracing %r in %s on %s blocks%s", prompt, precision_name(bf16), blocks,
                     "" if reason is None else f" ({reason})")
            all_scores = [engine.run(kind, 1 if kind in ("hidden", HEAD) else window, sever,
                                     dtype, positions, progress,
                                     cells=None if cells is None else cells[i])
                          for i, (kind, sever, positions) in enumerate(traces)]
    exact_cells = [None] * len(traces)
    meta = {"bf16": bf16, "precision": precision_name(bf16), "blocks": blocks}
    if method == HYBRID:
        for i, (estimate, (_, _, positions)) in enumerate(zip(estimates, traces)):
            all_scores[i], exact_cells[i] = merged(estimate, all_scores[i], engine.low_score,
                                                   positions)
        meta.update(verify=verify, verify_best=verify_best, steps=estimates[0].meta["steps"])

    return [TraceResult(
        scores=scores,
        low_score=engine.low_score,
        high_score=engine.high_score,
        answer=adapter.decode([answer]),
        answer_token=answer,
        tokens=adapter.token_strings(tokens),
        subject_range=subject_range,
        kind=kind,
        window=1 if kind in ("hidden", HEAD) else window,
        prompt=prompt,
        subject=subject,
        metric=metric,
        samples=samples,
        sever=sever,
        noise=noise_text,
        model_name=adapter.name,
        method=method,
        seed=seed,
        exact_cells=exact,
        meta=dict(meta),
    ) for scores, exact, (kind, sever, _) in zip(all_scores, exact_cells, traces)]


def _check_positions(positions: Sequence[int] | None, n_tokens: int) -> list[int] | None:
    if positions is None:
        return None
    checked = sorted({int(p) for p in positions})
    if not checked or any(isinstance(p, bool) for p in positions):
        raise InputError(f"positions must be a non-empty list of token indices, got {positions!r}")
    if checked[0] < 0 or checked[-1] >= n_tokens:
        raise InputError(
            f"positions {positions!r} out of range; the prompt has {n_tokens} tokens (0..{n_tokens - 1})"
        )
    return checked


@dataclass(frozen=True)
class _Group:
    """One restoration of a token: every sample's rows share it.

    ``layer`` (and ``head``) name the restored state; ``patched`` are the
    blocks whose ``kind`` output is set to its clean value (window and head
    kinds); ``start`` is the first block the engine runs for it.
    """

    layer: int
    start: int
    patched: range = range(0)
    head: int | None = None


def _groups(kind: str, window: int, n_layers: int, n_heads: int, shortcut: bool) -> list[_Group]:
    """The restorations of one token, in the order the engine adds them to the batch.

    A hidden state after the last block changes nothing computed by a block,
    so its group is left out (:meth:`_TraceEngine.run` knows its score).
    With ``shortcut`` a group whose first patched block is ``a`` starts at
    ``a + 1``: block ``a`` changes the restored token only, and its output
    there follows from the cached runs (:meth:`_TraceEngine._entering_stream`).
    """
    if kind == "hidden":
        return [_Group(layer, layer + 1) for layer in range(n_layers - 1)]
    if kind == HEAD:
        return [_Group(layer, layer + shortcut, range(layer, layer + 1), head)
                for layer in range(n_layers) for head in range(n_heads)]
    windows = [window_layers(layer, window, n_layers) for layer in range(n_layers)]
    return [_Group(layer, w.start + shortcut, w) for layer, w in enumerate(windows)]


class _TraceEngine:
    """Runs the clean and corrupted passes once, then every restoration in batches."""

    def __init__(self, adapter: ModelAdapter, tokens, subject_range, answer, corruption, metric,
                 with_heads: bool = False):
        self.adapter = adapter
        self.model = model = adapter.model
        self.tokens = tokens
        self.subject_range = subject_range
        self.answer = answer
        self.metric = metric
        self.samples = corruption.values.shape[0]
        n_layers = adapter.n_layers

        names = set()
        for layer in range(n_layers):
            names |= {adapter.hook_name("resid_pre", layer),
                      *(adapter.hook_name(k, layer) for k in KINDS)}
            if with_heads:
                names.add(adapter.hook_name(HEAD, layer))
            if not adapter.has_kv_cache:  # the prefix's keys and values, read from hooks
                names |= {adapter.hook_name("k", layer), adapter.hook_name("v", layer)}
        keep = names.__contains__

        logits, self.clean = model.run_with_cache(tokens, names_filter=keep)
        self.high_score = float(self.score(logits[:, -1]).mean())

        batch = tokens.expand(self.samples, -1)
        self.corrupting = corrupt(corruption.values.to(tokens.device), subject_range,
                                  replace=corruption.replace, hook_name=adapter.hook_name("embed"))
        self.corruption = corruption
        kv = adapter.kv_cache(self.samples) if adapter.has_kv_cache else None
        with model.hooks(fwd_hooks=[self.corrupting]):
            logits, self.corrupted = model.run_with_cache(
                batch, names_filter=keep, **({} if kv is None else {"past_kv_cache": kv})
            )
        self.low_score = float(self.score(logits[:, -1]).mean())
        # per block: the corrupted run's (unrotated) keys and values [samples, pos, kv_head, d_head]
        self.corrupted_kv = [(e.past_keys, e.past_values) for e in kv.entries] if kv else [
            (self.corrupted[adapter.hook_name("k", layer)],
             self.corrupted[adapter.hook_name("v", layer)]) for layer in range(n_layers)]
        self.fast: FastBlocks | None = None

    def score(self, logits: Float[torch.Tensor, "rows d_vocab"]) -> Float[torch.Tensor, "rows"]:
        """The metric of the answer for each row of logits (overwrites ``logits``)."""
        logits = logits.float()
        answer = logits[:, self.answer].clone()
        top = logits.amax(-1, keepdim=True)  # log-sum-exp in place: no second vocab-sized copy
        log_probs = answer - logits.sub_(top).exp_().sum(-1).log_() - top[:, 0]
        return log_probs.exp() if self.metric == "prob" else log_probs

    def run(self, kind, window, sever, dtype, positions, progress, cells=None) -> torch.Tensor:
        """Scores ``[n_tokens, n_layers(, n_heads)]``; the model must already be cast to ``dtype``.

        ``cells``: restore only these, ``{position: {layer or (layer, head)}}``; the
        scores of the others are NaN.
        """
        n_tokens, n_layers = self.tokens.shape[1], self.adapter.n_layers
        groups = _groups(kind, window, n_layers, self.adapter.n_heads, self.fast is not None)
        shape = (n_tokens, n_layers, self.adapter.n_heads) if kind == HEAD else (n_tokens, n_layers)
        scores = torch.full(shape, self.low_score)
        restored = range(self.subject_range[0], n_tokens)
        if positions is not None:  # restorations before the subject equal the corrupted run
            scores[[p for p in range(n_tokens) if p not in positions]] = float("nan")
            restored = [p for p in positions if p >= self.subject_range[0]]
        if cells is not None:
            scores[:] = float("nan")
            scores[: self.subject_range[0]] = self.low_score
        self.dtype = dtype
        self.prefix_kv = [(keys.to(dtype), values.to(dtype)) for keys, values in self.corrupted_kv]
        if self.fast is not None:
            self.prefix_kv = [(self.fast.rotated_keys(layer, keys), values)
                              for layer, (keys, values) in enumerate(self.prefix_kv)]
        finals, plan = [], []  # plan: (position, its groups) in the order of finals
        bar = tqdm(restored, desc=f"trace {kind}", disable=not progress, leave=False)
        restore = self._restore_token if self.fast is not None or self.adapter.has_kv_cache else (
            self._restore_token_whole)
        for position in bar:
            chosen = groups if cells is None else [
                g for g in groups if _cell(g) in cells.get(position, ())]
            if chosen:
                finals.append(restore(position, kind, chosen, sever))
            plan.append((position, chosen))
        per_row = self._final_scores(torch.cat(finals)) if finals else torch.empty(0)
        per_group = iter(per_row.view(-1, self.samples).mean(-1).tolist())
        for position, chosen in plan:
            for group in chosen:
                scores[(position, *_cell(group, flat=False))] = next(per_group)
            if kind == "hidden" and (cells is None or n_layers - 1 in cells.get(position, ())):
                # the last block's output, restored: nothing left to compute
                scores[position, n_layers - 1] = (
                    self.high_score if position == n_tokens - 1 else self.low_score)
        return scores

    def _final_scores(self, final: Float[torch.Tensor, "rows d_model"], chunk: int = 512
                      ) -> Float[torch.Tensor, "rows"]:
        """The metric for each row's last-position residual after the last block."""
        out = [self.score(self.adapter.after_blocks(final[i:i + chunk, None])[:, -1])
               for i in range(0, len(final), chunk)]
        return torch.cat(out).float().cpu()

    def _restore_token(self, t: int, kind: str, groups: list[_Group], sever: str | None
                       ) -> Float[torch.Tensor, "rows d_model"]:
        """The last position's residual after the last block, for every group of token ``t``.

        Restorations join the batch at the block where they first differ from
        the corrupted run; rows are group-major (group, then sample).
        """
        model, adapter = self.model, self.adapter
        n_layers, last = adapter.n_layers, t == self.tokens.shape[1] - 1
        residual, joined = None, 0  # groups[:joined] are in the batch
        for block_index in range(n_layers + 1):
            entering = 0
            while joined + entering < len(groups) and groups[joined + entering].start == block_index:
                entering += 1
            if entering:
                new = self._entering_stream(block_index, t, kind, groups[joined:joined + entering])
                if block_index == n_layers:  # nothing left to run: only the last position counts
                    new = new[:, -1:]
                residual = new if residual is None else torch.cat([residual, new])
                joined += entering
            if residual is None or block_index == n_layers:
                continue
            # In the last block only the last position matters: a patch at t < last is moot.
            final_block = block_index == n_layers - 1
            block_hooks = [] if final_block and not last else self._patches(
                block_index, t, kind, groups[:joined], sever)
            prefix = self._prefix(block_index, t, joined)
            if self.fast is not None:
                mlp_first = None  # a restored MLP output at t need not be computed
                if kind == "mlp" and block_hooks and not final_block:
                    mlp_first = self._restored_mlp(block_index, t, groups[:joined])
                    block_hooks = [h for h in block_hooks if h[0] != adapter.hook_name(
                        "mlp", block_index)]
                residual = self.fast(block_index, residual, prefix, block_hooks,
                                     last_only=final_block, mlp_first=mlp_first)
                continue
            entry = None if prefix is None else adapter.kv_entry(*prefix)
            with attached(model, block_hooks):
                residual = adapter.block(block_index)(residual, past_kv_cache_entry=entry)
        return residual[:, -1]

    def _restore_token_whole(self, t: int, kind: str, groups: list[_Group], sever: str | None,
                             chunk: int = 256) -> Float[torch.Tensor, "rows d_model"]:
        """As :meth:`_restore_token`, with whole forward passes (the paper's way, batched).

        For a model whose blocks cannot run one at a time (a ``TransformerBridge``
        that is not Llama-style, or that has hooks attached): each row runs
        every block on every position, corrupted, with its restoration patched.
        """
        adapter, samples = self.adapter, self.samples
        per_chunk = max(1, chunk // samples)
        finals = []
        for first in range(0, len(groups), per_chunk):
            part = groups[first:first + per_chunk]
            hooks = [corrupt(self.corruption.values.to(self.tokens.device).repeat(len(part), 1, 1),
                             self.subject_range, replace=self.corruption.replace,
                             hook_name=adapter.hook_name("embed"))]
            for g, group in enumerate(part):
                rows = _group_rows([g], samples)
                if kind == "hidden":
                    name = adapter.hook_name("hidden", group.layer)
                    hooks.append(patch(name, self.clean[name][0, t], t, rows=rows))
                elif kind == HEAD:
                    name = adapter.hook_name(HEAD, group.layer)
                    hooks.append(patch_head(name, self.clean[name][0, t], t, group.head, rows=rows))
                else:
                    for layer in group.patched:
                        name = adapter.hook_name(kind, layer)
                        hooks.append(patch(name, self.clean[name][0, t], t, rows=rows))
            if sever is not None:
                for layer in range(adapter.n_layers):
                    name = adapter.hook_name(sever, layer)
                    frozen = self.corrupted[name][:, t].repeat(len(part), 1)
                    hooks.append(patch(name, frozen[:, None], t))
            batch = self.tokens.expand(len(part) * samples, -1)
            finals.append(adapter.resid_before(batch, adapter.n_layers, hooks=hooks)[:, -1])
        return torch.cat(finals)

    def _patches(self, block_index: int, t: int, kind: str, groups: list[_Group],
                 sever: str | None) -> list[Hook]:
        """Hooks of one block: clean values for the groups it restores, corrupted for severing."""
        adapter, samples = self.adapter, self.samples
        block_hooks = []
        patched = [g for g, group in enumerate(groups) if block_index in group.patched]
        if patched and kind == HEAD:
            name = adapter.hook_name(HEAD, block_index)
            heads = [groups[g].head for g in patched for _ in range(samples)]
            block_hooks.append(patch_head(name, self.clean[name][0, t], 0, heads,
                                                rows=_group_rows(patched, samples)))
        elif patched:
            name = adapter.hook_name(kind, block_index)
            rows = _group_rows(patched, samples)
            block_hooks.append(patch(name, self.clean[name][0, t], 0, rows=rows))
        if sever is not None:
            name = adapter.hook_name(sever, block_index)
            frozen = self.corrupted[name][:, t].repeat(len(groups), 1)
            block_hooks.append(patch(name, frozen[:, None], 0))
        return block_hooks

    def _restored_mlp(self, block_index: int, t: int, groups: list[_Group]
                      ) -> tuple[slice, torch.Tensor] | None:
        """The rows whose MLP output at ``t`` is restored in this block, and that clean output."""
        patched = [g for g, group in enumerate(groups) if block_index in group.patched]
        if not patched:
            return None
        name = self.adapter.hook_name("mlp", block_index)
        return _group_rows(patched, self.samples), self.clean[name][0, t]

    def _entering_stream(self, block_index: int, t: int, kind: str, groups: list[_Group]
                         ) -> Float[torch.Tensor, "rows pos d_model"]:
        """Residual stream entering ``block_index`` (positions ``t..``) for ``groups``, which start there.

        A hidden-state restoration enters with the clean state at ``t``.  A
        window or head restoration skipping its first patched block ``a``
        (``start == a + 1``) enters with the corrupted stream after ``a``,
        corrected at ``t``: in block ``a`` the other positions see only
        corrupted inputs, so they compute what the corrupted run did.
        """
        adapter = self.adapter
        stream = self.corrupted[adapter.hook_name("resid_pre", block_index)] if (
            block_index < adapter.n_layers) else self.corrupted[
            adapter.hook_name("hidden", block_index - 1)]
        new = stream[:, t:].repeat(len(groups), 1, 1)
        if kind == "hidden":  # restoring the output of the block just before
            new[:, 0] = self.clean[adapter.hook_name("hidden", block_index - 1)][0, t]
        elif groups[0].start != groups[0].patched.start:  # the shortcut over block a
            a = block_index - 1
            clean, corrupted = self.clean, self.corrupted
            if kind == "mlp":  # the MLP output at t is the clean one, the rest as corrupted
                name = adapter.hook_name("mlp", a)
                new[:, 0] += (clean[name][0, t] - corrupted[name][:, t]).repeat(len(groups), 1)
            else:  # attention output at t changes: recompute the MLP of block a at t
                before = corrupted[adapter.hook_name("resid_pre", a)][:, t].repeat(len(groups), 1)
                if kind == "attn":
                    attn = clean[adapter.hook_name("attn", a)][0, t].expand_as(before)
                else:
                    attn = self._attn_out_with_heads(a, t, [g.head for g in groups])
                middle = (before + attn).to(self.dtype)
                new[:, 0] = self.fast.mlp_residual(a, middle[:, None])[:, 0].to(new.dtype)
        return new.to(self.dtype)

    def _attn_out_with_heads(self, layer: int, t: int, heads: list[int]
                             ) -> Float[torch.Tensor, "rows d_model"]:
        """Corrupted attention output at ``t`` with one head's ``z`` clean, for each head (x samples)."""
        name = self.adapter.hook_name(HEAD, layer)
        corrupted_z, clean_z = self.corrupted[name][:, t], self.clean[name][0, t]  # [.., head, d_head]
        z = corrupted_z.repeat(len(heads), 1, 1)
        rows = torch.arange(len(z))
        per_row = torch.tensor(heads).repeat_interleave(self.samples)
        z[rows, per_row] = clean_z[per_row]
        w_o = self.adapter.w_o(layer).float()  # [head, d_head, d_model]
        change = torch.einsum("rhd,hdm->rm", z - corrupted_z.repeat(len(heads), 1, 1), w_o)
        return self.corrupted[self.adapter.hook_name("attn", layer)][:, t].repeat(
            len(heads), 1) + change

    def _prefix(self, block_index: int, t: int, n_groups: int):
        """Corrupted keys and values of positions before ``t``, one copy per group."""
        if t == 0:
            return None
        keys, values = self.prefix_kv[block_index]
        return keys[:, :t].repeat(n_groups, 1, 1, 1), values[:, :t].repeat(n_groups, 1, 1, 1)


def _cell(group: _Group, flat: bool = True):
    """The cell a group restores: its layer, or ``(layer, head)``; a tuple unless ``flat``."""
    if group.head is None:
        return group.layer if flat else (group.layer,)
    return group.layer, group.head


def _group_rows(groups: Sequence[int], samples: int) -> slice:
    """The batch rows of consecutive ``groups`` as one slice."""
    first, last = groups[0], groups[-1]
    if list(groups) != list(range(first, last + 1)):
        raise AssertionError(f"restoration groups {groups} are not consecutive")
    return slice(first * samples, (last + 1) * samples)


def trace_all(model: Model, prompt: str, subject: str, kinds: Sequence[str] = KINDS,
              **kwargs) -> dict[str, TraceResult]:
    """``trace`` for several kinds with the same noise: ``{kind: result}``."""
    results = trace_many(model, prompt, subject, [(kind, None, None) for kind in kinds], **kwargs)
    return dict(zip(kinds, results))
