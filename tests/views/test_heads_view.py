"""Per-head traces (3-D scores) in TraceResult and its views; attribution estimates' labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lens_rome.tracing.result import TraceResult
from lens_rome.views.trace import head_position, plot_trace, show_trace

TOKENS = ["The", " E", "iffel", " Tower", " is"]
N_LAYERS, N_HEADS = 6, 4


def head_result(**changes) -> TraceResult:
    torch.manual_seed(0)
    scores = torch.rand(len(TOKENS), N_LAYERS, N_HEADS) * 0.1 + 0.05
    scores[2, 3, 1] = 0.8  # the strongest restoration: head 1 of layer 3 at "iffel"
    scores[4, 5, 2] = 0.6
    fields = dict(
        scores=scores, low_score=0.05, high_score=0.9, answer=" Paris", answer_token=7,
        tokens=list(TOKENS), subject_range=(0, 4), kind="head", window=1,
        prompt="The Eiffel Tower is", subject="The Eiffel Tower", model_name="tiny",
    )
    fields.update(changes)
    return TraceResult(**fields)


def test_head_result_sites_frame_effects():
    result = head_result()
    assert result.n_layers == N_LAYERS and result.n_heads == N_HEADS
    assert result.top_sites(2) == [(2, "iffel", 3, 1, pytest.approx(0.8)),
                                   (4, " is", 5, 2, pytest.approx(0.6))]
    assert torch.equal(result.indirect_effect, result.scores - 0.05)
    frame = result.to_frame()
    assert len(frame) == len(TOKENS) * N_LAYERS * N_HEADS
    row = frame[(frame.position == 2) & (frame.layer == 3) & (frame["head"] == 1)]
    assert row.score.item() == pytest.approx(0.8) and row.is_subject.item()
    assert row.indirect_effect.item() == pytest.approx(0.75)
    assert "head" not in head_result(kind="hidden", scores=torch.rand(5, 6)).to_frame().columns


def test_top_sites_skip_unrestored_states():
    scores = torch.rand(len(TOKENS), N_LAYERS)
    scores[0] = float("nan")
    result = head_result(kind="hidden", scores=scores)
    assert all(position != 0 for position, *_ in result.top_sites(30))
    assert len(result.top_sites(100)) == (len(TOKENS) - 1) * N_LAYERS


def test_head_result_round_trips(tmp_path):
    result = head_result(method="attribution", seed=3)
    loaded = TraceResult.load(result.save(tmp_path / "heads.json"))
    assert torch.equal(loaded.scores, result.scores) and loaded.n_heads == N_HEADS
    assert loaded.method == "attribution" and loaded.seed == 3


def test_head_heatmap_is_heads_by_layers_at_the_strongest_token():
    result = head_result()
    assert head_position(result) == 2
    fig = result.plot()
    assert isinstance(fig, Figure)
    heatmap = fig.axes[0]
    image = heatmap.images[0]
    assert image.get_array().shape == (N_HEADS, N_LAYERS)
    np.testing.assert_allclose(image.get_array(), result.scores[2].T.numpy())
    assert image.get_cmap().name == "Oranges"
    assert image.norm.vmin == pytest.approx(0.05)
    assert "'iffel' (token 2)" in heatmap.get_title()
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["H0", "H1", "H2", "H3"]


def test_head_heatmap_at_a_chosen_token_and_bad_positions():
    fig = plot_trace(head_result(), position=4, title="mine")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(),
                               head_result().scores[4].T.numpy())
    assert fig.axes[0].get_title() == "mine"
    with pytest.raises(ValueError, match="position must be a token index 0..4"):
        plot_trace(head_result(), position=5)
    with pytest.raises(ValueError, match="position applies to per-head traces"):
        plot_trace(head_result(kind="hidden", scores=torch.rand(5, 6)), position=1)
    with pytest.raises(ValueError, match=r"\[n_tokens, n_layers, n_heads\]"):
        plot_trace(head_result(scores=torch.rand(5, 6)))


def test_head_view_offers_the_strongest_heads():
    page = str(show_trace(head_result()))
    assert '"L3.H1"' in page and '"L5.H2"' in page
    assert page.index('"L3.H1"') < page.index('"L5.H2"')  # strongest first
    assert "one attention head" in page


def test_estimates_say_so_and_logit_difference_is_labelled():
    result = head_result(kind="hidden", scores=torch.rand(5, 6),
                         method="attribution", metric="logit_diff")
    fig = result.plot()
    assert fig.axes[0].get_title().startswith("Estimated impact of restoring state")
    assert fig.axes[-1].get_xlabel() == "logit diff(' Paris')"
    assert "Attribution estimate of a causal trace" in str(result.show())
