"""Fused sparse + dense Triton GEMM over the Spense layout: ``y = x @ W^T (+ bias)`` in one launch.

Shapes (docs/FORMAT.md): ``x [M, K]`` fp16/bf16/fp32; ``dense_weight [N, KD]`` (KD = 4 * G_dense);
``sparse_weight [N, 2 * GS]``; ``sparse_meta [N, GS / 2]`` uint8; and, prepared once per weight,
``dense_channels [KD]`` / ``sparse_channels [4 * GS]`` int32: the input channel of every dense column
and of every position of every 2:4 group (ascending), so the kernel gathers the activation columns
each region reads and no permuted copy of ``x`` is made.

One program owns a ``BLOCK_M x BLOCK_N`` tile of ``y`` and one fp32 accumulator. It walks the dense
region in ``BLOCK_KD``-column steps (plain MMA) and the 2:4 region in ``BLOCK_G``-group steps: it
loads the packed values and 4-bit indices, expands them in registers into a ``BLOCK_N x 4*BLOCK_G``
tile with zeros at the pruned positions, and feeds the same MMA. W is never decompressed in memory.
With ``SPLIT_K > 1`` (decode: few output tiles, long K), programs split both K walks and add their
partial sums into an fp32 buffer with atomics.

Triton cannot issue Hopper's sparse MMA, so the 2:4 region costs dense MMA work; at decode the GEMM is
bound by the weight bytes read (0.67x dense at rho = 0.25), which is where the speedup comes from.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from vllm_spense.format import GROUP_SIZE, PackedSpenseWeight
from vllm_spense.kernels.reference import group_channels


@triton.jit
def _spense_gemm_kernel(
    # pointers
    x_ptr, dense_w_ptr, sparse_w_ptr, meta_ptr, dense_ch_ptr, sparse_ch_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, KD, GS,
    # strides (last dimensions are contiguous)
    stride_xm, stride_dwn, stride_swn, stride_metan, stride_om,
    # meta-parameters
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Dense region: gathered activation columns times the stored dense columns.
    offs_kd = tl.arange(0, BLOCK_KD)
    for k0 in range(pid_k * BLOCK_KD, KD, SPLIT_K * BLOCK_KD):
        kk = k0 + offs_kd
        mask_k = kk < KD
        channels = tl.load(dense_ch_ptr + kk, mask=mask_k, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + channels[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(dense_w_ptr + offs_n[:, None] * stride_dwn + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)

    # 2:4 region: BLOCK_G groups = 2*BLOCK_G stored values = 4*BLOCK_G input channels per step.
    offs_v = tl.arange(0, 2 * BLOCK_G)
    offs_b = tl.arange(0, BLOCK_G // 2)
    offs_c = tl.arange(0, 4 * BLOCK_G)
    position = tl.arange(0, 4)
    for g0 in range(pid_k * BLOCK_G, GS, SPLIT_K * BLOCK_G):
        values = tl.load(sparse_w_ptr + offs_n[:, None] * stride_swn + (2 * g0 + offs_v)[None, :],
                         mask=mask_n[:, None] & ((2 * g0 + offs_v) < 2 * GS)[None, :], other=0.0)
        meta = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (g0 // 2 + offs_b)[None, :],
                       mask=mask_n[:, None] & ((g0 // 2 + offs_b) < GS // 2)[None, :], other=0x4)
        meta = meta.to(tl.int32)
        nibble = tl.reshape(tl.join(meta & 0xF, meta >> 4), (BLOCK_N, BLOCK_G))  # group 2j low, 2j+1 high
        first, second = tl.split(tl.reshape(values, (BLOCK_N, BLOCK_G, 2)))
        i0 = (nibble & 0x3)[:, :, None]
        i1 = (nibble >> 2)[:, :, None]
        zero = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=values.dtype)
        w = tl.where(i0 == position[None, None, :], first[:, :, None],
                     tl.where(i1 == position[None, None, :], second[:, :, None], zero))
        w = tl.reshape(w, (BLOCK_N, 4 * BLOCK_G))
        cc = 4 * g0 + offs_c
        mask_c = cc < 4 * GS
        channels = tl.load(sparse_ch_ptr + cc, mask=mask_c, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + channels[None, :],
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@dataclasses.dataclass(frozen=True)
class SpenseGemmWeight:
    """The packed tensors plus the channel maps the kernel gathers with; built once per weight."""

    dense_weight: torch.Tensor
    sparse_weight: torch.Tensor
    sparse_meta: torch.Tensor
    dense_channels: torch.Tensor
    sparse_channels: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_packed(cls, packed: PackedSpenseWeight) -> "SpenseGemmWeight":
        dense_ch, sparse_ch = group_channels(packed.dense_mask)
        n, k = packed.shape
        return cls(packed.dense_weight.contiguous(), packed.sparse_weight.contiguous(),
                   packed.sparse_meta.contiguous(), dense_ch.to(torch.int32).contiguous(),
                   sparse_ch.to(torch.int32).contiguous(), n, k)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_kd: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Decode (small M): narrow tiles and split-K to put every SM on the weight bytes. Prefill: big tiles."""
    if m <= 64:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_n = 64
        tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
        split_k = max(1, min(16, (2 * sms) // max(tiles, 1), k // 512))
        return KernelConfig(block_m, block_n, 128, 32, split_k, num_warps=4, num_stages=4)
    if m <= 256:
        return KernelConfig(64, 128, 64, 16, 1, num_warps=4, num_stages=4)
    return KernelConfig(128, 128, 64, 16, 1, num_warps=8, num_stages=3)


def check_inputs(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None) -> None:
    """Every shape, dtype and stride the kernel relies on, checked before launch."""
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"spense_gemm: x must be [M, {weight.k}], found {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"spense_gemm: x dtype must be float16, bfloat16 or float32, found {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("spense_gemm: x must have a contiguous last dimension")
    kd, gs = weight.dense_channels.numel(), weight.sparse_channels.numel() // GROUP_SIZE
    expected = {"dense_weight": ((weight.n, kd), x.dtype), "sparse_weight": ((weight.n, 2 * gs), x.dtype),
                "sparse_meta": ((weight.n, gs // 2), torch.uint8)}
    for name, (shape, dtype) in expected.items():
        tensor = getattr(weight, name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.stride(-1) != 1:
            raise ValueError(f"spense_gemm: {name} must be {dtype} {list(shape)} with a contiguous last dimension, "
                             f"found {tensor.dtype} {list(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"spense_gemm: {name} is on {tensor.device}, x on {x.device}")
    if kd + 4 * gs != weight.k or gs % 2:
        raise ValueError(f"spense_gemm: {kd} dense + {4 * gs} 2:4 channels do not make K={weight.k} "
                         f"with an even number of 2:4 groups")
    for name in ("dense_channels", "sparse_channels"):
        tensor = getattr(weight, name)
        if tensor.dtype != torch.int32 or tensor.device != x.device:
            raise ValueError(f"spense_gemm: {name} must be int32 on {x.device}")
    if bias is not None and (bias.shape != (weight.n,) or bias.device != x.device):
        raise ValueError(f"spense_gemm: bias must be [{weight.n}] on {x.device}, found {list(bias.shape)}")


def spense_gemm(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None = None,
                config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias -> [M, N]`` in x's dtype; the tile choice by M happens here."""
    check_inputs(x, weight, bias)
    m = x.shape[0]
    if out is not None and (out.shape != (m, weight.n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"spense_gemm: out must be a contiguous {x.dtype} [{m}, {weight.n}] tensor")
    config = config or choose_config(m, weight.n, weight.k, x.device)
    result = out if out is not None else torch.empty(m, weight.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return result
    # Split-K programs add partial sums: they need a zeroed fp32 buffer.
    acc = torch.zeros(m, weight.n, device=x.device, dtype=torch.float32) if config.split_k > 1 else result
    grid = (triton.cdiv(weight.n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _spense_gemm_kernel[grid](
        x, weight.dense_weight, weight.sparse_weight, weight.sparse_meta, weight.dense_channels,
        weight.sparse_channels, bias if bias is not None else x, acc,
        m, weight.n, weight.dense_channels.numel(), weight.sparse_channels.numel() // GROUP_SIZE,
        x.stride(0), weight.dense_weight.stride(0), weight.sparse_weight.stride(0), weight.sparse_meta.stride(0),
        acc.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=config.split_k, FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KD=config.block_kd, BLOCK_G=config.block_g,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.split_k > 1:
        result.copy_(acc)
    return result
