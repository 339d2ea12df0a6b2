"""``torch.ops.spense.linear``: the one custom op every Spense layer calls, so that vLLM's torch.compile
and CUDA graphs capture it as a single opaque node.

On CUDA it runs the Triton kernels (``vllm_spense.kernels.spense_gemm``, which picks the decode or prefill
path by M); on the CPU it runs the PyTorch reference (no other backend is registered). Arguments are the
packed tensors exactly as the checkpoint stores them (docs/FORMAT.md; FP8 values with their
``weight_scale``) plus ``channel_perm [K]`` int32 (dense channels, then 2:4 channels), built once in
``process_weights_after_loading``.
"""

from __future__ import annotations

import torch

from vllm_spense.format import GROUP_SIZE, PackedSpenseWeight, unpack

CPU_GATHER_MAX_M = 16  # above this, rebuilding W once per call is cheaper than gathering per row


def _linear(x: torch.Tensor, dense_weight: torch.Tensor, sparse_weight: torch.Tensor,
            sparse_meta: torch.Tensor, dense_mask: torch.Tensor, channel_perm: torch.Tensor,
            bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
            sparse_compressed: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias) -> [..., N]`` from the Spense layout (FP8 values with ``weight_scale``;
    ``sparse_compressed``: the 2:4 region in cuSPARSELt's form, ``SpenseGemmWeight.with_sparse_cores``)."""
    k = dense_mask.numel() * GROUP_SIZE
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # vLLM passes [tokens, K]; a reshape costs host time per call
    if x.is_cuda:
        from vllm_spense.kernels.spense_gemm import SpenseGemmWeight, spense_gemm  # Triton: CUDA only

        weight = SpenseGemmWeight.from_channel_perm(dense_weight, sparse_weight, sparse_meta, channel_perm,
                                                    weight_scale, sparse_compressed)
        y = spense_gemm(x2.contiguous(), weight, bias)
    else:  # PyTorch reference: gather per 2:4 group for a few rows, else rebuild W for this call and matmul
        from vllm_spense.kernels.reference import spense_linear as reference

        packed = PackedSpenseWeight(dense_weight, sparse_weight, sparse_meta, dense_mask, weight_scale)
        if x2.shape[0] <= CPU_GATHER_MAX_M:
            y = reference(x2, packed, bias)
        else:
            y = torch.nn.functional.linear(x2, unpack(packed).to(x2.dtype), bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], dense_weight.shape[0])


def _linear_fake(x, dense_weight, sparse_weight, sparse_meta, dense_mask, channel_perm, bias=None, weight_scale=None,
                 sparse_compressed=None):
    return x.new_empty(*x.shape[:-1], dense_weight.shape[0])


# Registered straight into the dispatcher for the CUDA and CPU backends, as vLLM registers its own ops
# (``direct_register_custom_op``), not through ``torch.library.custom_op``, whose Python wrapper adds host
# time to every call (about 9 us here against the direct registration, on a 2-core CPU). A prefill is
# host-bound under vLLM: 237.6 us of host time per call of the op on an H200 against 164.0 us for
# ``spense_gemm`` alone (8B o_proj at 2048 rows, docs/PERFORMANCE.md), 144 calls per forward.
_LIBRARY = torch.library.Library("spense", "DEF")  # the op lives as long as this object
_LIBRARY.define("linear" + torch.library.infer_schema(_linear, mutates_args=()))
for _backend in ("CUDA", "CPU"):
    _LIBRARY.impl("linear", _linear, _backend)
torch.library.register_fake("spense::linear", _linear_fake, lib=_LIBRARY)
spense_linear = torch.ops.spense.linear.default
