"""The ``lens-rome`` command line: files written, never overwritten silently, clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import run

from lens_rome.cli import arguments, demo, main
from lens_rome.cli.demo import prepare_folder
from lens_rome.cli.output import report, trace_paths, write_trace
from lens_rome.errors import InputError
from lens_rome.tracing.result import TraceResult

# Subject late in the prompt: only 4 of 8 tokens need restoring, so the trace is quick.
PROMPT = "The mother tongue of Vladimir Putin is"
SUBJECT = "Vladimir Putin"
FILES = ["trace_hidden.png", "trace_hidden.html", "trace_hidden.json"]




def trace_args(out, *extra):
    return ["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "hidden",
            "--samples", "2", "--out", out, *extra]


def fake_result(**changes) -> TraceResult:
    tokens = ["The", " mother", " tongue", " of", " Vladimir", " Putin", " is"]
    fields = dict(
        scores=torch.linspace(0.01, 0.6, len(tokens) * 5).view(len(tokens), 5), low_score=0.01,
        high_score=0.6, answer=" Russian", answer_token=1, tokens=tokens, subject_range=(4, 6),
        kind="hidden", window=1, prompt=PROMPT, subject=SUBJECT, samples=2, model_name="fake",
    )
    fields.update(changes)
    return TraceResult(**fields)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(name, backend=None):
        raise AssertionError("the command loaded a model before checking its input")

    monkeypatch.setattr(arguments, "load", refuse)




def test_write_trace_writes_png_html_json_that_reload(tmp_path):
    result = fake_result()
    paths = write_trace(result, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == sorted(FILES)
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert "<html>" in paths["html"].read_text()
    loaded = TraceResult.load(paths["json"])
    assert torch.equal(loaded.scores, result.scores) and loaded.answer == " Russian"
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_write_trace_refuses_existing_files_unless_overwrite(tmp_path):
    write_trace(fake_result(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_trace(fake_result(high_score=0.7), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before
    write_trace(fake_result(high_score=0.7), tmp_path, overwrite=True)
    assert TraceResult.load(tmp_path / "trace_hidden.json").high_score == 0.7


def test_severed_traces_get_their_own_files(tmp_path):
    paths = write_trace(fake_result(sever="mlp"), tmp_path)
    assert paths["json"].name == "trace_hidden_sever_mlp.json"


def test_report_names_scores_sites_and_files(tmp_path):
    result = fake_result()
    text = report(result, trace_paths(tmp_path, "hidden"))
    assert "p(' Russian') clean 0.6000, corrupted 0.0100" in text
    site = result.top_sites(1)[0]
    assert f"{site[1]!r}" in text and f"layer {site[2]:>3}" in text
    assert str(tmp_path / "trace_hidden.json") in text
    subject_line = next(line for line in text.splitlines() if "best site at the subject" in line)
    assert "' Putin'" in subject_line and "layer   4" in subject_line  # best of rows 4..5




def test_existing_file_is_refused_before_any_work(tmp_path, capsys, no_model):
    (tmp_path / "trace_hidden.html").write_text("mine")
    status, out, err = run(trace_args(tmp_path), capsys)
    assert status == 2
    assert err.startswith("error: ") and "trace_hidden.html" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (tmp_path / "trace_hidden.html").read_text() == "mine"
    assert not (tmp_path / "trace_hidden.png").exists()


def test_every_kind_is_checked_with_all(tmp_path, capsys, no_model):
    (tmp_path / "trace_attn.json").write_text("{}")
    status, _, err = run(["trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "all",
                          "--out", tmp_path], capsys)
    assert status == 2 and "trace_attn.json" in err


def test_sever_needs_kind_hidden(tmp_path, capsys, no_model):
    status, _, err = run(trace_args(tmp_path, "--sever", "mlp", "--kind", "mlp"), capsys)
    assert status == 2 and err.startswith("error: ") and "--kind hidden" in err


@pytest.mark.parametrize("flag, value", [("--samples", "0"), ("--window", "-1"),
                                         ("--noise", "-0.1"), ("--kind", "everything")])
def test_bad_options_exit_2_with_usage(tmp_path, capsys, no_model, flag, value):
    status, _, err = run(trace_args(tmp_path, flag, value), capsys)
    assert status == 2 and flag in err


def test_a_command_is_required(capsys):
    status, _, err = run([], capsys)
    assert status == 2 and "usage" in err


def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys, monkeypatch):
    def bad_input(name, backend=None):
        raise InputError(f"no model {name!r} here")

    monkeypatch.setattr(arguments, "load", bad_input)
    assert main([str(a) for a in trace_args(tmp_path, "--model", "elsewhere")]) == 2
    assert capsys.readouterr().err == "error: no model 'elsewhere' here\n"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(name, backend=None):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(arguments, "load", bug)
    with pytest.raises(RuntimeError, match="a bug, not bad input"):
        main([str(a) for a in trace_args(tmp_path)])


def test_parsing_imports_no_torch():
    code = ("import sys, contextlib, io, lens_rome.cli as cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    cli.main(['trace', '--help'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformer_lens')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_unknown_model_exits_2(tmp_path, capsys):
    status, out, err = run(trace_args(tmp_path, "--model", "no-such-model"), capsys)
    assert status == 2
    assert err.startswith("error: ") and "no-such-model" in err and "smollm2-135m" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())




def test_demo_writes_only_into_its_own_folder(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert demo.main(["--out", str(foreign), "--samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did not create" in err and "Traceback" not in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    fresh = tmp_path / "fresh"
    prepare_folder(fresh)  # new folder: marked as the demo's
    (fresh / "eiffel_tower").mkdir()
    prepare_folder(fresh)  # the demo's own, non-empty folder: reused




@pytest.mark.embedded
def test_trace_writes_files_refuses_then_overwrites(tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, err = run(trace_args(out), capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert "p(' Russian') clean" in stdout and "top 3 restoration sites" in stdout
    assert str(out / "trace_hidden.json") in stdout
    assert "Moving model" not in stdout + err  # TransformerLens' chatter is not shown
    result = TraceResult.load(out / "trace_hidden.json")
    assert result.samples == 2 and result.kind == "hidden" and result.subject == SUBJECT
    assert result.high_score > result.low_score

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, _, err = run(trace_args(out), capsys)
    assert status == 2 and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    status, stdout, err = run(trace_args(out, "--overwrite", "--seed", "1"), capsys)
    assert status == 0, err
    rewritten = TraceResult.load(out / "trace_hidden.json")
    assert rewritten.seed == 1
    assert not torch.equal(rewritten.scores, result.scores)  # other noise, new file


@pytest.mark.embedded
def test_subject_not_in_prompt_exits_2_without_traceback(tmp_path, capsys):
    status, out, err = run(["trace", "--prompt", PROMPT, "--subject", "Angela Merkel",
                            "--out", tmp_path], capsys)
    assert status == 2
    assert err.startswith("error: ") and "'Angela Merkel'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
