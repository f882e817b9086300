"""The hybrid trace: an estimate with the top cells of each token restored exactly."""

from __future__ import annotations

import pytest
import torch

from lens_rome.errors import InputError
from lens_rome.tracing.attribution import attribute
from lens_rome.tracing.engine import trace, trace_many
from lens_rome.tracing.noise_rules import Gaussian, SubjectSwap
from lens_rome.tracing.result import TraceResult

PROMPT = "Where is The Eiffel Tower? It is in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.mark.parametrize("architecture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn", "head"])
@pytest.mark.parametrize("metric", ["prob", "logprob"])
def test_exact_cells_are_the_exact_trace_and_the_rest_the_estimate(architecture, kind, metric,
                                                                   request):
    """The estimate's k best cells of each token hold the exact trace's scores; the others
    the estimate's indirect effects on the exact corrupted score."""
    model = request.getfixturevalue(architecture)
    options = dict(samples=3, window=3, noise=Gaussian(level=0.4), metric=metric, seed=5)
    k = 2
    hybrid = trace(model, PROMPT, SUBJECT, kind, method="hybrid", verify=k, verify_best=0,
                   **options)
    exact = trace(model, PROMPT, SUBJECT, kind, **options)
    estimate = attribute(model, PROMPT, SUBJECT, kind, **options)
    mask, start = hybrid.exact_cells, hybrid.subject_range[0]
    assert hybrid.method == "hybrid"
    assert (hybrid.meta["verify"], hybrid.meta["verify_best"]) == (k, 0)
    assert mask.shape == hybrid.scores.shape and mask.dtype == torch.bool
    assert hybrid.low_score == exact.low_score and hybrid.high_score == exact.high_score
    for position in range(start, len(hybrid.tokens)):
        row = estimate.scores[position].flatten()
        assert set(mask[position].flatten().nonzero().flatten().tolist()) == set(
            row.topk(k).indices.tolist())
    assert bool(mask[:start].all())  # restoring before the subject changes nothing
    # float32 rounding only: the engine batches fewer restorations together
    torch.testing.assert_close(hybrid.scores[mask], exact.scores[mask], atol=1e-5, rtol=1e-6)
    shifted = estimate.scores - estimate.low_score + exact.low_score
    torch.testing.assert_close(hybrid.scores[~mask], shifted[~mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "head"])
def test_the_best_cells_of_the_whole_grid_are_exact_too(tiny_llama, kind):
    """verify_best adds the estimate's best cells over every token (from the subject on)."""
    options = dict(samples=2, window=3, noise=Gaussian(level=0.4), metric="prob")
    hybrid = trace(tiny_llama, PROMPT, SUBJECT, kind, method="hybrid", verify=1, verify_best=7,
                   **options)
    estimate = attribute(tiny_llama, PROMPT, SUBJECT, kind, **options)
    start = hybrid.subject_range[0]
    grid = estimate.scores[start:]
    expected = torch.zeros(grid.shape, dtype=torch.bool)
    rows = grid.flatten(1)
    expected.view(len(rows), -1)[torch.arange(len(rows)), rows.argmax(1)] = True
    expected.view(-1)[grid.flatten().topk(7).indices] = True
    assert torch.equal(hybrid.exact_cells[start:], expected)
    assert int(expected.sum()) > len(rows)  # the best cells are not all per-token maxima


def test_a_share_of_the_cells_is_rounded_up(tiny_gpt2):
    hybrid = trace(tiny_gpt2, PROMPT, SUBJECT, "hidden", samples=2, method="hybrid",
                   verify=0, verify_best=0.1)
    start = hybrid.subject_range[0]
    cells = hybrid.exact_cells[start:]
    assert int(cells.sum()) == -(-cells.numel() // 10)  # ceil(10% of the cells)


def test_verifying_every_cell_is_the_exact_trace(tiny_llama):
    options = dict(samples=2, noise=SubjectSwap(["The Seattle Tower", "Miles Davis Tower"]))
    hybrid = trace(tiny_llama, PROMPT, SUBJECT, "hidden", method="hybrid", verify=99, **options)
    exact = trace(tiny_llama, PROMPT, SUBJECT, "hidden", **options)
    assert bool(hybrid.exact_cells.all())
    torch.testing.assert_close(hybrid.scores, exact.scores, atol=1e-5, rtol=1e-6)


def test_positions_and_several_kinds_at_once(tiny_gpt2):
    options = dict(samples=2, window=3, noise=Gaussian(level=0.4), method="hybrid", verify=1,
                   verify_best=0)
    last = len(trace(tiny_gpt2, PROMPT, SUBJECT, samples=1).tokens) - 1
    hidden, mlp = trace_many(tiny_gpt2, PROMPT, SUBJECT, [("hidden", None, [last]),
                                                          ("mlp", None, None)], **options)
    assert torch.isnan(hidden.scores[:last]).all() and not hidden.exact_cells[:last].any()
    assert int(hidden.exact_cells[last].sum()) == 1
    start = mlp.subject_range[0]
    assert int(mlp.exact_cells[start:].sum()) == len(mlp.tokens) - start


def test_a_hybrid_trace_saves_and_loads_its_exact_cells(tiny_llama, tmp_path):
    hybrid = trace(tiny_llama, PROMPT, SUBJECT, "head", samples=2, method="hybrid")
    loaded = TraceResult.load(hybrid.save(tmp_path / "hybrid.json"))
    assert torch.equal(loaded.exact_cells, hybrid.exact_cells)
    assert torch.equal(loaded.scores, hybrid.scores) and loaded.method == "hybrid"
    frame = hybrid.to_frame()
    assert int(frame["exact"].sum()) == int(hybrid.exact_cells.sum())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="fast"), "unknown method 'fast'"),
    (dict(verify=3), "verify=3 applies to method='hybrid'"),
    (dict(method="hybrid", verify=0, verify_best=0), "restore no cell"),
    (dict(method="hybrid", verify_best=-1), "verify_best must be a whole number"),
    (dict(method="hybrid", verify_best=1.5), "a share of the cells in"),
    (dict(steps=4), "steps=4 applies to method='hybrid'"),
    (dict(method="hybrid", sever="mlp"), "sever needs every cell restored"),
])
def test_bad_hybrid_options_are_named(tiny_gpt2, kwargs, message):
    with pytest.raises(InputError, match=message):
        trace(tiny_gpt2, PROMPT, SUBJECT, "hidden", samples=2, **kwargs)
