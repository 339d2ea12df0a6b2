"""Reading Spense checkpoints: every kind of broken folder is rejected with a message naming where."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_spense.checkpoint import dense_state_dict
from vllm_spense.format import SpenseFormatError

LAYER = "model.layers.1.self_attn.k_proj"
DOWN = "model.layers.1.mlp.down_proj"  # K = 384: three 128-channel chunks
SHARD = "model-00002-of-00003.safetensors"  # layer 1


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def edit_shard(folder, edit):
    tensors = load_file(str(folder / SHARD))
    edit(tensors)
    save_file(tensors, str(folder / SHARD))


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_valid_checkpoint_loads(tiny_checkpoint):
    config, quant, state = dense_state_dict(tiny_checkpoint)
    assert state[f"{LAYER}.weight"].shape == (64, 128)
    assert not any(k.endswith(("dense_mask", "sparse_meta")) for k in state)


CASES = {
    "missing tensor": (lambda f: edit_shard(f, lambda t: t.pop(f"{LAYER}.sparse_meta")),
                       f"layer {LAYER}: missing tensors \\['{LAYER}.sparse_meta'\\]"),
    "dense weight beside packed": (lambda f: edit_shard(f, lambda t: t.update({f"{LAYER}.weight": torch.ones(64, 128)})),
                                   f"layer {LAYER}: stores both"),
    "meta dtype": (lambda f: edit_shard(f, lambda t: t.update({f"{LAYER}.sparse_meta": t[f"{LAYER}.sparse_meta"].to(torch.int16)})),
                   f"tensor {LAYER}.sparse_meta: expected dtype torch.uint8, found torch.int16"),
    "meta out of range": (lambda f: edit_shard(f, lambda t: t[f"{LAYER}.sparse_meta"].__setitem__((0, 0), 0xFF)),
                          f"tensor {LAYER}.sparse_meta: .* invalid index pairs"),
    "unbalanced mask": (lambda f: edit_shard(f, lambda t: t[f"{DOWN}.dense_mask"].__setitem__(slice(0, 32), True)),
                        f"tensor {DOWN}.dense_mask: unbalanced mask"),
    "truncated values": (lambda f: edit_shard(f, lambda t: t.update({f"{LAYER}.sparse_weight": t[f"{LAYER}.sparse_weight"][:, :-2].contiguous()})),
                         f"tensor {LAYER}.sparse_weight: expected shape \\[64, 48\\], found \\[64, 46\\]"),
    "unknown version": (lambda f: edit_config(f, lambda c: c["quantization_config"].update(format_version=7)),
                        "unknown format_version 7"),
    "config not json": (lambda f: (f / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "no quantization_config": (lambda f: edit_config(f, lambda c: c.pop("quantization_config")),
                               "no quantization_config"),
    "truncated safetensors": (lambda f: (f / SHARD).write_bytes((f / SHARD).read_bytes()[:1000]),
                              f"{SHARD}: not a readable safetensors file"),
    "duplicate tensor": (lambda f: save_file({f"{LAYER}.dense_mask": torch.zeros(32, dtype=torch.bool)},
                                             str(f / "extra.safetensors")),
                         f"tensor {LAYER}.dense_mask is also stored in another file"),
    "pickles only": (lambda f: [p.unlink() for p in f.glob("*.safetensors")] and (f / "pytorch_model.bin").write_bytes(b"x"),
                     "no .safetensors files \\(pickled"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_is_rejected(broken, case):
    corrupt, message = CASES[case]
    corrupt(broken)
    with pytest.raises(SpenseFormatError, match=message):
        dense_state_dict(broken)
