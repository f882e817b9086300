"""Key statistics: the second moment, packing, and the on-disk cache."""

from __future__ import annotations

import logging

import pytest
import torch

from lens_rome.data.corpus import token_chunks, wikipedia_path
from lens_rome.editing.statistics import key_statistics, key_statistics_many
from lens_rome.model.adapter import model_fingerprint

CORPUS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "The Space Needle is in downtown Seattle, and Miles Davis plays the trumpet.",
    "The Colosseum is in Rome. The Louvre is in Paris.",
] * 4


def keys_of(model, layer, chunks):
    store = {}
    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        model.run_with_hooks(torch.stack(chunks), fwd_hooks=[
            (name, lambda act, hook: store.__setitem__("k", act.clone()))])
    return store["k"].reshape(-1, model.cfg.d_mlp).double()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_second_moment_matches_direct_computation(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    stats = key_statistics(model, 2, CORPUS, samples=6, token_length=16, batch_size=4,
                           cache_dir=tmp_path, progress=False)
    chunks = list(token_chunks(model, CORPUS, 16))[:6]
    keys = keys_of(model, 2, chunks)
    assert stats.count == 6 * 16
    assert stats.second_moment.dtype == torch.float64
    torch.testing.assert_close(stats.second_moment, keys.T @ keys / len(keys))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_one_pass_for_many_layers_equals_one_per_layer(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    options = dict(samples=6, token_length=16, batch_size=4, progress=False)
    each = {layer: key_statistics(model, layer, CORPUS, cache_dir=tmp_path / "each", **options)
            for layer in (0, 2, 3)}
    together = key_statistics_many(model, [3, 0, 2, 0], CORPUS, cache_dir=tmp_path / "many",
                                   **options)
    assert list(together) == [0, 2, 3]
    for layer, stats in together.items():
        assert stats.layer == layer and stats.count == each[layer].count == 6 * 16
        assert torch.equal(stats.second_moment, each[layer].second_moment)  # bit for bit
        assert stats.path.name == each[layer].path.name  # the same cache file
        assert key_statistics(model, layer, CORPUS, cache_dir=tmp_path / "many",
                              **options).from_cache


def test_many_layers_read_the_cached_ones_and_compute_the_rest(tiny_llama, tmp_path,
                                                               monkeypatch):
    from lens_rome.editing import statistics

    options = dict(samples=4, token_length=16, cache_dir=tmp_path, progress=False)
    first = key_statistics(tiny_llama, 1, CORPUS, **options)
    passes = []
    accumulate = statistics._accumulate
    monkeypatch.setattr(statistics, "_accumulate",
                        lambda adapter, layers, *rest: passes.append(list(layers))
                        or accumulate(adapter, layers, *rest))
    both = key_statistics_many(tiny_llama, [1, 3], CORPUS, **options)
    assert passes == [[3]] and both[1].from_cache and not both[3].from_cache
    assert torch.equal(both[1].second_moment, first.second_moment)
    key_statistics_many(tiny_llama, [1, 3], CORPUS, **options)
    assert passes == [[3]]  # nothing left to compute
    with pytest.raises(ValueError, match="no layer"):
        key_statistics_many(tiny_llama, [], CORPUS, **options)
    with pytest.raises(ValueError, match="out of range"):
        key_statistics_many(tiny_llama, [1, 9], CORPUS, **options)


def test_packing_has_no_padding(tiny_llama):
    chunks = list(token_chunks(tiny_llama, CORPUS, 16))
    assert all(len(c) == 16 for c in chunks)
    ids = tiny_llama.tokenizer("\n\n".join(CORPUS) + "\n\n", add_special_tokens=False)["input_ids"]
    assert torch.cat(chunks).tolist() == ids[: 16 * len(chunks)]


def test_cache_is_reused_and_keyed(tiny_llama, tmp_path):
    first = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                           cache_dir=tmp_path, progress=False)
    again = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                           cache_dir=tmp_path, progress=False)
    assert not first.from_cache and again.from_cache
    assert torch.equal(first.second_moment, again.second_moment)
    other = key_statistics(tiny_llama, 1, CORPUS, samples=3, token_length=16,
                           cache_dir=tmp_path, progress=False)
    assert not other.from_cache and other.path != first.path
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


def test_truncated_cache_is_recomputed_and_reported(tiny_llama, tmp_path, caplog):
    first = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                           cache_dir=tmp_path, progress=False)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="lens_rome.statistics"):
        again = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                               cache_dir=tmp_path, progress=False)
    assert not again.from_cache
    assert "unusable" in caplog.text and "recomputing" in caplog.text
    assert torch.equal(first.second_moment, again.second_moment)
    assert key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                          cache_dir=tmp_path, progress=False).from_cache  # rewritten whole


def test_mismatched_cache_is_recomputed(tiny_llama, tiny_gpt2, tmp_path, caplog):
    first = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                           cache_dir=tmp_path, progress=False)
    # a file from another model placed under this one's name
    other = key_statistics(tiny_gpt2, 1, CORPUS, samples=4, token_length=16,
                           cache_dir=tmp_path / "other", progress=False)
    first.path.write_bytes(other.path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="lens_rome.statistics"):
        again = key_statistics(tiny_llama, 1, CORPUS, samples=4, token_length=16,
                               cache_dir=tmp_path, progress=False)
    assert not again.from_cache and "fingerprint" in caplog.text
    assert torch.equal(first.second_moment, again.second_moment)


def test_iterator_corpus_without_id_is_not_cached(tiny_llama, tmp_path):
    stats = key_statistics(tiny_llama, 0, iter(CORPUS), samples=2, token_length=16,
                           cache_dir=tmp_path, progress=False)
    assert stats.path is None and not list(tmp_path.iterdir())
    named = key_statistics(tiny_llama, 0, iter(CORPUS), samples=2, token_length=16,
                           corpus_id="my-texts", cache_dir=tmp_path, progress=False)
    assert named.path is not None and named.path.exists()


def test_bad_arguments(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        key_statistics(tiny_llama, 6, CORPUS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="samples"):
        key_statistics(tiny_llama, 0, CORPUS, samples=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="iterable of strings"):
        key_statistics(tiny_llama, 0, "some text", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="strings"):
        key_statistics(tiny_llama, 0, [1, 2], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no chunk"):
        key_statistics(tiny_llama, 0, ["hi"], token_length=64, cache_dir=tmp_path,
                       progress=False)


def test_fingerprint_tells_models_apart(tiny_llama, tiny_gpt2):
    assert model_fingerprint(tiny_llama) == model_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama) != model_fingerprint(tiny_gpt2)


def test_wikipedia_corpus_is_found():
    try:
        path = wikipedia_path()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    assert path.exists() and path.name == "summaries_en-us.json"
