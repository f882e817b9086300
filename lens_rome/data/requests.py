"""An edit request: a fact ``(s, r, o)`` and the new object ``o*``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lens_rome.errors import InputError, PromptError, WrongTypeError

# Why a request (or a CounterFact record) whose new object is its true one is refused.
SAME_TARGETS = "must differ from target_true (the new object is the one the fact already has)"


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite: ``prompt`` with ``{}`` where ``subject`` goes, and the new object.

    ``target_new`` is the continuation to make likely, usually with its leading
    space (``" Rome"``); ``target_true`` (optional) the one it replaces.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise WrongTypeError(f"{name} must be a string, got {type(value).__name__}: "
                                     f"{value!r}")
        if not self.target_new.strip():
            raise PromptError(
                f"target_new must be a non-empty string such as ' Rome', got {self.target_new!r}"
            )
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise WrongTypeError(f"target_true must be a string or None, got {self.target_true!r}")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise InputError(f"target_new {SAME_TARGETS}, got {self.target_new!r}")
        if not self.subject.strip():
            raise PromptError(f"subject must be a non-empty string, got {self.subject!r}")
        slots = self.prompt.count("{}")
        if slots == 0:
            if self.subject in self.prompt:
                hint = self.prompt.replace(self.subject, "{}", 1)
                raise PromptError(
                    f"prompt {self.prompt!r} has no '{{}}' where the subject goes; "
                    f"write it as {hint!r}"
                )
            raise PromptError(
                f"subject {self.subject!r} is not in prompt {self.prompt!r}, and the prompt has "
                f"no '{{}}' to put it in; write the prompt as e.g. '{{}} is located in the city of'"
            )
        if slots > 1:
            raise PromptError(f"prompt {self.prompt!r} must contain '{{}}' once, not {slots} times")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.prompt, self.subject)

    @classmethod
    def parse(cls, request: "EditRequest | Mapping[str, Any]") -> "EditRequest":
        """Accept an ``EditRequest``, ``{"prompt", "subject", "target_new"[, "target_true"]}``,
        or a CounterFact record (``{"requested_rewrite": {..., "target_new": {"str": ...}}}``
        or its ``requested_rewrite`` alone)."""
        if isinstance(request, EditRequest):
            return request
        if not isinstance(request, Mapping):
            raise WrongTypeError(
                "an edit request is a dict {'prompt': '{} is located in', 'subject': ..., "
                f"'target_new': ' Rome'}} or a CounterFact record, got {type(request).__name__}"
            )
        data = request.get("requested_rewrite", request)
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise InputError(
                f"edit request lacks {missing}; expected keys 'prompt' (with '{{}}'), 'subject', "
                f"'target_new' (and optionally 'target_true'), got {sorted(data)}"
            )

        def text(value):
            return value.get("str") if isinstance(value, Mapping) else value

        target_new, target_true = text(data["target_new"]), text(data.get("target_true"))
        if isinstance(request, Mapping) and "requested_rewrite" in request or isinstance(
            data["target_new"], Mapping
        ):  # CounterFact stores objects without their leading space
            target_new = _spaced(target_new)
            target_true = _spaced(target_true) if target_true else target_true
        return cls(data["prompt"], data["subject"], target_new, target_true)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill(prompt: str, subject: str) -> str:
    """``prompt`` with ``subject`` in place of ``{}`` (other braces are left alone)."""
    return prompt.replace("{}", subject, 1)


def _spaced(text: str | None) -> str | None:
    if isinstance(text, str) and text and not text[0].isspace():
        return " " + text
    return text
