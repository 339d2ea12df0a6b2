"""Reading Spense checkpoints: every kind of broken folder is rejected with a message naming where."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from vllm_spense.checkpoint import check_checkpoint_headers, dense_state_dict, read_config
from vllm_spense.format import SpenseFormatError

from tests.helpers import CORRUPTIONS, DOWN, LAYER, SHARD, edit_config, edit_shard



def test_valid_checkpoint_loads(tiny_checkpoint):
    config, quant, state = dense_state_dict(tiny_checkpoint)
    assert state[f"{LAYER}.weight"].shape == (64, 128)
    assert not any(k.endswith(("dense_mask", "sparse_meta")) for k in state)


CASES = {
    "missing tensor": (CORRUPTIONS["missing tensor"], f"layer {LAYER}: missing tensors \\['{LAYER}.sparse_meta'\\]"),
    "dense weight beside packed": (CORRUPTIONS["dense weight beside packed"], f"layer {LAYER}: stores both"),
    "meta dtype": (CORRUPTIONS["meta dtype"], f"tensor {LAYER}.sparse_meta: expected dtype torch.uint8, found torch.int16"),
    "meta out of range": (CORRUPTIONS["meta out of range"], f"tensor {LAYER}.sparse_meta: .* invalid index pairs"),
    "unbalanced mask": (CORRUPTIONS["unbalanced mask"], f"tensor {DOWN}.dense_mask: unbalanced mask"),
    "truncated values": (CORRUPTIONS["truncated values"],
                         f"tensor {LAYER}.sparse_weight: expected shape \\[64, 48\\], found \\[64, 46\\]"),
    "unknown version": (CORRUPTIONS["unknown version"], "unknown format_version 7"),
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


HEADER_CASES = {
    "missing tensor": f"layer {LAYER}: missing tensors \\['{LAYER}.sparse_meta'\\]",
    "dense weight beside packed": f"layer {LAYER}: unexpected tensors \\['{LAYER}.weight'\\]",
    "meta dtype": f"tensor {LAYER}.sparse_meta: expected dtype torch.uint8, found torch.int16",
    "truncated values": f"tensor {LAYER}.sparse_weight: expected shape \\[64, 48\\], found \\[64, 46\\]",
    "duplicate tensor": f"tensor {LAYER}.dense_mask is also stored in another file",
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_check_rejects_without_reading_data(broken, case):
    """What the plugin runs before vLLM starts workers: names, shapes and dtypes from the headers."""
    _, quant = read_config(broken)
    assert len(check_checkpoint_headers(broken, quant)) == 14
    CASES[case][0](broken)
    with pytest.raises(SpenseFormatError, match=HEADER_CASES[case]):
        check_checkpoint_headers(broken, quant)


def test_header_check_rejects_a_weight_scale_beside_no_spense_layer(broken):
    _, quant = read_config(broken)
    edit_shard(broken, lambda t: t.update({"lm_head.weight_scale": torch.rand(5)}))
    with pytest.raises(SpenseFormatError, match=r"tensors \['lm_head.weight_scale'\]: a weight_scale belongs beside "
                                                r"a Spense layer's tensors, and these layers store none"):
        check_checkpoint_headers(broken, quant)


def test_header_check_rejects_dense_weight_outside_ignore(broken):
    _, quant = read_config(broken)
    edit_shard(broken, lambda t: t.update({"model.layers.1.mlp.extra_proj.weight": torch.ones(8, 8)}))
    with pytest.raises(SpenseFormatError, match="layer model.layers.1.mlp.extra_proj: stores a dense "
                                                "model.layers.1.mlp.extra_proj.weight \\[8, 8\\] but is not in"):
        check_checkpoint_headers(broken, quant)
