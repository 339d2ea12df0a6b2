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
