"""Pure PyTorch ``y = x @ W^T (+ bias)`` computed from the packed Spense tensors.

Shapes: ``x [..., K]``; dense_weight ``[N, 4*G_dense]``; sparse_weight ``[N, 2*G_sparse]``; sparse_meta
``[N, G_sparse/2]`` uint8; dense_mask ``[K/4]`` bool (vllm_spense/format.py). The dense region is a plain
matmul on the gathered dense input channels; the 2:4 region gathers, for every output row, the two
input channels each group kept; FP8 values are multiplied as stored and the product by their per-channel
``weight_scale``. It never rebuilds W, so it is an independent check of ``unpack``.
"""

from __future__ import annotations

import torch

from vllm_spense.format import GROUP_SIZE, PackedSpenseWeight, sparse_indices

_ROWS_PER_STEP = 256  # bounds the [M, rows, 2*G_sparse] gather buffer


def group_channels(dense_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-channel indices of the dense groups and of the 2:4 groups, each in ascending order."""
    offsets = torch.arange(GROUP_SIZE, device=dense_mask.device)
    groups = torch.arange(dense_mask.numel(), device=dense_mask.device)
    dense = (groups[dense_mask, None] * GROUP_SIZE + offsets).reshape(-1)
    sparse = (groups[~dense_mask, None] * GROUP_SIZE + offsets).reshape(-1)
    return dense, sparse


def spense_linear(x: torch.Tensor, packed: PackedSpenseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = packed.shape
    if x.shape[-1] != k:
        raise ValueError(f"spense_linear: x has {x.shape[-1]} input channels, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    dense_ch, sparse_ch = group_channels(packed.dense_mask)
    y = x2[:, dense_ch] @ packed.dense_weight.to(x.dtype).t()
    kept = sparse_indices(packed.sparse_meta)  # [N, Gs, 2]
    g_sparse = kept.shape[1]
    if g_sparse:
        x_sparse = x2[:, sparse_ch]  # [M, 4*Gs]
        flat = (torch.arange(g_sparse, device=x.device)[None, :, None] * GROUP_SIZE + kept).reshape(n, -1)
        values = packed.sparse_weight.to(x.dtype)
        for start in range(0, n, _ROWS_PER_STEP):
            stop = min(start + _ROWS_PER_STEP, n)
            gathered = x_sparse[:, flat[start:stop]]  # [M, rows, 2*Gs]
            y[:, start:stop] += (gathered * values[start:stop]).sum(-1)
    if packed.weight_scale is not None:  # FP8 values: one scale per output channel covers both regions
        y = y * packed.weight_scale.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)
