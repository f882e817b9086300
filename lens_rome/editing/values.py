"""ROME's key ``k*`` and value ``v*``: the paper's ``compute_u`` and ``compute_v``.

:func:`key_and_value` reads ``k*`` (the MLP key at the lookup token, averaged
over the prompt and its context prefixes) and optimises ``delta = v* - W_out k*``
as :mod:`lens_rome.editing.rome` describes: the target's NLL after every
context prompt, a KL term on :data:`KL_PROMPT` and a weight decay, with the
upper blocks run from cached states (``_Group``) and, where the model allows,
as lean blocks in one batch (``_OneBatch``).  MEMIT's targets
(:func:`lens_rome.editing.memit.target_deltas`) are the same optimisation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from lens_rome.data.requests import EditRequest
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.layout import context_prompts, lookup_position, subject_prompt
from lens_rome.errors import PromptError
from lens_rome.model.adapter import ModelAdapter
from lens_rome.model.backend import Model
from lens_rome.model.fast_blocks import FastBlocks, has_user_hooks, unsupported_reason
from lens_rome.model.hooks import attached
from lens_rome.model.precision import precision_name, resolve_bf16

log = logging.getLogger(__name__)

# The prompt of the KL term that keeps the subject's other properties (the paper's code).
KL_PROMPT = "{} is a"


class _Group:
    """Rows of identical layout (same prefix length): what the v* loop needs of them.

    Everything before the lookup token is computed once, without gradients:
    the keys and values of the attention layers above the edited one, and the
    residual stream after the edited layer from the lookup token on.  Each
    optimisation step only adds ``delta`` there (:meth:`residual_delta`) and runs
    the upper blocks on the positions from the lookup token on.
    """

    # The norm ROME's delta passes through before the residual stream gets it (Gemma; set
    # by pass_through), or None: delta is added to the residual stream as it is.
    value_norm: torch.nn.Module | None = None

    def __init__(self, adapter: ModelAdapter, layer: int, rows: list[list[int]], lookup: int,
                 loss_positions: list[int], loss_targets: list[int] | None,
                 fast: FastBlocks | None = None):
        self.adapter, self.layer, self.lookup = adapter, layer, lookup
        self.offset = adapter.n_bos
        tokens = adapter.as_tokens([adapter.bos + r for r in rows])
        p = lookup + self.offset
        self.p = p
        self.loss_positions = [q + self.offset - p for q in loss_positions]
        if min(self.loss_positions) < 0:
            raise ValueError("the lookup token lies after the predicted tokens")
        self.loss_targets = loss_targets
        self.rotated = fast is not None
        self.tokens = None  # set when each step runs the whole model (no cache entries)
        if fast is not None:
            logits = self._run_lean(fast, tokens, loss_targets is None)
        elif adapter.has_kv_cache:
            logits = self._run_transformer_lens(tokens, loss_targets is None)
        else:
            logits = self._run_whole(tokens, loss_targets is None)
        self.original = None if logits is None else torch.log_softmax(
            logits[:, self.loss_positions].float(), -1)

    def _run_transformer_lens(self, tokens: torch.Tensor, kl: bool) -> torch.Tensor | None:
        """The states the loop needs, from TransformerLens' blocks; the KL rows' logits."""
        adapter, layer, p, model = self.adapter, self.layer, self.p, self.adapter.model
        names = {adapter.hook_name("key", layer), adapter.hook_name("mlp", layer),
                 adapter.hook_name("hidden", layer)}
        kv = adapter.kv_cache(len(tokens))
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

    def _run_whole(self, tokens: torch.Tensor, kl: bool) -> torch.Tensor | None:
        """The states the loop needs from one whole forward pass (a model whose blocks
        cannot run from cache entries); each step then runs the whole model again."""
        adapter, layer, p = self.adapter, self.layer, self.p
        names = {adapter.hook_name("key", layer), adapter.hook_name("mlp", layer),
                 adapter.hook_name("hidden", layer)}
        logits, cache = adapter.model.run_with_cache(tokens, names_filter=names.__contains__)
        self.keys = cache[adapter.hook_name("key", layer)][:, p].double()
        self.mlp_out = cache[adapter.hook_name("mlp", layer)][:, p]
        self.resid = cache[adapter.hook_name("hidden", layer)][:, p:].clone()
        self.prefix, self.tokens = {}, tokens
        return logits[:, p:] if kl else None

    def _run_lean(self, fast: FastBlocks, tokens: torch.Tensor, kl: bool) -> torch.Tensor | None:
        """The same states from the lean blocks (one pass per group, no hook machinery)."""
        adapter, layer, p, model = self.adapter, self.layer, self.p, self.adapter.model
        resid = adapter.resid_before(tokens, 0)  # the embedded tokens, as block 0 sees them
        for b in range(layer):
            resid = fast(b, resid)
        seen = {}

        def keep(name):
            def hook(activation, _):
                seen[name] = activation
            return hook

        hooks = [(adapter.hook_name("attn", layer), keep("attn")),
                 (adapter.hook_name("mlp", layer), keep("mlp"))]
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
        return adapter.final_logits(upper[:, p:]) if kl else None

    def cast(self, dtype: torch.dtype, fast: FastBlocks | None = None) -> "_Group":
        """Keep the precomputed states in ``dtype`` (that of the blocks they enter), and run
        the upper blocks as ``fast`` (lean blocks built in that dtype) when given."""
        self.resid = self.resid.to(dtype)
        self.prefix = {b: (k.to(dtype), v.to(dtype)) for b, (k, v) in self.prefix.items()}
        self.fast = fast
        if fast is not None and not self.rotated:  # TransformerLens caches keys unrotated
            self.prefix = {b: (fast.rotated_keys(b, k), v) for b, (k, v) in self.prefix.items()}
        return self

    def pass_through(self, norm: torch.nn.Module) -> "_Group":
        """Make ``delta`` a change of ``W_out``'s output that reaches the residual stream
        through ``norm`` (a post-MLP norm): keep each row's ``v = W_out k`` and ``norm(v)``
        ``[rows, d_model]``, which no step changes."""
        self.value_norm = norm
        with torch.no_grad():
            self.value = self.adapter.mlp_value(self.layer, self.keys)
            self.normed_value = norm(self.value)
        return self

    def residual_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """What the residual stream after the edited block gets at the lookup token,
        ``delta`` itself ``[d_model]``, or through the post-MLP norm ``[rows, 1, d_model]``,
        ``norm(v + delta) - norm(v)`` with ``v = W_out k`` each row's MLP output before it."""
        if self.value_norm is None:
            return delta.to(self.resid.dtype)
        change = self.value_norm(self.value + delta.to(self.value.dtype)) - self.normed_value
        return change.to(self.resid.dtype)[:, None]

    def log_probs(self, delta: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[rows, loss_positions, d_vocab]`` with ``delta`` added."""
        adapter = self.adapter
        if self.tokens is not None:  # the whole model, with delta added after the edited block
            p = self.p

            def add(activation, hook):
                return torch.cat([activation[:, :p], activation[:, p:p + 1]
                                  + self.residual_delta(delta).to(activation.dtype),
                                  activation[:, p + 1:]], 1)

            with attached(adapter.model, [(adapter.hook_name("hidden", self.layer), add)]):
                logits = adapter.model(self.tokens)
            return torch.log_softmax(logits[:, [p + q for q in self.loss_positions]].float(), -1)
        resid = torch.cat([self.resid[:, :1] + self.residual_delta(delta), self.resid[:, 1:]], 1)
        for b in range(self.layer + 1, adapter.n_layers):
            keys, values = self.prefix[b]
            if self.fast is not None:
                resid = self.fast(b, resid, (keys, values) if self.p > 0 else None)
                continue
            entry = adapter.kv_entry(keys, values) if self.p > 0 else None
            resid = adapter.block(b)(resid, past_kv_cache_entry=entry)
        return _final_log_probs(adapter, resid[:, self.loss_positions])

    def nll(self, delta: torch.Tensor) -> torch.Tensor:
        """Mean over target tokens of -log p, summed over rows."""
        log_probs = self.log_probs(delta)
        targets = torch.tensor(self.loss_targets, device=log_probs.device)
        picked = log_probs.gather(2, targets[None, :, None].expand(len(log_probs), -1, 1))
        return -picked[..., 0].mean(1).sum()


def _final_log_probs(adapter: ModelAdapter, resid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[..., d_vocab]`` from residual states after the last block."""
    return torch.log_softmax(adapter.final_logits(resid).float(), -1)


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
        adapter = self.adapter
        members = (*self.groups, self.kl_group)
        if all(g.value_norm is None for g in members):  # one broadcast add, as always
            shift = delta.to(self.resid.dtype)
        else:
            shift = torch.cat([g.residual_delta(delta).expand(len(g.resid), 1, -1)
                               for g in members])
        resid = torch.cat([self.resid[:, :1] + shift, self.resid[:, 1:]], 1)
        for b in range(self.layer + 1, adapter.n_layers):
            resid = self.fast(b, resid, self.prefix[b], positions=self.positions, mask=self.mask)
        nll = 0
        for g, rows in zip(self.groups, self.rows):
            log_probs = _final_log_probs(adapter, resid[rows, g.loss_positions])
            targets = torch.tensor(g.loss_targets, device=log_probs.device)
            picked = log_probs.gather(2, targets[None, :, None].expand(len(log_probs), -1, 1))
            nll = nll - picked[..., 0].mean(1).sum()
        kl_rows, kl = self.rows[-1], self.kl_group
        kl_log_probs = _final_log_probs(adapter, resid[kl_rows, kl.loss_positions[-1]])
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
def _frozen_parameters(model: Model) -> Iterator[None]:
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
    target = adapter.token_ids(request.target_new)
    if not target:
        raise PromptError(f"target_new {request.target_new!r} has no tokens")
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
    longest = max(len(r) for rows, *_ in specs for r in rows) + adapter.n_bos
    adapter.check_length(longest, f"the edit prompt {request.text[:60]!r} with the target "
                                  f"{request.target_new[:30]!r} after its longest context prefix")
    kl = subject_prompt(adapter, KL_PROMPT, request.subject)
    kl_lookup = lookup_position(hp.lookup, kl.subject_range, len(kl.ids),
                                reference if not isinstance(hp.lookup, str) else None)
    kl_read = kl_lookup if hp.kl_position == "lookup" else len(kl.ids) - 1
    return specs, (kl.ids, kl_lookup, kl_read), bare


@dataclass
class KeyValue:
    """ROME's ``k*`` and ``delta = v* - W_out k*`` for one request, and how they were found."""

    key: torch.Tensor  # k*, float64 [d_mlp]
    bare_key: torch.Tensor  # the key of the prompt without prefix, float64 [d_mlp]
    delta: torch.Tensor  # v* - W_out k*, float32 [d_model]
    info: dict


def key_and_value(adapter: ModelAdapter, request: EditRequest, hp: RomeHyperParams,
                  progress: bool = False) -> KeyValue:
    """``k*`` (at ``hp.layer``, over the context prompts) and the optimised ``delta``."""
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
    # ROME's delta changes W_out's output (the paper's code adds it to the output of the
    # MLP's down projection); where a norm follows the MLP (Gemma), the residual stream
    # gets it through that norm.  MEMIT's delta is a change of the residual stream itself.
    value_norm = adapter.mlp_post_norm(hp.layer) if hp.norm_reference == "mlp_out" else None
    if value_norm is not None:
        for group in [*groups, kl_group]:
            group.pass_through(value_norm)
    # m, the paper's target_init: at the bare prompt's lookup token, the output of W_out
    # (ROME) or the residual stream after the edited block (MEMIT)
    if hp.norm_reference == "hidden":
        reference = groups[0].resid[0, 0]
    elif value_norm is not None:  # the MLP's output before the norm
        with torch.no_grad():
            reference = adapter.mlp_value(hp.layer, groups[0].keys[:1])[0]
    else:
        reference = groups[0].mlp_out[0]
    reference = reference.float().norm()
    max_norm = hp.clamp_norm * reference

    delta = torch.zeros(adapter.d_model, device=adapter.device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    history = []
    bf16 = resolve_bf16(hp.bf16, adapter.device, what="ROME's v* optimisation")
    native = adapter.dtype  # read before the cast, inside which the model is in dtype
    dtype = torch.bfloat16 if bf16 else native
    with _frozen_parameters(model), adapter.cast(dtype):
        fast = (setup if dtype == native else FastBlocks(model)) if lean else None
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
            adapter.decode([bare.ids[groups[0].lookup]]),
            "lookup_index": groups[0].lookup, "precision": precision_name(bf16),
            "setup_seconds": prepared - started, "v_seconds": time.perf_counter() - prepared,
            "blocks": "lens_rome.model.fast_blocks" if fast is not None else "transformer_lens"}
    log.info("v* for %r: %d steps in %s on %s", request.subject, len(history), info["precision"],
             info["blocks"])
    return KeyValue(key, groups[0].keys[0], delta.detach().clone(), info)
