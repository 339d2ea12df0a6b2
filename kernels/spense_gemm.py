"""Fused sparse + dense Triton GEMMs over the Spense layout: ``y = x @ W^T (+ bias)``.

Shapes (docs/FORMAT.md): ``x [M, K]`` fp16/bf16/fp32; ``dense_weight [N, KD]`` (KD = 4 * G_dense);
``sparse_weight [N, 2 * GS]``; ``sparse_meta [N, GS / 2]`` uint8. Built once per weight
(``SpenseGemmWeight``): ``dense_channels [KD]`` / ``sparse_channels [4 * GS]`` int32, the input channel of
every dense column and of every position of every 2:4 group, and ``channel_perm = cat(dense, sparse)``.

Decode and mid-size M (``_spense_gemm_kernel``): ``x`` is permuted once (``x[:, channel_perm]``, M*K
elements, a few microseconds) so both regions read contiguous activation columns. One program owns a
``BLOCK_M x BLOCK_N`` tile of ``y`` and one fp32 accumulator; it walks the dense region in ``BLOCK_KD``
steps (plain MMA) and the 2:4 region in ``BLOCK_G``-group steps, expanding the packed values and 4-bit
indices in registers into a ``BLOCK_N x 4*BLOCK_G`` tile with zeros at the pruned positions for the same
MMA. W is never decompressed in memory. With ``SPLIT_K > 1`` (few output tiles, long K) programs split
both walks and add partial sums into an fp32 buffer with atomics.

Prefill (M >= ``PREFILL_MIN_M``): ``_spense_unpack_kernel`` rebuilds W into a temporary (bandwidth-bound,
small next to an M >= 256 GEMM) and cuBLAS multiplies; the temporary is freed after the call.

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
def _expand_2_4(values, meta, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """[BLOCK_N, 2*BLOCK_G] kept values + [BLOCK_N, BLOCK_G/2] metadata bytes -> [BLOCK_N, 4*BLOCK_G] weights."""
    nibble = tl.reshape(tl.join(meta & 0xF, meta >> 4), (BLOCK_N, BLOCK_G))  # group 2j low, 2j+1 high nibble
    first, second = tl.split(tl.reshape(values, (BLOCK_N, BLOCK_G, 2)))
    i0 = (nibble & 0x3)[:, :, None]
    i1 = (nibble >> 2)[:, :, None]
    position = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=values.dtype)
    w = tl.where(i0 == position, first[:, :, None], tl.where(i1 == position, second[:, :, None], zero))
    return tl.reshape(w, (BLOCK_N, 4 * BLOCK_G))


@triton.jit
def _spense_gemm_kernel(
    # pointers
    x_ptr, dense_w_ptr, sparse_w_ptr, meta_ptr, bias_ptr, out_ptr,
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

    # Dense region: columns [0, KD) of the permuted activations times the stored dense columns.
    offs_kd = tl.arange(0, BLOCK_KD)
    for k0 in range(pid_k * BLOCK_KD, KD, SPLIT_K * BLOCK_KD):
        kk = k0 + offs_kd
        mask_k = kk < KD
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
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
    for g0 in range(pid_k * BLOCK_G, GS, SPLIT_K * BLOCK_G):
        values = tl.load(sparse_w_ptr + offs_n[:, None] * stride_swn + (2 * g0 + offs_v)[None, :],
                         mask=mask_n[:, None] & ((2 * g0 + offs_v) < 2 * GS)[None, :], other=0.0)
        meta = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (g0 // 2 + offs_b)[None, :],
                       mask=mask_n[:, None] & ((g0 // 2 + offs_b) < GS // 2)[None, :], other=0x4)
        w = _expand_2_4(values, meta.to(tl.int32), BLOCK_N, BLOCK_G)
        cc = 4 * g0 + offs_c
        mask_c = cc < 4 * GS
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + KD + cc[None, :],
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


@triton.jit
def _spense_unpack_kernel(
    dense_w_ptr, sparse_w_ptr, meta_ptr, dense_ch_ptr, sparse_ch_ptr, out_ptr,
    N, KD, GS,
    stride_dwn, stride_swn, stride_metan, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Rebuild W [N, K] in its original channel order (zeros at pruned positions) for the prefill path."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # This program's share of the dense columns: 4 * BLOCK_G of them.
    kk = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    mask_k = kk < KD
    channels = tl.load(dense_ch_ptr + kk, mask=mask_k, other=0)
    w = tl.load(dense_w_ptr + offs_n[:, None] * stride_dwn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :])
    tl.store(out_ptr + offs_n[:, None] * stride_on + channels[None, :], w, mask=mask_n[:, None] & mask_k[None, :])
    # And BLOCK_G of the 2:4 groups.
    g0 = pid_g * BLOCK_G
    offs_v = tl.arange(0, 2 * BLOCK_G)
    offs_b = tl.arange(0, BLOCK_G // 2)
    values = tl.load(sparse_w_ptr + offs_n[:, None] * stride_swn + (2 * g0 + offs_v)[None, :],
                     mask=mask_n[:, None] & ((2 * g0 + offs_v) < 2 * GS)[None, :], other=0.0)
    meta = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (g0 // 2 + offs_b)[None, :],
                   mask=mask_n[:, None] & ((g0 // 2 + offs_b) < GS // 2)[None, :], other=0x4).to(tl.int32)
    w = _expand_2_4(values, meta, BLOCK_N, BLOCK_G)
    cc = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
    mask_c = cc < 4 * GS
    channels = tl.load(sparse_ch_ptr + cc, mask=mask_c, other=0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + channels[None, :], w, mask=mask_n[:, None] & mask_c[None, :])


@dataclasses.dataclass(frozen=True)
class SpenseGemmWeight:
    """The packed tensors plus the channel maps, built once per weight (``process_weights_after_loading``).

    ``channel_perm [K]`` lists the dense channels, then the 2:4 channels: ``x[:, channel_perm]`` is the
    activation layout the fused kernel reads with plain contiguous loads.
    """

    dense_weight: torch.Tensor
    sparse_weight: torch.Tensor
    sparse_meta: torch.Tensor
    dense_channels: torch.Tensor
    sparse_channels: torch.Tensor
    channel_perm: torch.Tensor
    n: int
    k: int

    @classmethod
    def from_packed(cls, packed: PackedSpenseWeight) -> "SpenseGemmWeight":
        dense_ch, sparse_ch = group_channels(packed.dense_mask)
        n, k = packed.shape
        return cls(packed.dense_weight.contiguous(), packed.sparse_weight.contiguous(),
                   packed.sparse_meta.contiguous(), dense_ch.to(torch.int32).contiguous(),
                   sparse_ch.to(torch.int32).contiguous(), torch.cat((dense_ch, sparse_ch)).contiguous(), n, k)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_kd: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int


UNPACK_AND_CUBLAS = KernelConfig(0, 64, 0, 32, 1, 4, 1)  # prefill: rebuild W once per call, then cuBLAS
PREFILL_MIN_M = 256


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Decode (small M): narrow tiles, split-K until every SM streams weights. Prefill: unpack + cuBLAS."""
    if m >= PREFILL_MIN_M:
        return UNPACK_AND_CUBLAS
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    split_k = max(1, min(8, (2 * sms) // max(tiles, 1), k // 512))
    return KernelConfig(block_m, block_n, 128, 32, split_k, num_warps=4, num_stages=4)


def check_inputs(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None) -> None:
    """Every shape, dtype and stride the kernels rely on, checked before launch."""
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"spense_gemm: x must be [M, {weight.k}], found {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"spense_gemm: x dtype must be float16, bfloat16 or float32, found {x.dtype}")
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
    if kd + 4 * gs != weight.k or gs % 2 or weight.channel_perm.numel() != weight.k:
        raise ValueError(f"spense_gemm: {kd} dense + {4 * gs} 2:4 channels do not make K={weight.k} "
                         f"with an even number of 2:4 groups")
    for name in ("dense_channels", "sparse_channels"):
        tensor = getattr(weight, name)
        if tensor.dtype != torch.int32 or tensor.device != x.device:
            raise ValueError(f"spense_gemm: {name} must be int32 on {x.device}")
    if bias is not None and (bias.shape != (weight.n,) or bias.device != x.device):
        raise ValueError(f"spense_gemm: bias must be [{weight.n}] on {x.device}, found {list(bias.shape)}")


def unpack_weight(weight: SpenseGemmWeight, block_n: int = 64, block_g: int = 32) -> torch.Tensor:
    """W [N, K] rebuilt by the unpack kernel; a temporary, never kept."""
    out = torch.empty(weight.n, weight.k, device=weight.dense_weight.device, dtype=weight.dense_weight.dtype)
    kd, gs = weight.dense_channels.numel(), weight.sparse_channels.numel() // GROUP_SIZE
    steps = max(triton.cdiv(gs, block_g), triton.cdiv(kd, 4 * block_g), 1)
    _spense_unpack_kernel[(triton.cdiv(weight.n, block_n), steps)](
        weight.dense_weight, weight.sparse_weight, weight.sparse_meta, weight.dense_channels, weight.sparse_channels,
        out, weight.n, kd, gs, weight.dense_weight.stride(0), weight.sparse_weight.stride(0),
        weight.sparse_meta.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_G=block_g)
    return out


def spense_gemm(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None = None,
                config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias -> [M, N]`` in x's dtype; the path and tiles are chosen here, by M."""
    check_inputs(x, weight, bias)
    m = x.shape[0]
    if out is not None and (out.shape != (m, weight.n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"spense_gemm: out must be a contiguous {x.dtype} [{m}, {weight.n}] tensor")
    config = config or choose_config(m, weight.n, weight.k, x.device)
    result = out if out is not None else torch.empty(m, weight.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return result
    if config.block_m == 0:  # prefill: W is rebuilt into a temporary and cuBLAS does the GEMM
        w = unpack_weight(weight, config.block_n, config.block_g)
        return result.copy_(torch.nn.functional.linear(x, w, bias))
    x_perm = x.index_select(1, weight.channel_perm)  # dense channels first, then the 2:4 channels
    # Split-K programs add partial sums: they need a zeroed fp32 buffer.
    acc = torch.zeros(m, weight.n, device=x.device, dtype=torch.float32) if config.split_k > 1 else result
    grid = (triton.cdiv(weight.n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _spense_gemm_kernel[grid](
        x_perm, weight.dense_weight, weight.sparse_weight, weight.sparse_meta, bias if bias is not None else x, acc,
        m, weight.n, weight.dense_channels.numel(), weight.sparse_channels.numel() // GROUP_SIZE,
        x_perm.stride(0), weight.dense_weight.stride(0), weight.sparse_weight.stride(0),
        weight.sparse_meta.stride(0), acc.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=config.split_k, FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KD=config.block_kd, BLOCK_G=config.block_g,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.split_k > 1:
        result.copy_(acc)
    return result
