"""The short texts the model generates itself, prefixed to edit prompts.

ROME averages ``k*`` (and optimises ``v*``) over the prompt preceded by such
texts, so that the edit holds in any context.  They are generated once per
model and kept in its :class:`~lens_rome.model.adapter.ModelState`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model

# The first words of the generated texts (the paper's code), taken in turn.
PREFIX_STARTERS = ("The", "Therefore", "Because", "I", "You")
MEMO_KEY = "context_prefixes"  # where ModelState.memo keeps them


def context_prefixes(
    model: Model, n: int = 20, lengths: Sequence[int] = (5, 10), seed: int = 0,
    top_k: int = 5,
) -> list[list[int]]:
    """``n`` short texts the model writes itself (token ids, no BOS), for averaging ``k*``.

    Each starts with one of a few common words and is sampled (top-``k``) to
    ``lengths[i]`` tokens; the same ``seed`` gives the same texts.  They are
    generated once per model and kept, so later edits reuse them.
    """
    return cached_prefixes(adapter_for(model), n, lengths, seed, top_k)


def cached_prefixes(adapter: ModelAdapter, n: int = 20, lengths: Sequence[int] = (5, 10),
                    seed: int = 0, top_k: int = 5) -> list[list[int]]:
    """:func:`context_prefixes` of the adapter's model, generated on first use."""
    key = (n, tuple(lengths), seed, top_k)
    cache = adapter.state.memo.setdefault(MEMO_KEY, {})
    if key not in cache:
        cache[key] = _generate_prefixes(adapter, n, tuple(lengths), seed, top_k)
    return cache[key]


@torch.no_grad()
def _generate_prefixes(adapter: ModelAdapter, n: int, lengths: tuple[int, ...], seed: int,
                       top_k: int) -> list[list[int]]:
    model = adapter.model
    generator = torch.Generator().manual_seed(seed)
    banned = torch.tensor(adapter.special_ids, dtype=torch.long)
    bos = adapter.bos
    prefixes = []
    counts = [n // len(lengths) + (i < n % len(lengths)) for i in range(len(lengths))]
    for length, count in zip(lengths, counts):
        if count == 0:
            continue
        rows = []
        for i in range(count):
            starter = adapter.token_ids(PREFIX_STARTERS[i % len(PREFIX_STARTERS)])
            rows.append(bos + starter[:length])
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows):  # starters of several tokens: keep the first
            rows = [r[: len(bos) + 1] for r in rows]
        tokens = adapter.as_tokens(rows)
        while tokens.shape[1] - len(bos) < length:
            logits = model(tokens)[:, -1].float().cpu()
            logits[:, banned] = -float("inf")
            values, indices = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(values, -1), 1, generator=generator)
            tokens = torch.cat([tokens, indices.gather(1, choice).to(tokens.device)], 1)
        prefixes += [row[len(bos):] for row in tokens.tolist()]
    return prefixes
