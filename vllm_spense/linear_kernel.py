"""What a Spense Linear layer does once its tensors are loaded, with no vLLM import (the GPU checks run it
on a machine without vLLM): validate the loaded (per-rank) tensors, build the kernel's channel map, and
call the custom op.

A layer holds ``dense_weight [N, KD]``, ``sparse_weight [N, 2 GS]``, ``sparse_meta [N, GS/2]`` uint8 and
``dense_mask [K/4]`` bool (docs/FORMAT.md), with FP8 values also ``weight_scale [N]`` float32, where N and
K are this rank's shard; after ``process_weights_after_loading`` it also holds ``channel_perm [K]`` int32
(dense channels, then 2:4 ones).
"""

from __future__ import annotations

import os

import torch

from vllm_spense.format import (GROUP_SIZE, LAYER_TENSORS, WEIGHT_SCALE, PackedSpenseWeight, SpenseFormatError,
                                validate)
from vllm_spense.kernels.reference import group_channels
from vllm_spense.ops import spense_linear

# Set to 0 to keep prefill and decode batches from 65 rows off cuSPARSELt (the MMA kernel up to 256 rows, W
# expanded + one cuBLAS GEMM beyond; docs/KERNELS.md).
SPARSE_CORES_ENV = "SPENSE_SPARSE_CORES"


def packed_weight(layer: torch.nn.Module) -> PackedSpenseWeight:
    return PackedSpenseWeight(*(getattr(layer, t.value) for t in LAYER_TENSORS), getattr(layer, WEIGHT_SCALE, None))


def register_packed(layer: torch.nn.Module, packed: PackedSpenseWeight) -> None:
    """Put one weight's Spense tensors on ``layer`` as vLLM's loaders leave them (the GPU checks and the
    benchmarks build layers without vLLM)."""
    for name, tensor in packed._asdict().items():
        if tensor is not None:
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def process_weights_after_loading(layer: torch.nn.Module, parts: list[tuple[str, int]], chunk_size: int,
                                  value_dtype: torch.dtype | None = None,
                                  activation_dtype: torch.dtype | None = None) -> None:
    """Validate the loaded tensors (shapes, mask balance, index values) and add ``channel_perm``.

    ``parts`` lists the checkpoint layers stacked in this one, ``(name, rows)`` in order (q, k, v for a
    merged qkv), so an error names the checkpoint tensor; ``value_dtype`` is the dtype an FP8 checkpoint
    fixes. Parameters are re-registered as plain ``Parameter``s so torch.compile sees ordinary tensors.
    With ``activation_dtype`` (the model's dtype) and the tensors on a GPU, the 2:4 region also goes into
    cuSPARSELt's form for batches of 65 rows or more where the GPU has sparse tensor cores
    (``with_sparse_cores``; off with ``SPENSE_SPARSE_CORES=0``), and every kernel variant the layer can take
    is compiled here (``spense_gemm.warm_up``), not while serving.
    """
    packed = packed_weight(layer)
    if value_dtype is not None and packed.dense_weight.is_cuda and torch.cuda.get_device_capability(
            packed.dense_weight.device) < (8, 9):
        raise RuntimeError(f"layer {parts[0][0]}: FP8 Spense checkpoints need an FP8-capable GPU (compute "
                           f"capability 8.9 or newer: Ada, Hopper, Blackwell), found "
                           f"{torch.cuda.get_device_name(packed.dense_weight.device)}")
    start = 0
    for name, rows in parts:
        scale = None if packed.weight_scale is None else packed.weight_scale[start:start + rows]
        validate(PackedSpenseWeight(*(t[start:start + rows] for t in packed[:3]), packed.dense_mask, scale),
                 chunk_size, name, expected_shape=(rows, packed.dense_mask.numel() * GROUP_SIZE),
                 value_dtype=value_dtype)
        start += rows
    if start != packed.dense_weight.shape[0]:
        raise SpenseFormatError(f"layer {parts[0][0]}: parts hold {start} rows, dense_weight has "
                                f"{packed.dense_weight.shape[0]}")
    dense_ch, sparse_ch = group_channels(packed.dense_mask)
    tensors = {**{t.value: getattr(packed, t.value).data.contiguous() for t in LAYER_TENSORS},
               "channel_perm": torch.cat((dense_ch, sparse_ch)).to(torch.int32)}
    if packed.weight_scale is not None:
        tensors[WEIGHT_SCALE] = packed.weight_scale.data.contiguous()
    for attr, data in tensors.items():
        layer.register_parameter(attr, torch.nn.Parameter(data, requires_grad=False))
    if activation_dtype is not None and layer.dense_weight.is_cuda:
        from vllm_spense.kernels.spense_gemm import SpenseGemmWeight, warm_up  # Triton: CUDA only

        weight = SpenseGemmWeight.from_channel_perm(layer.dense_weight, layer.sparse_weight, layer.sparse_meta,
                                                    layer.channel_perm, getattr(layer, WEIGHT_SCALE, None))
        if os.environ.get(SPARSE_CORES_ENV, "1") != "0" and activation_dtype == weight.sparse_weight.dtype:
            weight = weight.with_sparse_cores()
        if weight.sparse_compressed is not None:  # sparse_weight is now a view into it
            for attr in ("sparse_weight", "sparse_meta", "sparse_compressed"):
                layer.register_parameter(attr, torch.nn.Parameter(getattr(weight, attr), requires_grad=False))
        warm_up(weight, activation_dtype, getattr(layer, "bias", None))


def apply(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return spense_linear(x, layer.dense_weight, layer.sparse_weight, layer.sparse_meta, layer.dense_mask,
                         layer.channel_perm, bias, getattr(layer, WEIGHT_SCALE, None),
                         getattr(layer, "sparse_compressed", None))
