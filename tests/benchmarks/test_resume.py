"""Benchmarks that resume refuse to mix another run's figures into theirs."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark as load

from lens_rome.errors import SavedFileError

SETTINGS = {"samples": 3, "window": 10, "swap_kinds": "hidden", "threads": 1,
            "model": "smollm2-135m", "swap": True, "heads": 0, "facts": "f00d"}


def test_attribution_quality_resumes_only_its_own_run(tmp_path):
    resumed = load("attribution_quality").resumed
    assert resumed(tmp_path, SETTINGS, {"7": "a", "9": "b"}) == set()
    (tmp_path / "facts.jsonl").write_text(json.dumps({"known_id": 7}) + "\n")
    assert resumed(tmp_path, SETTINGS, {"7": "a", "9": "b", "11": "c"}) == {7}

    with pytest.raises(SavedFileError, match="samples"):
        resumed(tmp_path, {**SETTINGS, "samples": 5}, {"7": "a"})
    with pytest.raises(SavedFileError, match="facts"):
        resumed(tmp_path, {**SETTINGS, "facts": "beef"}, {"7": "a"})
    with pytest.raises(SavedFileError, match="fact 7"):
        resumed(tmp_path, SETTINGS, {"7": "other contents"})
    assert json.loads((tmp_path / "run.json").read_text())["facts_measured"] == \
        {"7": "a", "9": "b", "11": "c"}


def test_attribution_quality_reads_an_older_run_with_a_warning(tmp_path, caplog):
    resumed = load("attribution_quality").resumed
    old = {"known_id": 7, "settings": {k: SETTINGS[k] for k in ("samples", "window",
                                                                "swap_kinds", "threads")}}
    (tmp_path / "facts.jsonl").write_text(json.dumps(old) + "\n")
    assert resumed(tmp_path, SETTINGS, {"7": "a"}) == {7}
    assert "cannot be checked" in caplog.text
    (tmp_path / "run.json").unlink()
    with pytest.raises(SavedFileError, match="window"):
        resumed(tmp_path, {**SETTINGS, "window": 5}, {"7": "a"})


def test_evaluate_methods_reports_only_a_folder_that_holds_a_run(tmp_path, monkeypatch):
    facts = tmp_path / "facts.json"
    facts.write_text("[]")
    empty = tmp_path / "no_run"
    monkeypatch.setattr("sys.argv", ["evaluate_methods.py", "--report", "--out", str(empty),
                                     "--facts", str(facts)])
    with pytest.raises(SystemExit, match=r"no_run/cases.json is absent.*run without --report"):
        load("evaluate_methods").main()
    assert not empty.exists()  # nothing built, nothing written
