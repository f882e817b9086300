"""What the model says: target log-probabilities, token accuracy, top tokens, generations."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from lens_rome.errors import InputError, PromptError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model

DEFAULT_NEW_TOKENS = 100  # the paper's generation length
DEFAULT_TOP_K = 5  # the paper's sampling


@torch.no_grad()
def generate(model: Model, prompts: str | Sequence[str],
             max_new_tokens: int = DEFAULT_NEW_TOKENS, *, top_k: int = DEFAULT_TOP_K,
             seed: int | Sequence[int] = 0) -> str | list[str]:
    """Each prompt followed by a top-``k`` sampled continuation of at most ``max_new_tokens``.

    The paper samples top-5 and scores the whole text, prompt included.  Several
    prompts run as one left-padded batch (one pass over the weights per token
    for all of them); each has its own seed (``seed + i`` unless a list is
    given), and the global random state is untouched.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise InputError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    adapter = adapter_for(model)
    rows = [adapter.tokenize(p)[0][0].tolist() for p in prompts]
    width = max(map(len, rows))
    steps = min(max_new_tokens, adapter.n_ctx - width)
    if steps <= 0 or not prompts:
        return prompts[0] if single else prompts
    pad = adapter.pad_id
    tokens = adapter.as_tokens([[pad] * (width - len(r)) + r for r in rows])
    mask = adapter.as_tokens([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    step_logits = _incremental(adapter, tokens, mask)
    logits = next(step_logits)
    eos = adapter.eos_id
    new: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    for step in range(steps):
        values, indices = logits.float().cpu().topk(top_k, dim=-1)
        probs = torch.softmax(values, -1)
        chosen = [int(indices[i, torch.multinomial(probs[i], 1, generator=g)])
                  for i, g in enumerate(generators)]
        for i, token in enumerate(chosen):
            finished[i] = finished[i] or (eos is not None and token == eos)
            if not finished[i]:
                new[i].append(token)
        if all(finished) or step == steps - 1:
            break
        token = adapter.as_tokens(chosen).view(-1, 1)
        logits = step_logits.send(token)
    texts = [p + adapter.decode(ids) for p, ids in zip(prompts, new)]
    return texts[0] if single else texts


def _incremental(adapter: ModelAdapter, tokens: torch.Tensor, mask: torch.Tensor):
    """A generator of next-token logits ``[rows, d_vocab]``: first for ``tokens`` ``[rows, pos]``
    (``mask`` marks the real ones), then for each token ``[rows, 1]`` sent to it.

    With TransformerLens cache entries each step runs the new position only;
    otherwise (a ``TransformerBridge``) each step runs the whole sequence so far.
    """
    model = adapter.model
    if adapter.has_kv_cache:
        cache = adapter.kv_cache(len(tokens))
        token = yield model(tokens, attention_mask=mask, past_kv_cache=cache)[:, -1]
        while True:
            token = yield model(token, attention_mask=torch.ones_like(token),
                                past_kv_cache=cache)[:, -1]
    token = yield model(tokens, attention_mask=mask)[:, -1]
    while True:
        tokens, mask = torch.cat([tokens, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        token = yield model(tokens, attention_mask=mask)[:, -1]


@torch.no_grad()
def token_accuracy(model: Model, prompt: str, answer: str) -> list[bool]:
    """For each token of ``answer``: is it the model's top prediction after ``prompt`` and
    the answer's previous tokens (teacher forcing)?"""
    adapter = adapter_for(model)
    ids = adapter.tokenize(prompt)[0][0].tolist()
    target = adapter.token_ids(answer)
    if not target:
        raise PromptError(f"answer {answer!r} has no tokens")
    tokens = adapter.as_tokens([ids + target[:-1]])
    predicted = model(tokens)[0, len(ids) - 1:].argmax(-1).tolist()
    return [p == t for p, t in zip(predicted, target)]


def probabilities(log_probs: Any) -> np.ndarray:
    """``exp`` of mean token log-probabilities: the paper's ``P`` of a multi-token object."""
    return np.exp(np.asarray(log_probs, dtype=float))


@torch.no_grad()
def target_log_probs(
    model: Model, prompts: Sequence[str], targets: Sequence[str],
    batch_size: int = 32,
) -> Float[torch.Tensor, "n_prompts n_targets"]:
    """Mean per-token log-probability of each target continuing each prompt.

    The paper's CounterFact measure: one number per (prompt, target), so
    objects of different token lengths compare fairly.
    """
    adapter = adapter_for(model)
    target_ids = [adapter.token_ids(t) for t in targets]
    for target, ids in zip(targets, target_ids):
        if not ids:
            raise PromptError(f"target {target!r} has no tokens")
    pairs = []
    for prompt in prompts:
        ids = adapter.tokenize(prompt)[0][0].tolist()
        for target, t in zip(targets, target_ids):
            adapter.check_length(len(ids) + len(t) - 1, f"prompt {prompt!r} with target {target!r}")
            pairs.append((ids, t))
    scores = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        rows = [p + t[:-1] for p, t in chunk]
        width = max(len(r) for r in rows)
        tokens = adapter.as_tokens([r + [adapter.pad_id] * (width - len(r)) for r in rows])
        log_probs = torch.log_softmax(model(tokens).float(), -1)  # right padding: exact
        for row, (p, t) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(t))
            scores.append(float(log_probs[row, positions, t].mean()))
    return torch.tensor(scores).view(len(prompts), len(targets))


@torch.no_grad()
def next_token_probs(model: Model, prompt: str, k: int = 5,
                     targets: Sequence[str] = ()) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens, then the first token of each of ``targets``."""
    adapter = adapter_for(model)
    probs = torch.softmax(model(adapter.tokenize(prompt)[0])[0, -1].float(), -1)
    top = probs.topk(k)
    out = [(adapter.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    for target in targets:
        ids = adapter.token_ids(target)
        if ids:
            out.append((adapter.decode(ids[:1]), float(probs[ids[0]])))
    return out


@torch.no_grad()
def greedy_continuation(model: Model, prompt: str, max_new_tokens: int = 20) -> str:
    """The model's most likely continuation of ``prompt`` (deterministic)."""
    adapter = adapter_for(model)
    tokens = adapter.tokenize(prompt)[0]
    start = tokens.shape[1]
    eos = adapter.eos_id
    for _ in range(max_new_tokens):
        nxt = model(tokens)[0, -1].argmax()
        if eos is not None and int(nxt) == eos:
            break
        tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
    return adapter.decode(tokens[0, start:].tolist())


def greedy_answers(model: Model, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 64) -> list[str]:
    """The greedy continuation of each prompt (at most ``max_new_tokens`` tokens, up to EOS),
    as text: :func:`greedy_continuation` for many prompts at once.

    ``batch_size`` prompts run as one left-padded batch (:func:`generate` with
    ``top_k=1``): one pass over the weights per token for all of them, which is
    what costs on a CPU.  Padding changes the logits in the last float digits only,
    so a continuation differs from the prompt's alone only at a near tie.
    """
    prompts = list(prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = generate(model, chunk, max_new_tokens, top_k=1) if chunk else []
        out += [text[len(prompt):] for prompt, text in zip(chunk, texts)]
    return out


@torch.no_grad()
def next_token_log_probs(model: Model, prompts: Sequence[str], batch_size: int = 32
                         ) -> Float[torch.Tensor, "n_prompts d_vocab"]:
    """log-softmax of the next-token logits after each prompt (float32, on the CPU)."""
    adapter = adapter_for(model)
    rows = [adapter.tokenize(p)[0][0].tolist() for p in prompts]
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        tokens = adapter.as_tokens([r + [adapter.pad_id] * (width - len(r)) for r in chunk])
        logits = model(tokens)  # right padding: the last real position is exact
        last = torch.tensor([len(r) - 1 for r in chunk], device=logits.device)
        out.append(torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), -1).cpu())
    return torch.cat(out) if out else torch.zeros(0, adapter.d_vocab)
