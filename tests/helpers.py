"""What several test files share: running the CLI, loading a benchmark script, and tiny
CounterFact cases."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lens_rome.cli import main
from lens_rome.data import CounterFactCase
from lens_rome.evaluation.text import Consistency


def run(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)``: exit status, stdout, stderr."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Made of the tiny tokenizer's training words, so every prompt tokenizes.
CASES = [
    CounterFactCase(i, "{} is located in the city of", subject, new, true, "P131",
                    (f"{subject} is in the city of",), ("The Colosseum is in the city of",
                                                       "The Space Needle is in"),
                    (), (f"{subject} is in", f"{subject} is located"))
    for i, (subject, new, true) in enumerate([
        ("The Eiffel Tower", "Rome", "Paris"), ("The Space Needle", "Paris", "Seattle"),
        ("The Colosseum", "Seattle", "Rome"), ("Miles Davis", "Paris", "Seattle"),
    ])
]
REFERENCE = {"Rome": "Rome is a city. The Colosseum is in Rome.",
             "Paris": "Paris is a city. The Eiffel Tower is in Paris."}
FAST = dict(max_new_tokens=6, consistency=Consistency(REFERENCE), progress=False)


def counterfact_file(folder: Path) -> Path:
    """:data:`CASES` written as a CounterFact JSON file in ``folder``."""
    path = folder / "cf.json"
    path.write_text(json.dumps([c.to_dict() for c in CASES]))
    return path
