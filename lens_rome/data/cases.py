"""The paper's evaluation data: CounterFact and zsRE cases, loaded and checked record by record.

Meng et al. (2022, section 4) judge an editor on two datasets:

- **CounterFact**: one counterfactual rewrite per case, ``(s, r, o) -> (s, r, o*)``,
  with prompts that test it: paraphrases of the rewrite prompt (generalisation),
  prompts about *other* subjects that share the relation and the true object
  (specificity), attribute prompts about subjects whose true object is ``o*``,
  and generation prompts (fluency and consistency)::

      {"case_id": 0, "requested_rewrite": {"prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower", "relation_id": "P131",
        "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
       "paraphrase_prompts": [...], "neighborhood_prompts": [...],
       "attribute_prompts": [...], "generation_prompts": [...]}

- **zsRE** in the MEND format: a question about a subject, its paraphrase,
  the answer to teach, and an unrelated question with its answer::

      {"subject": ..., "src": ..., "pred": ..., "rephrase": ..., "alt": ...,
       "answers": [...], "loc": ..., "loc_ans": ...}

:func:`load_counterfact` and :func:`load_zsre` read such JSON files and raise
``InputError`` naming the case and the field of the first bad record.
:func:`lens_rome.data.known_facts.build_counterfact` turns a known-facts file (the paper's
``known_1000.json`` format) into CounterFact cases.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lens_rome.data.requests import SAME_TARGETS, EditRequest, fill
from lens_rome.errors import InputError
from lens_rome.storage import replacing

FORMATS = ("counterfact", "zsre")
CASE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # becomes a file name in evaluation output


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact case.  Objects are stored as in the file, without a leading space."""

    case_id: int | str
    prompt: str  # "{} is located in the city of"
    subject: str
    target_new: str
    target_true: str
    relation_id: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def request(self) -> EditRequest:
        """The rewrite as an edit request (objects with their leading space)."""
        return EditRequest(self.prompt, self.subject, _spaced(self.target_new),
                           _spaced(self.target_true))

    @property
    def rewrite_prompt(self) -> str:
        return fill(self.prompt, self.subject)

    def to_dict(self) -> dict:
        """The case in the CounterFact JSON format."""
        return {
            "case_id": self.case_id,
            "requested_rewrite": {
                "prompt": self.prompt, "subject": self.subject, "relation_id": self.relation_id,
                "target_new": {"str": self.target_new}, "target_true": {"str": self.target_true},
            },
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
        }

    @classmethod
    def from_dict(cls, record: Any, index: int = 0) -> "CounterFactCase":
        """Check one CounterFact record; ``index`` names it when it has no usable ``case_id``."""
        check = _Checker(record, index)
        case_id = check.case_id(record.get("case_id", index) if isinstance(record, Mapping)
                                else index)
        check.label = f"case {case_id}"
        rewrite = check.mapping(record, "requested_rewrite")
        prompt = check.text(rewrite, "prompt", "requested_rewrite.prompt")
        subject = check.text(rewrite, "subject", "requested_rewrite.subject")
        if prompt.count("{}") != 1:
            check.fail("requested_rewrite.prompt", "must contain '{}' exactly once, where the "
                       "subject goes", prompt)
        relation = rewrite.get("relation_id", "")
        if not isinstance(relation, str):
            check.fail("requested_rewrite.relation_id", "must be a string", relation)
        targets = {}
        for name in ("target_new", "target_true"):
            target = check.mapping(rewrite, name, f"requested_rewrite.{name}")
            targets[name] = check.text(target, "str", f"requested_rewrite.{name}.str")
        if targets["target_new"].strip() == targets["target_true"].strip():
            check.fail("requested_rewrite.target_new.str", SAME_TARGETS, targets["target_new"])
        lists = {name: check.texts(record, name, required=name in REQUIRED_LISTS)
                 for name in ("paraphrase_prompts", "neighborhood_prompts",
                              "attribute_prompts", "generation_prompts")}
        return cls(case_id, prompt, subject, targets["target_new"], targets["target_true"],
                   relation, **lists)


