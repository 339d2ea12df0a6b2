"""Fused sparse + dense Triton GEMMs over the Spense layout: ``y = x @ W^T (+ bias)``.

Shapes (docs/FORMAT.md): ``x [M, K]`` fp16/bf16/fp32; ``dense_weight [N, KD]`` (KD = 4 * G_dense);
``sparse_weight [N, 2 * GS]``; ``sparse_meta [N, GS / 2]`` uint8. Built once per weight
(``SpenseGemmWeight``): ``dense_channels [KD]`` / ``sparse_channels [4 * GS]`` int32, the input channel of
every dense column and of every position of every 2:4 group, and ``channel_perm = cat(dense, sparse)``.

Two paths are chosen by M in ``choose_config`` (inside ``spense_gemm``, which the vLLM custom op calls);
a third kernel runs only when a config asks for it.

Decode, M <= ``GEMV_MAX_M`` (``_spense_gemv_kernel``): CUDA-core FMAs over the same permuted activations;
the activation under each kept 2:4 value is picked from its group's four with two selects. No MMA, so no
register-layout conversion of the expanded tile.

Fused MMA (``_spense_gemm_kernel``, explicit configs only: since the prefill path stopped rebuilding the
dense region it is faster from M = 8, docs/KERNELS.md): ``x`` is permuted once (``x[:, channel_perm]``, M*K
elements, a few microseconds) so both regions read contiguous activation columns. One program owns a
``BLOCK_M x BLOCK_N`` tile of ``y`` and one fp32 accumulator; it walks the dense region in ``BLOCK_KD``
steps (plain MMA) and the 2:4 region in ``BLOCK_G``-group steps, expanding the packed values and 4-bit
indices in registers into a ``BLOCK_N x 4*BLOCK_G`` tile with zeros at the pruned positions for the same
MMA. W is never decompressed in memory. With ``SPLIT_K > 1`` (few output tiles, long K) programs split
both walks and add partial sums into an fp32 buffer with atomics.

From M = ``PREFILL_MIN_M`` = 5 (batched decode and prefill): cuBLAS multiplies the permuted activations'
dense columns by ``dense_weight`` as stored, then ``_spense_expand_kernel`` writes the 2:4 region as a
dense ``[N, 4 * GS]`` temporary (contiguous reads and writes) and a second cuBLAS call adds its product.

Triton cannot issue Hopper's sparse MMA, so the 2:4 region costs dense MMA work; at decode the GEMM is
bound by the weight bytes read (0.67x dense at rho = 0.25), which is where a speedup has to come from.
Measured status against cuBLAS (far from that floor today): docs/KERNELS.md.
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
def _load_2_4_tile(pairs_ptr, meta_ptr, offs_n, gg, mask, stride_pn, stride_metan, VALUE_DTYPE: tl.constexpr):
    """Kept values and positions of a [BLOCK_N, BLOCK_G] tile of 2:4 groups.

    Each group's two values are read as one word (int32 for 16-bit values, int64 for fp32): one
    contiguous, vectorisable load instead of two strided ones. Returns (first, second, i0, i1).
    """
    words = tl.load(pairs_ptr + offs_n[:, None] * stride_pn + gg[None, :], mask=mask, other=0)
    if VALUE_DTYPE == tl.float32:
        first = words.to(tl.int32).to(tl.float32, bitcast=True)
        second = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        first = words.to(tl.int16).to(VALUE_DTYPE, bitcast=True)
        second = (words >> 16).to(tl.int16).to(VALUE_DTYPE, bitcast=True)
    byte = tl.load(meta_ptr + offs_n[:, None] * stride_metan + (gg // 2)[None, :], mask=mask, other=0x44)
    nibble = (byte.to(tl.int32) >> ((gg % 2) * 4)[None, :]) & 0xF  # group 2j: low nibble, 2j+1: high
    return first, second, nibble & 0x3, nibble >> 2


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_om,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Bias (added once, by the first K slice), then a store, or an fp32 atomic add when K is split."""
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

    # 2:4 region, BLOCK_G groups per step. Position p of every group is one [BLOCK_N, BLOCK_G] weight tile
    # (the kept value landing at p, else 0) against activation columns 4g + p: four MMAs, no reshapes.
    offs_g = tl.arange(0, BLOCK_G)
    for g0 in range(pid_k * BLOCK_G, GS, SPLIT_K * BLOCK_G):
        gg = g0 + offs_g
        mask_g = gg < GS
        first, second, i0, i1 = _load_2_4_tile(sparse_w_ptr, meta_ptr, offs_n, gg, mask_n[:, None] & mask_g[None, :],
                                               stride_swn, stride_metan, dense_w_ptr.dtype.element_ty)
        for p in tl.static_range(4):
            w = tl.where(i0 == p, first, tl.where(i1 == p, second, tl.zeros_like(first)))
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + KD + (4 * gg + p)[None, :],
                        mask=mask_m[:, None] & mask_g[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)

    _store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _spense_gemv_kernel(
    x_ptr, dense_w_ptr, sparse_w_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, KD, GS,
    stride_xm, stride_dwn, stride_swn, stride_metan, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Decode (M <= BLOCK_M, a few rows): CUDA-core FMAs, no MMA and so no register-layout conversions.

    All M rows live in one program; partial products stay in a [BLOCK_M, BLOCK_N, columns] fp32 tile that
    is reduced once at the end. For a 2:4 group the activation under each kept value is picked from the
    group's four activations with two selects (first index is 0..2, second 1..3).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    offs_kd = tl.arange(0, BLOCK_KD)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KD), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_KD, KD, SPLIT_K * BLOCK_KD):
        kk = k0 + offs_kd
        mask_k = kk < KD
        w = tl.load(dense_w_ptr + offs_n[:, None] * stride_dwn + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc_d += x[:, None, :] * w[None, :, :]
    acc = tl.sum(acc_d, axis=2)

    offs_g = tl.arange(0, BLOCK_G)
    acc_s = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
    for g0 in range(pid_k * BLOCK_G, GS, SPLIT_K * BLOCK_G):
        gg = g0 + offs_g
        mask_g = gg < GS
        first, second, i0, i1 = _load_2_4_tile(sparse_w_ptr, meta_ptr, offs_n, gg, mask_n[:, None] & mask_g[None, :],
                                               stride_swn, stride_metan, dense_w_ptr.dtype.element_ty)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + KD + 4 * gg[None, :]
        x_mask = mask_m[:, None] & mask_g[None, :]
        x0 = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
        x1 = tl.load(x_ptrs + 1, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
        x2 = tl.load(x_ptrs + 2, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
        x3 = tl.load(x_ptrs + 3, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
        i0 = i0[None, :, :]
        i1 = i1[None, :, :]
        x_first = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
        x_second = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
        acc_s += first.to(tl.float32)[None, :, :] * x_first + second.to(tl.float32)[None, :, :] * x_second
    acc += tl.sum(acc_s, axis=2)

    _store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _spense_expand_kernel(
    sparse_w_ptr, meta_ptr, out_ptr,
    N, GS,
    stride_swn, stride_metan, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """The 2:4 region as a dense ``[N, 4 * GS]`` matrix for the prefill path: 2:4 group after group in their
    permuted order (the columns ``x[:, channel_perm][:, KD:]`` meets), zeros at the pruned positions.
    Contiguous reads and contiguous writes; the dense region needs no copy at all."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gg = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_n = offs_n < N
    first, second, i0, i1 = _load_2_4_tile(sparse_w_ptr, meta_ptr, offs_n, gg, mask_n[:, None] & (gg < GS)[None, :],
                                           stride_swn, stride_metan, out_ptr.dtype.element_ty)
    zero = tl.zeros_like(first)
    w0 = tl.where(i0 == 0, first, zero)  # the first index is 0..2, the second 1..3
    w1 = tl.where(i0 == 1, first, tl.where(i1 == 1, second, zero))
    w2 = tl.where(i0 == 2, first, tl.where(i1 == 2, second, zero))
    w3 = tl.where(i1 == 3, second, zero)
    # join(join(w0, w2), join(w1, w3))[n, g, a, b] holds position 2a + b: reshaped, positions 0..3 in order.
    tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, 4 * BLOCK_G))
    cols = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)
    tl.store(out_ptr + offs_n[:, None] * stride_on + cols[None, :], tile,
             mask=mask_n[:, None] & (cols < 4 * GS)[None, :])


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

    @property
    def sparse_pairs(self) -> torch.Tensor:
        """sparse_weight seen as one word per 2:4 group (its two values): int32 for 16-bit, int64 for fp32."""
        return self.sparse_weight.view(torch.int64 if self.sparse_weight.dtype == torch.float32 else torch.int32)

    @classmethod
    def from_packed(cls, packed: PackedSpenseWeight) -> "SpenseGemmWeight":
        dense_ch, sparse_ch = group_channels(packed.dense_mask)
        n, k = packed.shape
        return cls.from_channel_perm(packed.dense_weight, packed.sparse_weight, packed.sparse_meta,
                                     torch.cat((dense_ch, sparse_ch)).to(torch.int32))

    @classmethod
    def from_channel_perm(cls, dense_weight: torch.Tensor, sparse_weight: torch.Tensor, sparse_meta: torch.Tensor,
                          channel_perm: torch.Tensor) -> "SpenseGemmWeight":
        """From the packed tensors and ``channel_perm`` (int32): what the custom op receives."""
        kd = dense_weight.shape[1]
        return cls(dense_weight.contiguous(), sparse_weight.contiguous(), sparse_meta.contiguous(),
                   channel_perm[:kd], channel_perm[kd:], channel_perm, dense_weight.shape[0], channel_perm.numel())


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_kd: int
    block_g: int
    split_k: int
    num_warps: int
    num_stages: int
    kernel: str = "mma"  # "gemv" (CUDA-core FMAs, tiny M), "mma" (fused tl.dot) or "unpack" (+ cuBLAS)


# Prefill: the dense region straight to cuBLAS, the 2:4 region expanded in block_n x block_g tiles, then cuBLAS.
UNPACK_AND_CUBLAS = KernelConfig(0, 32, 0, 64, 1, 4, 1, "unpack")
# Since the dense region goes to cuBLAS as stored and only the 2:4 region is expanded, that path beats the
# fused MMA kernel from M = 8 on every Qwen3-8B shape (docs/measurements/crossover_h100.json: at M = 8,
# 67.9 vs 86.7 us on qkv, 218.8 vs 292.1 on gate_up); the gemv kernel keeps M <= 4.
GEMV_MAX_M = 4
PREFILL_MIN_M = GEMV_MAX_M + 1


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Kernel and tiles by M. M <= 4: the CUDA-core gemv kernel, split-K to about 6 programs per SM (tiles
    from the decode sweep, docs/measurements/sweep_decode_h200_v4.json); M >= 5: cuBLAS + 2:4 expansion."""
    if m >= PREFILL_MIN_M:
        return UNPACK_AND_CUBLAS
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    split_k = max(1, min(8, (6 * sms) // triton.cdiv(n, 32), k // 256))
    return KernelConfig(triton.next_power_of_2(m), 32, 64, 32, split_k, num_warps=4, num_stages=3, kernel="gemv")


def mma_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """Tiles for the fused MMA kernel (16-64-row tiles, split-K until about 4 programs per SM per 4096
    channels of K, from the decode sweeps): what benchmarks compare the default paths against."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 1
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if m <= 32 else 64
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = max(1, min(8, (4 * sms * k) // (4096 * tiles), k // 512))
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


def expand_2_4(weight: SpenseGemmWeight, block_n: int = 32, block_g: int = 64) -> torch.Tensor:
    """The 2:4 region as a dense ``[N, 4 * GS]`` temporary (permuted channel order), never kept."""
    gs = weight.sparse_channels.numel() // GROUP_SIZE
    out = torch.empty(weight.n, 4 * gs, device=weight.sparse_weight.device, dtype=weight.sparse_weight.dtype)
    _spense_expand_kernel[(triton.cdiv(weight.n, block_n), triton.cdiv(gs, block_g))](
        weight.sparse_pairs, weight.sparse_meta, out, weight.n, gs,
        weight.sparse_pairs.stride(0), weight.sparse_meta.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_G=block_g)
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
    x_perm = x.index_select(1, weight.channel_perm)  # dense channels first, then the 2:4 channels
    if config.kernel == "unpack":  # prefill: cuBLAS on the dense region as stored, then on the expanded 2:4 one
        kd = weight.dense_channels.numel()
        y = torch.nn.functional.linear(x_perm[:, :kd], weight.dense_weight, bias)
        return result.copy_(torch.addmm(y, x_perm[:, kd:], expand_2_4(weight, config.block_n, config.block_g).t()))
    # Split-K programs add partial sums: they need a zeroed fp32 buffer.
    acc = torch.zeros(m, weight.n, device=x.device, dtype=torch.float32) if config.split_k > 1 else result
    args = (x_perm, weight.dense_weight, weight.sparse_pairs, weight.sparse_meta, bias if bias is not None else x,
            acc, m, weight.n, weight.dense_channels.numel(), weight.sparse_channels.numel() // GROUP_SIZE,
            x_perm.stride(0), weight.dense_weight.stride(0), weight.sparse_pairs.stride(0),
            weight.sparse_meta.stride(0), acc.stride(0))
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KD=config.block_kd, BLOCK_G=config.block_g,
                 num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kernel == "gemv":
        if m > config.block_m:
            raise ValueError(f"spense_gemm: the gemv kernel takes M <= block_m={config.block_m}, found M={m}")
        grid = (triton.cdiv(weight.n, config.block_n), config.split_k)
        _spense_gemv_kernel[grid](*args, HAS_BIAS=bias is not None, SPLIT_K=config.split_k, **tiles)
    else:
        grid = (triton.cdiv(weight.n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
        _spense_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, SPLIT_K=config.split_k,
                                  FP32_DOT=x.dtype == torch.float32, **tiles)
    if config.split_k > 1:
        result.copy_(acc)
    return result
