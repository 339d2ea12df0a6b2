"""Random Spense weights for tests: fresh draws, ragged rows, real 2:4 patterns."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from vllm_spense.format import GROUP_SIZE


def random_dense_mask(k: int, chunk_size: int, dense_per_chunk: int, generator: torch.Generator) -> torch.Tensor:
    groups_per_chunk = chunk_size // GROUP_SIZE
    mask = torch.zeros(k // chunk_size, groups_per_chunk, dtype=torch.bool)
    for chunk in mask:
        chunk[torch.randperm(groups_per_chunk, generator=generator)[:dense_per_chunk]] = True
    return mask.reshape(-1)


def random_pruned_weight(n: int, k: int, dense_mask: torch.Tensor, generator: torch.Generator,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A weight with random values, 2 of 4 zeroed at random positions in every 2:4 group."""
    weight = torch.randn(n, k, generator=generator).to(dtype)
    groups = weight.view(n, k // GROUP_SIZE, GROUP_SIZE)
    drop = torch.rand(n, k // GROUP_SIZE, GROUP_SIZE, generator=generator).argsort(-1)[..., :2]
    zeroed = torch.zeros_like(groups).scatter_(-1, drop, 1).bool() & ~dense_mask[None, :, None]
    groups[zeroed] = 0
    return weight


SHARD = "model-00002-of-00003.safetensors"  # the tiny checkpoint's decoder layer 1


def edit_shard(folder, edit, shard: str = SHARD) -> None:
    """Rewrite one safetensors shard of a checkpoint folder after ``edit(tensors)``."""
    tensors = load_file(str(folder / shard))
    edit(tensors)
    save_file(tensors, str(folder / shard))


def edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


# One decoder layer's tensors of the tiny checkpoint, and the ways tests break them.
LAYER = "model.layers.1.self_attn.k_proj"  # part of the merged qkv in vLLM
DOWN = "model.layers.1.mlp.down_proj"  # K = 384: six 64-channel chunks


def _replace(name, change):
    return lambda f: edit_shard(f, lambda t: t.update({name: change(t[name]).contiguous()}))


def _set(name, index, value):
    return lambda f: edit_shard(f, lambda t: t[name].__setitem__(index, value))


CORRUPTIONS = {
    "missing tensor": lambda f: edit_shard(f, lambda t: t.pop(f"{LAYER}.sparse_meta")),
    "dense weight beside packed": lambda f: edit_shard(f, lambda t: t.update({f"{LAYER}.weight": torch.ones(64, 128)})),
    "truncated values": _replace(f"{LAYER}.sparse_weight", lambda v: v[:, :-2]),
    "meta dtype": _replace(f"{LAYER}.sparse_meta", lambda v: v.to(torch.int16)),
    "unknown version": lambda f: edit_config(f, lambda c: c["quantization_config"].update(format_version=7)),
    "unbalanced mask": _set(f"{DOWN}.dense_mask", slice(0, 16), True),  # chunk 0 all dense
    "meta out of range": _set(f"{LAYER}.sparse_meta", (0, 0), 0xFF),  # both nibbles: first index 3, second 3
}
