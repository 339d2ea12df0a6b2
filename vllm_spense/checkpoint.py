"""Reading a Spense checkpoint folder: config.json + safetensors (never pickles), validated layer by layer."""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open

from vllm_spense.format import (LAYER_TENSORS, OPTIONAL_LAYER_TENSORS, WEIGHT_SCALE, PackedSpenseWeight,
                                SpenseFormatError, SpenseQuantConfig, SpenseTensor, check_layout, unpack, validate)


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


_HEADER_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                  "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                  "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn}


def _safetensors_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    files = sorted(pathlib.Path(folder).glob("*.safetensors"))
    if not files:
        raise SpenseFormatError(f"{folder}: no .safetensors files (pickled .bin/.pt weights are never loaded)")
    return files


def _read(folder: str | pathlib.Path, read: Callable) -> dict:
    """``{name: read(handle, name)}`` over every safetensors file; a name in two files is an error."""
    found: dict = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name in found:
                        raise SpenseFormatError(f"{path.name}: tensor {name} is also stored in another file")
                    found[name] = read(handle, name)
        except (SafetensorError, OSError) as error:
            raise SpenseFormatError(f"{path}: not a readable safetensors file ({error})") from None
    return found


def read_tensors(folder: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in the folder."""
    return _read(folder, lambda handle, name: handle.get_tensor(name))


def read_layouts(folder: str | pathlib.Path) -> dict[str, tuple[list[int], torch.dtype | str]]:
    """``{name: (shape, dtype)}`` from the safetensors headers alone: no tensor data is read."""
    def layout(handle, name):
        view = handle.get_slice(name)
        return view.get_shape(), _HEADER_DTYPES.get(view.get_dtype(), view.get_dtype())
    return _read(folder, layout)


def check_checkpoint_headers(folder: str | pathlib.Path, quant: SpenseQuantConfig) -> list[str]:
    """Names, shapes and dtypes of a whole checkpoint, from its headers (seconds even for large models).

    Every Spense layer stores exactly its four tensors (plus an optional bias) with consistent shapes;
    every other 2-D ``weight`` belongs to a module in ``ignore``. Returns the Spense layer names.
    """
    layouts = read_layouts(folder)
    layers = spense_layers(layouts)
    dense_per_chunk = {}
    for layer in layers:
        if quant.is_ignored(layer):
            raise SpenseFormatError(f"layer {layer}: stores Spense tensors but quantization_config.ignore skips it")
        unexpected = sorted(name for name in layouts if name.startswith(layer + ".")
                            and name[len(layer) + 1:] not in {*(t.value for t in LAYER_TENSORS),
                                                              *OPTIONAL_LAYER_TENSORS})
        if unexpected:
            raise SpenseFormatError(f"layer {layer}: unexpected tensors {unexpected} beside the Spense tensors")
        missing = [t.key(layer) for t in LAYER_TENSORS if t.key(layer) not in layouts]
        if missing:
            raise SpenseFormatError(f"layer {layer}: missing tensors {missing}")
        layer_layouts = {t: layouts[t.key(layer)] for t in LAYER_TENSORS}
        if f"{layer}.{WEIGHT_SCALE}" in layouts:
            layer_layouts[WEIGHT_SCALE] = layouts[f"{layer}.{WEIGHT_SCALE}"]
        dense_per_chunk[layer] = check_layout(layer_layouts, quant.chunk_size, layer,
                                              value_dtype=quant.stored_value_dtype)
    check_dense_fractions(quant, dense_per_chunk)
    stray = sorted(name for name in layouts
                   if name.endswith(f".{WEIGHT_SCALE}") and name.rpartition(".")[0] not in dense_per_chunk)
    if stray:
        raise SpenseFormatError(f"tensors {stray}: a {WEIGHT_SCALE} belongs beside a Spense layer's tensors, and "
                                f"these layers store none")
    for name, (shape, _) in layouts.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and len(shape) == 2 and not quant.is_ignored(module):
            raise SpenseFormatError(
                f"layer {module}: stores a dense {name} {list(shape)} but is not in quantization_config.ignore; "
                f"a Spense checkpoint stores targeted Linear layers as Spense tensors")
    return layers


def check_dense_fractions(quant: SpenseQuantConfig, dense_per_chunk: Mapping[str, int]) -> None:
    """Each layer's dense groups per chunk, as its tensors hold them, against what config.json declares
    (vLLM sizes the layers from the config before it reads a tensor)."""
    for layer, found in dense_per_chunk.items():
        expected = quant.layer_dense_groups_per_chunk(layer)
        if found != expected:
            raise SpenseFormatError(
                f"layer {layer}, tensor {SpenseTensor.DENSE_WEIGHT.key(layer)}: quantization_config gives this "
                f"layer dense fraction {quant.layer_dense_fraction(layer)} ({expected} dense groups per "
                f"{quant.chunk_size}-channel chunk), its tensors hold {found}")
    unknown = sorted(set(quant.dense_fractions) - set(dense_per_chunk))
    if unknown:
        raise SpenseFormatError(f"quantization_config.dense_fractions names layers with no Spense tensors: {unknown}")


def spense_layers(tensors: Mapping[str, object]) -> list[str]:
    """Layers that store any Spense tensor; each must then store all of them."""
    layers = set()
    for key in tensors:
        for tensor in LAYER_TENSORS:
            if key.endswith("." + tensor.value):
                layers.add(key[: -len(tensor.value) - 1])
    return sorted(layers)


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
    packed_keys = {key for layer in layers for key in (*(t.key(layer) for t in LAYER_TENSORS),
                                                        f"{layer}.{WEIGHT_SCALE}")}
    state = {key: value for key, value in tensors.items() if key not in packed_keys}
    dense_per_chunk = {}
    for layer in layers:
        if f"{layer}.weight" in tensors:
            raise SpenseFormatError(f"layer {layer}: stores both a dense {layer}.weight and Spense tensors")
        packed = PackedSpenseWeight.from_tensors(layer, tensors)
        dense_per_chunk[layer] = validate(packed, quant.chunk_size, layer, value_dtype=quant.stored_value_dtype)
        state[f"{layer}.weight"] = unpack(packed)
    check_dense_fractions(quant, dense_per_chunk)
    return config, quant, state
