"""Weights and helpers shared by the GPU benchmarks and checks."""

from __future__ import annotations

import torch

from vllm_spense.format import fp8_scales, pack
from vllm_spense.kernels.spense_gemm import SpenseGemmWeight
from vllm_spense.offline.sparsegpt import magnitude_2_4


def spense_weight_for(weight: torch.Tensor, rho: float, fp8: bool = False) -> SpenseGemmWeight:
    """Magnitude 2:4 outside a random balanced dense region (values do not change the speed); FP8 values
    with per-output-channel scales with ``fp8``. On a GPU the 2:4 region also goes to cuSPARSELt for
    prefill, as the vLLM plugin does (``with_sparse_cores``; unchanged where it cannot)."""
    n, k = weight.shape
    dense = int(rho * 32)
    mask = torch.zeros(k // 128, 32, dtype=torch.bool, device=weight.device)
    for chunk in mask:
        chunk[torch.randperm(32, device=weight.device)[:dense]] = True
    mask = mask.reshape(-1)
    pruned = magnitude_2_4(weight, mask)
    weight = SpenseGemmWeight.from_packed(pack(pruned, mask, 128, weight_scale=fp8_scales(pruned) if fp8 else None))
    return weight.with_sparse_cores() if weight.sparse_weight.is_cuda else weight


def compiled_variants(kernel) -> list:
    """The variants Triton has compiled so far of one ``@triton.jit`` kernel, on every device."""
    return [compiled for caches in getattr(kernel, "device_caches", {}).values() for compiled in caches[0].values()]
