"""CounterFact and zsRE loading (record-by-record checks) and the known-facts builder."""

from __future__ import annotations

import copy
import json

import pytest

from lens_rome.data.cases import (
    CounterFactCase,
    ZsreCase,
    load_counterfact,
    load_dataset,
    load_zsre,
    save_cases,
)
from lens_rome.data.known_facts import build_counterfact

RECORD = {
    "case_id": 17,
    "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                          "relation_id": "P131", "target_new": {"str": "Rome"},
                          "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["The Eiffel Tower is in"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
    "attribute_prompts": ["The Colosseum is located in the city of"],
    "generation_prompts": ["The Eiffel Tower is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College", "rephrase": "What university did Watts Humphrey go to?",
        "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving"}
FACTS = [  # a miniature known-facts file
    {"known_id": i, "subject": s, "attribute": o, "template": t, "prediction": "",
     "prompt": t.replace("{}", s), "relation_id": r}
    for i, (s, o, t, r) in enumerate([
        ("The Eiffel Tower", "Paris", "{} is located in the city of", "P131"),
        ("The Louvre", "Paris", "{} is in the city of", "P131"),
        ("The Colosseum", "Rome", "{} is located in the city of", "P131"),
        ("The Pantheon", "Rome", "{} is in the city of", "P131"),
        ("Miles Davis", "trumpet", "{} plays the", "P1303"),
        ("Louis Armstrong", "trumpet", "{} is known for playing the", "P1303"),
        ("Jimi Hendrix", "guitar", "{} plays the", "P1303"),
    ])
]


def test_counterfact_round_trip(tmp_path):
    case = load_counterfact([RECORD])[0]
    assert case.case_id == 17 and case.target_new == "Rome"
    assert case.request.target_new == " Rome" and case.request.target_true == " Paris"
    assert case.rewrite_prompt == "The Eiffel Tower is located in the city of"
    path = save_cases([case], tmp_path / "cf.json")
    assert load_counterfact(path) == [case]
    assert json.loads(path.read_text())[0] == RECORD


def _broken(path: str, value):
    record = copy.deepcopy(RECORD)
    *parents, last = path.split(".")
    target = record
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return record


@pytest.mark.parametrize("path, value, message", [
    ("requested_rewrite.target_new.str", "",
     "case 17: requested_rewrite.target_new.str must be a non-empty string, got ''"),
    ("requested_rewrite.target_true", "Paris",
     "case 17: requested_rewrite.target_true must be an object"),
    ("requested_rewrite.prompt", "The Eiffel Tower is in",
     "case 17: requested_rewrite.prompt must contain '{}' exactly once"),
    ("requested_rewrite.subject", KeyError, "case 17: requested_rewrite.subject is missing"),
    ("paraphrase_prompts", "The Eiffel Tower is in",
     "case 17: paraphrase_prompts must be a list of strings"),
    ("neighborhood_prompts", ["ok", 3], r"case 17: neighborhood_prompts\[1\] must be a non-empty"),
    ("neighborhood_prompts", KeyError, "case 17: neighborhood_prompts is missing"),
    ("requested_rewrite", KeyError, "case 17: requested_rewrite is missing"),
    ("case_id", ["x"], "case_id must be an integer"),
])
def test_counterfact_errors_name_case_and_field(path, value, message):
    good = copy.deepcopy(RECORD) | {"case_id": 3}
    with pytest.raises(ValueError, match=message):
        load_counterfact([good, _broken(path, value)])


def test_dataset_level_errors(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no records"):
        load_counterfact(empty)
    with pytest.raises(ValueError, match="no records"):
        load_zsre(empty)
    with pytest.raises(ValueError, match="unknown dataset format 'mend'"):
        load_dataset(empty, "mend")
    with pytest.raises(ValueError, match="appears more than once"):
        load_counterfact([RECORD, RECORD])
    with pytest.raises(ValueError, match="case 0: a record must be a JSON object"):
        load_counterfact(["not a record"])
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_counterfact(bad)


def test_zsre_records():
    case = load_zsre([ZSRE])[0]
    assert isinstance(case, ZsreCase) and case.case_id == 0
    assert case.request.prompt == "What university did {} attend?"
    assert case.request.target_new == " Illinois Institute of Technology"
    assert load_zsre([ZSRE], target="alt")[0].request.target_new == " University of Michigan"
    with pytest.raises(ValueError, match="case 1: src must contain the subject"):
        load_zsre([ZSRE, ZSRE | {"subject": "Someone Else"}])
    with pytest.raises(ValueError, match="case 0: answers"):
        load_zsre([ZSRE | {"answers": []}])
    with pytest.raises(ValueError, match="case 0: loc_ans is missing"):
        load_zsre([{k: v for k, v in ZSRE.items() if k != "loc_ans"}])


def test_build_counterfact_follows_the_recipe():
    cases = build_counterfact(FACTS, seed=1)
    assert cases == build_counterfact(FACTS, seed=1)  # deterministic
    by_subject = {f["subject"]: f for f in FACTS}
    for case in cases:
        fact = by_subject[case.subject]
        relation = [f for f in FACTS if f["relation_id"] == fact["relation_id"]]
        assert case.case_id == fact["known_id"] and case.target_true == fact["attribute"]
        assert case.target_new != case.target_true
        assert case.target_new in {f["attribute"] for f in relation}
        assert case.rewrite_prompt == fact["prompt"]
        assert case.paraphrase_prompts and case.rewrite_prompt not in case.paraphrase_prompts
        assert all(case.subject in p for p in case.paraphrase_prompts)
        for prompt in case.neighborhood_prompts:
            other = next(f for f in relation if f["prompt"] == prompt)
            assert other["attribute"] == case.target_true and other["subject"] != case.subject
        for prompt in case.attribute_prompts:
            other = next(f for f in relation if f["prompt"] == prompt)
            assert other["attribute"] == case.target_new
        assert 1 <= len(case.generation_prompts) <= 2
    # Jimi Hendrix has no neighbour (nobody else plays the guitar): skipped
    assert "Jimi Hendrix" not in {c.subject for c in cases}
    assert len(build_counterfact(FACTS, n=2)) == 2
    loaded = load_counterfact([c.to_dict() for c in cases])
    assert loaded == cases


def test_build_counterfact_errors():
    with pytest.raises(ValueError, match="only_correct=True needs the model"):
        build_counterfact(FACTS, only_correct=True)
    with pytest.raises(ValueError, match="lacks 'relation_id'"):
        build_counterfact([{k: v for k, v in FACTS[0].items() if k != "relation_id"}])
    with pytest.raises(ValueError, match="no known fact"):
        build_counterfact(FACTS[4:5])


def test_build_from_the_known_facts_file(known_facts):
    cases = build_counterfact(known_facts, n=150, seed=0)
    assert len(cases) == 150
    assert len({c.case_id for c in cases}) == 150
    assert all(isinstance(c, CounterFactCase) and c.attribute_prompts for c in cases)
