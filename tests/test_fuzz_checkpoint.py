"""Hypothesis mutates a valid Spense checkpoint 200+ times; every mutant is either rejected with an error
that says where, or loads and computes exactly what its (mutated) tensors say.

"Load" is what the plugin runs: the header check vLLM's config step calls (names, shapes, dtypes), then
the per-layer validation the worker runs after loading (mask balance, index values), here through
``dense_state_dict``, which calls the same ``validate``. Only safetensors files are ever read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vllm_spense.checkpoint import check_checkpoint_headers, dense_state_dict, read_config, read_tensors, spense_layers
from vllm_spense.format import PackedSpenseWeight, SpenseFormatError, unpack
from vllm_spense.kernels.reference import group_channels
from vllm_spense.ops import spense_linear

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int16, torch.int32, torch.uint8,
          torch.bool]
OUTCOMES: dict[str, int] = {}


def _shard(folder, data):
    shards = sorted(folder.glob("model-*.safetensors"))
    return data.draw(st.sampled_from(shards), label="shard")


def _edit_tensors(folder, data, edit, suffix: str = "") -> str:
    """Rewrite one shard after ``edit(tensors, key)`` on a drawn tensor (one whose name ends in ``suffix``)."""
    shards = [p for p in sorted(folder.glob("model-*.safetensors")) if any(k.endswith(suffix) for k in load_file(str(p)))]
    path = data.draw(st.sampled_from(shards), label="shard")
    tensors = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(k for k in tensors if k.endswith(suffix))), label="tensor")
    what = edit(tensors, key)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return f"{what} {key}"


def truncate(folder, data):
    def edit(tensors, key):
        t = tensors[key]
        dim = data.draw(st.integers(0, t.dim() - 1), label="dim")
        size = data.draw(st.integers(0, max(0, t.shape[dim] - 1)), label="size")
        tensors[key] = t.narrow(dim, 0, size)
        return f"truncate dim {dim} to {size}"
    return _edit_tensors(folder, data, edit)


def reshape(folder, data):
    def edit(tensors, key):
        t = tensors[key]
        shape = data.draw(st.sampled_from([(-1,), (1, -1), (-1, 1)] + ([(-1, 2)] if t.numel() % 2 == 0 else [])))
        tensors[key] = t.reshape(shape)
        return f"reshape to {shape}"
    return _edit_tensors(folder, data, edit)


def retype(folder, data):
    def edit(tensors, key):
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        tensors[key] = tensors[key].to(dtype)
        return f"dtype {dtype}"
    return _edit_tensors(folder, data, edit)


def flip_meta_bits(folder, data):
    def edit(tensors, key):
        flat = tensors[key].reshape(-1).clone()
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, flat.numel() - 1))
            flat[i] ^= 1 << data.draw(st.integers(0, 7))
        tensors[key] = flat.reshape(tensors[key].shape)
        return "flip bits in"
    return _edit_tensors(folder, data, edit, ".sparse_meta")


def unbalance_mask(folder, data):
    def edit(tensors, key):
        mask = tensors[key].clone()
        i = data.draw(st.integers(0, mask.numel() - 1))
        mask[i] = ~mask[i]
        tensors[key] = mask
        return "flip one group in"
    return _edit_tensors(folder, data, edit, ".dense_mask")


def drop_tensor(folder, data):
    return _edit_tensors(folder, data, lambda tensors, key: tensors.pop(key) is not None and "drop")


def add_tensor(folder, data):
    def edit(tensors, key):
        layer = key.rpartition(".")[0]
        suffix = data.draw(st.sampled_from(["weight", "dense_weight", "sparse_meta", "scale", "dense_mask"]))
        name = data.draw(st.sampled_from([f"{layer}.{suffix}", f"{layer}_extra.{suffix}"]), label="name")
        tensors[name] = torch.randn(data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8)))
        return f"add {name} beside"
    return _edit_tensors(folder, data, edit)


def corrupt_config(folder, data):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    quant = config["quantization_config"]
    choice = data.draw(st.sampled_from(["drop key", "set key", "garbage", "not an object"]), label="config")
    if choice == "drop key":
        quant.pop(data.draw(st.sampled_from(sorted(quant))))
    elif choice == "set key":
        key = data.draw(st.sampled_from(["format_version", "chunk_size", "dense_fraction", "group_size",
                                         "quant_method", "ignore", "targets"]))
        quant[key] = data.draw(st.one_of(st.integers(-3, 300), st.floats(-1, 2), st.just(float("nan")), st.text(max_size=5),
                                         st.none(), st.lists(st.text(max_size=3), max_size=2)))
    elif choice == "not an object":
        config["quantization_config"] = data.draw(st.one_of(st.integers(), st.text(max_size=4), st.lists(st.none())))
    if choice == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=64)))
    else:
        path.write_text(json.dumps(config))
    return f"config: {choice}"


def corrupt_header(folder, data):
    path = _shard(folder, data)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if data.draw(st.booleans(), label="truncate"):
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    return f"corrupt header of {path.name}"


MUTATIONS = [truncate, reshape, retype, flip_meta_bits, unbalance_mask, drop_tensor, add_tensor, corrupt_config,
             corrupt_header]


def load(folder):
    """The plugin's checks in order: config, headers (before workers), values (at worker load)."""
    _, quant = read_config(folder)
    if quant is None:
        raise SpenseFormatError(f"{folder}/config.json: no quantization_config")
    check_checkpoint_headers(folder, quant)
    return dense_state_dict(folder)


@settings(max_examples=240, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutants_load_correctly_or_fail_clearly(tiny_checkpoint, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mutant") / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    what = mutation(folder, data)
    try:
        _, _, state = load(folder)
    except SpenseFormatError as error:
        message = str(error)
        assert any(where in message for where in ("layer ", ".safetensors", "config.json", "quantization_config")), (
            what, message)
        OUTCOMES[f"{mutation.__name__}: rejected"] = OUTCOMES.get(f"{mutation.__name__}: rejected", 0) + 1
        return
    OUTCOMES[f"{mutation.__name__}: loaded"] = OUTCOMES.get(f"{mutation.__name__}: loaded", 0) + 1
    tensors = read_tensors(folder)
    for layer in spense_layers(tensors):
        packed = PackedSpenseWeight.from_tensors(layer, tensors)
        weight = unpack(packed)
        assert torch.equal(state[f"{layer}.weight"], weight)
        x = torch.randn(3, weight.shape[1], dtype=torch.float64)
        perm = torch.cat(group_channels(packed.dense_mask)).to(torch.int32)
        y = spense_linear(x, *(t.double() if t.is_floating_point() else t for t in packed[:4]), perm)
        torch.testing.assert_close(y, x @ weight.double().T, rtol=1e-9, atol=1e-9)


def test_fuzz_saw_both_outcomes():
    """Guards the fuzz test above against mutations that never reach the checks (runs after it)."""
    if not OUTCOMES:
        pytest.skip("run together with test_mutants_load_correctly_or_fail_clearly")
    rejected = sum(n for k, n in OUTCOMES.items() if k.endswith("rejected"))
    loaded = sum(n for k, n in OUTCOMES.items() if k.endswith("loaded"))
    print(json.dumps(OUTCOMES, indent=1, sort_keys=True))
    assert rejected + loaded >= 200 and rejected > 100 and loaded > 0
