"""Where the subject sits in a prompt, and the answer's first token."""

from __future__ import annotations

import logging

import torch

from lens_rome.errors import PromptError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model

log = logging.getLogger(__name__)


def locate_subject(
    model: Model, prompt: str, subject: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens ``[1, pos]`` of ``prompt`` and the token range ``[start, end)`` of ``subject``.

    The subject is found by character offsets (its first occurrence), so a
    subject whose edges fall inside a token still gets every token it touches.
    """
    return _locate_subject(adapter_for(model), prompt, subject)


def _locate_subject(
    adapter: ModelAdapter, prompt: str, subject: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise PromptError(f"subject must be a non-empty string, got {subject!r}")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise PromptError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; the subject must be "
            f"written exactly as in the prompt (case and spaces included)"
        )
    char_end = char_start + len(subject)
    tokens, spans = adapter.tokenize(prompt)
    touched = [i for i, (a, b) in enumerate(spans) if a < char_end and b > char_start and b > a]
    return tokens, (touched[0], touched[-1] + 1)


def answer_token(model: Model, target: str) -> int:
    """The token whose probability a trace measures for the answer ``target``."""
    return _answer_token(adapter_for(model), target)


def _answer_token(adapter: ModelAdapter, target: str) -> int:
    if not isinstance(target, str) or not target:
        raise PromptError(f"target must be a non-empty string such as ' Paris', got {target!r}")
    ids = adapter.token_ids(target)
    if not ids:
        raise PromptError(f"target {target!r} has no tokens")
    if len(ids) > 1:
        log.info("target %r has %d tokens; tracing its first, %r", target, len(ids),
                 adapter.decode(ids[:1]))
    return ids[0]
