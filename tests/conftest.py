"""Fixtures: tiny random models for fast exact tests, the embedded model for integration."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lens_rome.model.backend import HAS_HOOKED
from lens_rome.model.layout import use_linear_layout

if HAS_HOOKED:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

KNOWN_FACTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "known_facts.json"

TRAINING_TEXT = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Space Needle is in downtown Seattle.",
    "Miles Davis plays the trumpet. The Colosseum is in Rome.",
] * 5


# torch's own choice for this machine, before any test changes it, shared among the
# pytest-xdist workers (each worker is a process: threads beyond the cores only contend)
DEFAULT_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))


@pytest.fixture(autouse=True)
def threads_for_the_model_size(request):
    """Tiny models: one thread (their tensors are too small to split, and spinning threads
    lose badly on a shared CPU); embedded-model tests: torch's default, whatever an earlier
    test set."""
    embedded = request.node.get_closest_marker("embedded") is not None
    torch.set_num_threads(DEFAULT_THREADS if embedded else 1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained here in a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", pad_token="<pad>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # TransformerLens reloads it by path


def _tiny_model(tokenizer, **architecture) -> "HookedTransformer":
    if not HAS_HOOKED:
        pytest.skip("this TransformerLens has no HookedTransformer (4.x): bridge tests only")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=6, d_model=64, n_heads=4, d_head=16, d_mlp=128, n_ctx=64,
        d_vocab=len(tokenizer), initializer_range=0.3, default_prepend_bos=False,
        model_name="tiny", **architecture,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.eval()
    return use_linear_layout(model)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    """GPT-2 style: LayerNorm, learned positions, GELU MLP."""
    return _tiny_model(tiny_tokenizer, act_fn="gelu_new", normalization_type="LN",
                       positional_embedding_type="standard")


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """Llama style: RMSNorm, rotary positions, gated SiLU MLP, grouped-query attention."""
    return _tiny_model(tiny_tokenizer, act_fn="silu", normalization_type="RMS",
                       positional_embedding_type="rotary", gated_mlp=True,
                       n_key_value_heads=2, final_rms=True)


@pytest.fixture(scope="session")
def tiny_gemma(tiny_tokenizer):
    """Gemma style: RMSNorm before and after attention and the MLP (the residual stream gets
    the MLP's output through a norm, with Gemma-like large weights), gated GELU MLP, rotary."""
    model = _tiny_model(tiny_tokenizer, act_fn="gelu_pytorch_tanh", normalization_type="RMS",
                        positional_embedding_type="rotary", gated_mlp=True,
                        n_key_value_heads=2, final_rms=True,
                        use_normalization_before_and_after=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:  # Gemma-3-270M's post-MLP norm weights average ~18
            for norm in (block.ln1_post, block.ln2_post):
                norm.w.copy_(torch.rand(norm.w.shape, generator=generator) * 30)
    return model


@pytest.fixture(scope="session")
def smollm():
    from lens_rome.model.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def known_facts():
    if not KNOWN_FACTS.exists():
        pytest.skip(f"{KNOWN_FACTS} is absent (the shared data folder is not beside the project)")
    return json.loads(KNOWN_FACTS.read_text())


# Tiny random Hugging Face models of four families, built offline from configs
TINY_HF = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=4, n_embd=64, n_head=4, n_positions=64)),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
             dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=64, sliding_window=8)),
}


@pytest.fixture(scope="session")
def tiny_bridges(tiny_tokenizer):
    """``(family, plain=False)`` -> a ``TransformerBridge`` around a tiny random Hugging Face
    model (built on first use), or with ``plain=True`` an unwrapped copy of that HF model
    (booting a bridge replaces the modules of the model it wraps)."""
    import copy

    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    built = {}

    def build(family, plain=False):
        if family not in built:
            architecture, config_class, sizes = TINY_HF[family]
            config = getattr(transformers, config_class)(
                vocab_size=len(tiny_tokenizer), initializer_range=0.3, **sizes)
            config.architectures = [architecture]
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            unwrapped = copy.deepcopy(hf)
            bridge = TransformerBridge.boot_transformers(  # it may add tokens to its tokenizer
                f"tiny-{family}", hf_model=hf, tokenizer=copy.deepcopy(tiny_tokenizer), device="cpu",
                dtype=torch.float32)
            bridge.cfg.default_prepend_bos = False
            built[family] = (bridge.eval(), unwrapped)
        return built[family][1 if plain else 0]

    return build


@pytest.fixture(scope="session")
def smollm_bridge():
    from lens_rome.model.loading import load_model

    return load_model("smollm2-135m", backend="bridge")


@pytest.fixture(scope="session")
def smollm_hf():
    """The plain Hugging Face SmolLM2 (not wrapped by any bridge)."""
    from lens_rome.model.loading import load_hf_model

    return load_hf_model("smollm2-135m")[0]
