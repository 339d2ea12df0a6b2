"""What a Spense Linear layer does once its tensors are loaded, with no vLLM import (the GPU checks run it
on a machine without vLLM): validate the loaded (per-rank) tensors, build the kernel's channel map, and
call the custom op.

A layer holds ``dense_weight [N, KD]``, ``sparse_weight [N, 2 GS]``, ``sparse_meta [N, GS/2]`` uint8 and
``dense_mask [K/4]`` bool (docs/FORMAT.md), where N and K are this rank's shard; after
``process_weights_after_loading`` it also holds ``channel_perm [K]`` int32 (dense channels, then 2:4 ones).
"""

from __future__ import annotations

import torch

from vllm_spense.format import GROUP_SIZE, LAYER_TENSORS, PackedSpenseWeight, SpenseFormatError, validate
from vllm_spense.kernels.reference import group_channels
from vllm_spense.ops import spense_linear


def packed_weight(layer: torch.nn.Module) -> PackedSpenseWeight:
    return PackedSpenseWeight(*(getattr(layer, t.value) for t in LAYER_TENSORS))


def process_weights_after_loading(layer: torch.nn.Module, parts: list[tuple[str, int]], chunk_size: int) -> None:
    """Validate the loaded tensors (shapes, mask balance, index values) and add ``channel_perm``.

    ``parts`` lists the checkpoint layers stacked in this one, ``(name, rows)`` in order (q, k, v for a
    merged qkv), so an error names the checkpoint tensor. Parameters are re-registered as plain
    ``Parameter``s so torch.compile sees ordinary tensors.
    """
    packed = packed_weight(layer)
    start = 0
    for name, rows in parts:
        validate(PackedSpenseWeight(*(t[start:start + rows] for t in packed[:3]), packed.dense_mask), chunk_size,
                 name, expected_shape=(rows, packed.dense_mask.numel() * GROUP_SIZE))
        start += rows
    if start != packed.dense_weight.shape[0]:
        raise SpenseFormatError(f"layer {parts[0][0]}: parts hold {start} rows, dense_weight has "
                                f"{packed.dense_weight.shape[0]}")
    dense_ch, sparse_ch = group_channels(packed.dense_mask)
    tensors = {**{t.value: getattr(packed, t.value).data.contiguous() for t in LAYER_TENSORS},
               "channel_perm": torch.cat((dense_ch, sparse_ch)).to(torch.int32)}
    for attr, data in tensors.items():
        layer.register_parameter(attr, torch.nn.Parameter(data, requires_grad=False))


def apply(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return spense_linear(x, layer.dense_weight, layer.sparse_weight, layer.sparse_meta, layer.dense_mask,
                         layer.channel_perm, bias)
