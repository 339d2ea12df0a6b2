"""Weights shared by the GPU benchmarks."""

from __future__ import annotations

import torch

from vllm_spense.format import pack
from vllm_spense.kernels.spense_gemm import SpenseGemmWeight
from vllm_spense.offline.sparsegpt import magnitude_2_4


def spense_weight_for(weight: torch.Tensor, rho: float) -> SpenseGemmWeight:
    """Magnitude 2:4 outside a random balanced dense region (values do not change the speed)."""
    n, k = weight.shape
    dense = int(rho * 32)
    mask = torch.zeros(k // 128, 32, dtype=torch.bool, device=weight.device)
    for chunk in mask:
        chunk[torch.randperm(32, device=weight.device)[:dense]] = True
    mask = mask.reshape(-1)
    return SpenseGemmWeight.from_packed(pack(magnitude_2_4(weight, mask), mask, 128))


