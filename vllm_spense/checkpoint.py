"""Reading a Spense checkpoint folder: config.json + safetensors (never pickles), validated layer by layer."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors import SafetensorError, safe_open

from vllm_spense.format import (LAYER_TENSORS, PackedSpenseWeight, SpenseFormatError, SpenseQuantConfig,
                                SpenseTensor, unpack, validate)


def read_config(folder: str | pathlib.Path) -> tuple[dict, SpenseQuantConfig | None]:
    """config.json and its Spense ``quantization_config`` (None for a dense model)."""
    path = pathlib.Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpenseFormatError(f"{path}: no config.json; is {folder} a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpenseFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise SpenseFormatError(f"{path}: expected a JSON object, found {type(config).__name__}")
    quant = config.get("quantization_config")
    if quant is None:
        return config, None
    if not isinstance(quant, dict):
        raise SpenseFormatError(f"{path}: quantization_config must be an object, found {type(quant).__name__}")
    return config, SpenseQuantConfig.from_dict(quant)


def read_tensors(folder: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in the folder; a name in two files is an error."""
    folder = pathlib.Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SpenseFormatError(f"{folder}: no .safetensors files (pickled .bin/.pt weights are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name in tensors:
                        raise SpenseFormatError(f"{path.name}: tensor {name} is also stored in another file")
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise SpenseFormatError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors


def spense_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Layers that store any Spense tensor; each must then store all of them."""
    layers = set()
    for key in tensors:
        for tensor in LAYER_TENSORS:
            if key.endswith("." + tensor.value):
                layers.add(key[: -len(tensor.value) - 1])
    return sorted(layers)


def unpack_layer(tensors: dict[str, torch.Tensor], layer: str, quant: SpenseQuantConfig,
                 expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    if f"{layer}.weight" in tensors:
        raise SpenseFormatError(f"layer {layer}: stores both a dense {layer}.weight and Spense tensors")
    packed = PackedSpenseWeight.from_tensors(layer, tensors)
    validate(packed, quant.chunk_size, layer, expected_shape)
    return unpack(packed)


def dense_state_dict(folder: str | pathlib.Path) -> tuple[dict, SpenseQuantConfig, dict[str, torch.Tensor]]:
    """(config, quant config, state dict with every Spense layer rebuilt as ``<layer>.weight``)."""
    config, quant = read_config(folder)
    if quant is None:
        raise SpenseFormatError(f"{folder}/config.json: no quantization_config; this is not a Spense checkpoint")
    tensors = read_tensors(folder)
    layers = spense_layers(tensors)
    if not layers:
        raise SpenseFormatError(f"{folder}: config says spense but no layer stores "
                                f"{SpenseTensor.DENSE_MASK.value} and the other Spense tensors")
    state = {key: value for key, value in tensors.items()
             if not any(key == t.key(layer) for layer in layers for t in LAYER_TENSORS)}
    for layer in layers:
        state[f"{layer}.weight"] = unpack_layer(tensors, layer, quant)
    return config, quant, state