REQUIRED_LISTS = ("paraphrase_prompts", "neighborhood_prompts")


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE question (MEND format).  ``case_id`` is the record's index in the file.

    The edit teaches ``answers[0]`` for ``src``, as the paper's code does
    (``target="alt"`` at load time teaches ``alt`` instead).
    """

    case_id: int | str
    subject: str
    src: str
    rephrase: str
    answers: tuple[str, ...]
    loc: str
    loc_ans: str
    alt: str = ""
    pred: str = ""
    target: str = "answers"

    @property
    def target_new(self) -> str:
        return (self.answers[0] if self.target == "answers" else self.alt).strip()

    @property
    def request(self) -> EditRequest:
        """``src`` with ``{}`` for the subject, and the answer to teach (with a leading space)."""
        return EditRequest(self.src.replace(self.subject, "{}", 1), self.subject,
                           " " + self.target_new)

    def to_dict(self) -> dict:
        return {"subject": self.subject, "src": self.src, "pred": self.pred,
                "rephrase": self.rephrase, "alt": self.alt, "answers": list(self.answers),
                "loc": self.loc, "loc_ans": self.loc_ans}

    @classmethod
    def from_dict(cls, record: Any, index: int = 0, target: str = "answers") -> "ZsreCase":
        check = _Checker(record, index)
        subject = check.text(record, "subject")
        src = check.text(record, "src")
        if subject not in src:
            check.fail("src", f"must contain the subject {subject!r}", src)
        rephrase = check.text(record, "rephrase")
        answers = check.texts(record, "answers")
        if not answers or not answers[0].strip():
            check.fail("answers", "must be a list whose first item is a non-empty string",
                       record.get("answers"))
        loc, loc_ans = check.text(record, "loc"), check.text(record, "loc_ans")
        alt = check.text(record, "alt") if target == "alt" else _optional_text(check, record, "alt")
        pred = _optional_text(check, record, "pred")
        return cls(index, subject, src, rephrase, answers, loc, loc_ans, alt, pred, target)


def _optional_text(check: "_Checker", record: Mapping, name: str) -> str:
    value = record.get(name, "")
    if not isinstance(value, str):
        check.fail(name, "must be a string", value)
    return value


def _spaced(text: str) -> str:
    return text if text[:1].isspace() else " " + text


class _Checker:
    """Raises ``InputError("case 17: field must ..., got ...")``."""

    def __init__(self, record: Any, index: int):
        self.label = f"case {index}"
        if not isinstance(record, Mapping):
            raise InputError(f"{self.label}: a record must be a JSON object, "
                             f"got {type(record).__name__}: {record!r:.80}")

    def fail(self, name: str, what: str, value: Any):
        raise InputError(f"{self.label}: {name} {what}, got {value!r:.120}")

    def case_id(self, value: Any) -> int | str:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
                isinstance(value, str) and not CASE_ID.match(value)):
            self.fail("case_id", "must be an integer or a short name of letters, digits, "
                      "'_', '.', '-'", value)
        return value

    def mapping(self, record: Mapping, key: str, name: str | None = None) -> Mapping:
        name = name or key
        if key not in record:
            self.fail(name, "is missing", None)
        if not isinstance(record[key], Mapping):
            self.fail(name, "must be an object", record[key])
        return record[key]

    def text(self, record: Mapping, key: str, name: str | None = None) -> str:
        name = name or key
        value = record.get(key)
        if key not in record:
            self.fail(name, "is missing (must be a non-empty string)", value)
        if not isinstance(value, str) or not value.strip():
            self.fail(name, "must be a non-empty string", value)
        return value

    def texts(self, record: Mapping, key: str, required: bool = True) -> tuple[str, ...]:
        if key not in record:
            if required:
                self.fail(key, "is missing (must be a list of strings)", None)
            return ()
        value = record[key]
        if not isinstance(value, list):
            self.fail(key, "must be a list of strings", value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.fail(f"{key}[{i}]", "must be a non-empty string", item)
        return tuple(value)


def load_counterfact(source: str | Path | Sequence[Mapping]) -> list[CounterFactCase]:
    """CounterFact cases from a JSON file (a list of records) or from the records themselves."""
    records, where = read_records(source, "counterfact")
    cases = [CounterFactCase.from_dict(record, i) for i, record in enumerate(records)]
    _check_unique(cases, where)
    return cases


def load_zsre(source: str | Path | Sequence[Mapping], target: str = "answers") -> list[ZsreCase]:
    """zsRE cases (MEND format) from a JSON file or the records; ``target``: ``"answers"``
    (teach ``answers[0]``, the paper's code) or ``"alt"``."""
    if target not in ("answers", "alt"):
        raise InputError(f"target must be 'answers' or 'alt', got {target!r}")
    records, _ = read_records(source, "zsre")
    return [ZsreCase.from_dict(record, i, target) for i, record in enumerate(records)]


def load_dataset(source: str | Path | Sequence[Mapping], format: str):
    """:func:`load_counterfact` or :func:`load_zsre`: ``format`` is ``"counterfact"``/``"zsre"``."""
    if format == "counterfact":
        return load_counterfact(source)
    if format == "zsre":
        return load_zsre(source)
    raise InputError(f"unknown dataset format {format!r}; expected one of {list(FORMATS)}")


def read_records(source: str | Path | Sequence[Any], format: str) -> tuple[list, str]:
    """The records of a JSON file (a list), or ``source`` itself, checked to be a non-empty
    list; and how to name where they came from in messages."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not valid JSON: {error}") from None
        where = str(path)
    else:
        records, where = source, "the dataset"
    if isinstance(records, Mapping) or not isinstance(records, (list, tuple)):
        raise InputError(f"{where} must hold a JSON list of {format} records, "
                         f"got {type(records).__name__}")
    if not records:
        raise InputError(f"{where} holds no records: an empty dataset cannot be evaluated")
    return list(records), where


def _check_unique(cases: Sequence[CounterFactCase], where: str) -> None:
    seen: set[str] = set()
    for case in cases:
        key = str(case.case_id)
        if key in seen:
            raise InputError(f"case {case.case_id}: case_id appears more than once in {where}; "
                             f"each case needs its own id")
        seen.add(key)


def save_cases(cases: Iterable[CounterFactCase | ZsreCase], path: str | Path, *,
               overwrite: bool = False) -> Path:
    """Write cases as a JSON list in their own format (atomically)."""
    path = Path(path)
    with replacing(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps([c.to_dict() for c in cases], indent=1), encoding="utf-8")
    return path
