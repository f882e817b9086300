"""The attribution benchmark's offline hybrid is the library's hybrid trace."""

from __future__ import annotations

import pytest
import torch
from helpers import load_benchmark

from lens_rome.tracing import Gaussian, attribute, trace

PROMPT = "Where is The Eiffel Tower? It is in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.mark.parametrize(("k", "best"), [(1, 0), (0, 9), (2, 5)])
def test_the_merged_grid_is_the_hybrid_trace(tiny_llama, k, best):
    bench = load_benchmark("attribution_quality")
    options = dict(samples=2, window=3, noise=Gaussian(level=0.4), metric="logprob", steps=3)
    hybrid = trace(tiny_llama, PROMPT, SUBJECT, "mlp", method="hybrid", verify=k,
                   verify_best=best, **options)
    options.pop("steps")
    exact = trace(tiny_llama, PROMPT, SUBJECT, "mlp", **options)
    estimate = attribute(tiny_llama, PROMPT, SUBJECT, "mlp", steps=3, **options)
    merged = bench.hybrid_grid(bench.effects(exact), bench.effects(estimate), k, best)
    torch.testing.assert_close(merged, bench.effects(hybrid), atol=1e-5, rtol=0)
