"""The collapse monitor: perplexity on held-out ordinary text, before and after editing.

A few bad edits can wreck a model ("The Fall of ROME", 2024); perplexity on
ordinary text is the signal users watch.  The text is the last
:data:`~lens_rome.data.corpus.HELDOUT_TEXTS` of the embedded Wikipedia
summaries, which key statistics never read (:func:`~lens_rome.data.corpus.wikipedia_texts`),
packed into ``chunks`` chunks of ``token_length`` tokens: the same tokens every
time, so the perplexities of one model before and after an edit compare pair-wise.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from lens_rome.checks import positive_int
from lens_rome.data.corpus import HELDOUT, packed_chunks, wikipedia_texts
from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model

log = logging.getLogger(__name__)

DEFAULT_CHUNKS = 4  # 512 tokens: about 2 s for SmolLM2 on 2 CPU cores
DEFAULT_TOKEN_LENGTH = 128
# evaluate warns when an edited model's perplexity exceeds the unedited one's by this factor.
# Over 50 single ROME edits of SmolLM2 (docs/evaluation.md) the mean rose 0.8% and 49 of 50
# stayed within 5%; one rose 29%.  A collapsed model's is many times the original.
COLLAPSE_RATIO = 1.2


def heldout_texts() -> Iterable[str]:
    """The held-out Wikipedia summaries (never read by key statistics)."""
    return wikipedia_texts(HELDOUT)


@torch.no_grad()
def perplexity(model: Model, texts: Iterable[str] | None = None, *,
               chunks: int = DEFAULT_CHUNKS, token_length: int | None = None,
               batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the first ``chunks`` chunks
    ``[token_length]`` of ``texts`` packed end to end (default: :func:`heldout_texts`;
    ``token_length`` defaults to :data:`DEFAULT_TOKEN_LENGTH` or the context, if shorter).

    A model that expects BOS gets it at the start of each chunk; BOS is not predicted.
    """
    positive_int(chunks, "chunks")
    positive_int(batch_size, "batch_size")
    adapter = adapter_for(model)
    if token_length is None:
        token_length = min(DEFAULT_TOKEN_LENGTH, adapter.n_ctx)
    rows = []
    for chunk in packed_chunks(adapter, heldout_texts() if texts is None else texts,
                               token_length):
        rows.append(chunk)
        if len(rows) == chunks:
            break
    if len(rows) < chunks:
        raise InputError(f"the texts fill only {len(rows)} chunks of {token_length} tokens, "
                         f"not chunks={chunks}: pass fewer chunks or more text")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        tokens = adapter.as_tokens([r.tolist() for r in rows[start:start + batch_size]])
        log_probs = torch.log_softmax(model(tokens).double(), -1)
        taken = log_probs[:, :-1].gather(-1, tokens[:, 1:, None].to(log_probs.device))
        total -= float(taken.sum())
        count += taken.numel()
    return math.exp(total / count)


def collapse_warning(unedited: float, edited: float, where: str) -> str | None:
    """A warning (and a log record) when ``edited`` perplexity exceeds ``unedited`` by more than
    :data:`COLLAPSE_RATIO`; None otherwise."""
    if not (math.isfinite(edited) and edited <= COLLAPSE_RATIO * unedited):
        message = (f"{where}: perplexity on held-out text rose from {unedited:.2f} to "
                   f"{edited:.2f} (more than {COLLAPSE_RATIO}x): the model may be collapsing; "
                   f"check the update norms and the edits' layers")
        log.warning(message)
        return message
    return None
