"""The short texts the model generates itself, prefixed to edit prompts."""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from transformer_lens import HookedTransformer

from lens_rome.editing.hparams import PREFIX_STARTERS
from lens_rome.model.adapter import adapter_for

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
