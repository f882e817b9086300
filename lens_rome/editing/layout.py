"""Where the subject's lookup token sits in each prompt an edit reads."""

from __future__ import annotations

from dataclasses import dataclass

from lens_rome.data.requests import EditRequest, fill
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.prefixes import cached_prefixes
from lens_rome.errors import InputError, PromptError
from lens_rome.model.adapter import ModelAdapter


@dataclass
class PromptTokens:
    """Token ids (no BOS) of a prompt text, the subject's token range in them, and where the
    prompt itself begins (after a context prefix; 0 for the bare prompt)."""

    ids: list[int]
    subject_range: tuple[int, int]
    start: int = 0

    def lookup(self, lookup: str | int, reference: tuple[tuple[int, int], int]) -> int:
        """The lookup token's index in :attr:`ids` (see :func:`lookup_position`)."""
        first, last = self.subject_range
        return self.start + lookup_position(lookup, (first - self.start, last - self.start),
                                            len(self.ids) - self.start, reference)


def _prompt_tokens(adapter: ModelAdapter, text: str, char_start: int, char_end: int,
                   prompt_char: int = 0) -> PromptTokens:
    """Tokens of ``text``, the subject at characters ``char_start:char_end``, the prompt from
    character ``prompt_char`` on."""
    tokens, spans = adapter.tokenize(text)
    skip = adapter.n_bos
    ids, spans = tokens[0, skip:].tolist(), spans[skip:]
    touched = [i for i, (a, b) in enumerate(spans) if a < char_end and b > char_start and b > a]
    if not touched:
        raise PromptError(f"subject at characters {char_start}:{char_end} of {text!r} has no "
                          f"tokens")
    start = next((i for i, (_, b) in enumerate(spans) if b > prompt_char), 0)
    return PromptTokens(ids, (touched[0], touched[-1] + 1), start)


def subject_prompt(adapter: ModelAdapter, prompt: str, subject: str, lead: str = ""
                   ) -> PromptTokens:
    """Tokens of ``lead + fill(prompt, subject)`` and where the subject lies in them."""
    start = len(lead) + prompt.index("{}")
    return _prompt_tokens(adapter, lead + fill(prompt, subject), start, start + len(subject),
                          len(lead.rstrip()))


def context_prompts(adapter: ModelAdapter, request: EditRequest, hp: RomeHyperParams
                    ) -> list[PromptTokens]:
    """The bare prompt, then the prompt after each context prefix, joined as the paper's
    code joins them (``prefix + ". " + prompt``): the rows ``k*`` averages over.

    With ``hp.prefixes`` (texts) each joined text is tokenized whole; the generated
    prefixes (token ids, :func:`context_prefixes`) are followed by the tokens of
    ``"."`` and of ``" " + prompt``.
    """
    bare = subject_prompt(adapter, request.prompt, request.subject)
    if hp.prefixes is not None:
        return [bare] + [subject_prompt(adapter, request.prompt, request.subject, text + ". ")
                         for text in hp.prefixes]
    spaced = subject_prompt(adapter, request.prompt, request.subject, lead=" ")
    dot = adapter.token_ids(".")
    rows = [bare]
    for prefix in cached_prefixes(adapter, hp.n_prefixes, hp.prefix_lengths, hp.seed):
        shift = len(prefix) + len(dot)
        first, last = spaced.subject_range
        rows.append(PromptTokens(prefix + dot + spaced.ids, (first + shift, last + shift), shift))
    return rows


def lookup_position(
    lookup: str | int, subject_range: tuple[int, int], n_tokens: int,
    reference: tuple[tuple[int, int], int] | None = None,
) -> int:
    """The index of the lookup token in a prompt of ``n_tokens`` tokens (BOS not counted).

    An int ``lookup`` indexes the tokens of the bare prompt, whose subject range
    and length are ``reference``; in another tokenization of the same text it
    keeps its place relative to the subject (inside it) or to the end (after it).
    """
    start, end = subject_range
    if lookup == "subject_last":
        return end - 1
    if lookup == "subject_first":
        return start
    if lookup == "last":
        return n_tokens - 1
    (ref_start, ref_end), ref_n = reference if reference is not None else (subject_range, n_tokens)
    index = lookup + ref_n if lookup < 0 else lookup
    if not 0 <= index < ref_n:
        raise InputError(
            f"lookup index {lookup} is out of range for a prompt of {ref_n} tokens"
        )
    if index < ref_end:
        return min(max(start + index - ref_start, 0), end - 1) if index >= ref_start else index
    return max(n_tokens - (ref_n - index), 0)
