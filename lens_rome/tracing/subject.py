"""Where the subject sits in a prompt, and the answer's first token."""

from __future__ import annotations

import logging

import torch
from transformer_lens import HookedTransformer

from lens_rome.model.adapter import adapter_for

log = logging.getLogger(__name__)




def locate_subject(
    model: HookedTransformer, prompt: str, subject: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens ``[1, pos]`` of ``prompt`` and the token range ``[start, end)`` of ``subject``.

    The subject is found by character offsets (its first occurrence), so a
    subject whose edges fall inside a token still gets every token it touches.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise ValueError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; the subject must be "
            f"written exactly as in the prompt (case and spaces included)"
        )
    char_end = char_start + len(subject)
    tokens, spans = adapter_for(model).tokenize(prompt)
    touched = [i for i, (a, b) in enumerate(spans) if a < char_end and b > char_start and b > a]
    return tokens, (touched[0], touched[-1] + 1)


def answer_token(model: HookedTransformer, target: str) -> int:
    """The token whose probability a trace measures for the answer ``target``."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty string such as ' Paris', got {target!r}")
    adapter = adapter_for(model)
    ids = adapter.tokenize(target)[0][0, int(adapter.prepend_bos) :].tolist()
    if not ids:
        raise ValueError(f"target {target!r} has no tokens")
    if len(ids) > 1:
        log.info("target %r has %d tokens; tracing its first, %r", target, len(ids),
                 model.tokenizer.decode(ids[:1]))
    return ids[0]
