"""Views of a trace: the paper-style heatmap and the offline circuitsvis widget."""

from __future__ import annotations

import re

import pytest
import torch
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure

from lens_rome.tracing.result import TraceResult
from lens_rome.views.trace import TraceView, plot_trace, show_trace

TOKENS = ["The", " E", "iffel", " Tower", " is"]


def make_result(**changes) -> TraceResult:
    torch.manual_seed(0)
    fields = dict(
        scores=torch.rand(len(TOKENS), 6), low_score=0.05, high_score=0.9, answer=" Paris",
        answer_token=7, tokens=list(TOKENS), subject_range=(0, 4), kind="hidden", window=10,
        prompt="The Eiffel Tower is", subject="The Eiffel Tower", model_name="tiny",
    )
    fields.update(changes)
    return TraceResult(**fields)


def colorbar_of(fig: Figure) -> Colorbar:
    colorbars = [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(colorbars) == 1
    return colorbars[0]


def test_plot_is_one_heatmap_with_a_colorbar():
    result = make_result()
    fig = result.plot()
    assert isinstance(fig, Figure)
    heatmap = fig.axes[0]
    assert len(heatmap.images) == 1
    image = heatmap.images[0]
    assert image.get_array().shape == (len(TOKENS), 6)
    assert image.get_cmap().name == "Purples"
    assert image.norm.vmin == pytest.approx(result.low_score)  # white = corrupted score
    assert colorbar_of(fig).ax.get_xlabel() == "p(' Paris')"


def test_plot_rows_are_tokens_in_order_with_subject_starred():
    heatmap = plot_trace(make_result()).axes[0]
    labels = [label.get_text() for label in heatmap.get_yticklabels()]
    assert labels == ["The*", " E*", "iffel*", " Tower*", " is"]
    # the first token is the top row
    bottom, top = heatmap.get_ylim()
    assert top < bottom


@pytest.mark.parametrize(
    ("changes", "cmap", "title", "xlabel"),
    [
        ({}, "Purples", "Impact of restoring state after corrupted input",
         "single restored layer within tiny"),
        ({"kind": "mlp"}, "Greens", "Impact of restoring MLP after corrupted input",
         "center of interval of 10 restored MLP layers"),
        ({"kind": "attn", "window": 4}, "Reds", "Impact of restoring Attn after corrupted input",
         "center of interval of 4 restored Attn layers"),
        ({"sever": "mlp"}, "Purples",
         "Impact of restoring state after corrupted input (severed MLP)",
         "single restored layer within tiny"),
    ],
)
def test_plot_labels_follow_the_kind(changes, cmap, title, xlabel):
    heatmap = plot_trace(make_result(**changes)).axes[0]
    assert heatmap.images[0].get_cmap().name == cmap
    assert heatmap.get_title() == title
    assert heatmap.get_xlabel() == xlabel


def test_plot_logprob_label_and_custom_title():
    fig = plot_trace(make_result(metric="logprob", low_score=-4.0), title="mine")
    assert fig.axes[0].get_title() == "mine"
    assert colorbar_of(fig).ax.get_xlabel() == "log p(' Paris')"


def test_plot_into_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_trace(make_result(), ax=ax) is fig
    assert ax.images


def test_plot_saves_png(tmp_path):
    path = tmp_path / "trace.png"
    make_result().plot().savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_views_reject_scores_that_do_not_match_tokens():
    with pytest.raises(ValueError, match="n_tokens"):
        plot_trace(make_result(scores=torch.rand(3, 6)))
    with pytest.raises(ValueError, match="kind"):
        show_trace(make_result(kind="resid"))


def test_show_contains_tokens_and_header():
    result = make_result()
    view = result.show()
    assert isinstance(view, TraceView)
    page = view._repr_html_()
    assert page == str(view)
    for token in TOKENS:
        assert f'"{token}"' in page  # in the widget's props
    for text in ["The Eiffel Tower is", "&#x27; Paris&#x27;", "0.9", "0.05", "hidden", "layer 5"]:
        assert text in page


def test_show_works_offline():
    page = str(make_result().show())
    sources = re.findall(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    imports = re.findall(r"""\bimport\b[^;]*?\bfrom\s*["']https?://""", page)
    assert sources == [] and imports == []
    assert "CircuitsVis.render(" in page  # the bundle is inline
    assert "unpkg.com" not in page


def test_show_tokens_cannot_break_the_page():
    tokens = ["x", " </script>", " <b>", " &"]
    result = make_result(tokens=tokens, scores=torch.rand(4, 2), subject_range=(1, 2),
                         prompt="x </script> <b> &", subject="</script>")
    page = str(result.show())
    assert page.lower().count("</script") == 1  # only the script element's own end tag
    # circuitsvis writes tokens as raw HTML, so they go in escaped
    assert '" &lt;/script&gt;"' in page and '" &lt;b&gt;"' in page and '" &amp;"' in page


def test_save_refuses_to_overwrite(tmp_path):
    view = make_result().show()
    path = view.save(tmp_path / "trace.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and str(view) in text
    with pytest.raises(FileExistsError, match="overwrite=True"):
        view.save(path)
    path.write_text("old")
    view.save(path, overwrite=True)
    assert path.read_text(encoding="utf-8") == text


def test_views_of_a_real_trace(tiny_gpt2, tmp_path):
    from lens_rome.tracing.engine import trace  # noqa: PLC0415

    result = trace(tiny_gpt2, "The Space Needle is in downtown", "Space Needle", "mlp",
                   samples=2, window=3)
    fig = result.plot()
    heatmap = fig.axes[0]
    assert heatmap.images[0].get_array().shape == (len(result.tokens), tiny_gpt2.cfg.n_layers)
    start, end = result.subject_range
    starred = [label.get_text().endswith("*") for label in heatmap.get_yticklabels()]
    assert starred == [start <= i < end for i in range(len(result.tokens))]
    fig.savefig(tmp_path / "trace.png")
    page = result.show().save(tmp_path / "trace.html").read_text(encoding="utf-8")
    assert "The Space Needle is in downtown" in page
