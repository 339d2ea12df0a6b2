"""Fused sparse + dense Triton GEMMs over the Spense layout: ``y = x @ W^T (+ bias)``.

Shapes (docs/FORMAT.md): ``x [M, K]`` fp16/bf16/fp32; ``dense_weight [N, KD]`` (KD = 4 * G_dense);
``sparse_weight [N, 2 * GS]``; ``sparse_meta [N, GS / 2]`` uint8. Built once per weight
(``SpenseGemmWeight``): ``channel_perm [K]`` int32, the input channel of every dense column
(``dense_channels``, its first KD entries), then of every position of every 2:4 group (``sparse_channels``).

Three paths, chosen by M in ``choose_config`` (inside ``spense_gemm``, which the vLLM custom op calls):

M = 1 (``_spense_gemv_kernel``, tiles by ``gemv_tiles``): CUDA-core FMAs (inline PTX on NVIDIA GPUs), 4 or 8
rows of W per program, no split-K.
``x`` is read through ``channel_perm`` inside the kernel (a group is four consecutive input channels, so
one index per group), which saves the separate permutation launch. Every tensor is read one word per four
values (``quad_words``): a group's four activations, a dense group's four values, a pair of 2:4 groups'
four kept values (with one metadata byte); the activation under each kept value is picked from its
group's four by one byte permute per group (inline PTX; two selects per value elsewhere). M = 2 against
weights of at most ``GEMV_TWO_ROWS_MAX_WEIGHT`` 16-bit values takes this kernel too, both rows in one
program (``gemv_two_rows_tiles``).

M = 2 .. ``MMA_MAX_M`` (``_spense_gemm_kernel``, tiles by ``mma_tiles``): ``x`` is permuted once
(``permute_columns``, one 8-byte word per 4-channel group) into a copy padded to whole row tiles (dense
channels, then 2:4 channels, so both regions read contiguous columns). One program owns a
``BLOCK_M x BLOCK_N`` tile of ``y`` and one fp32 accumulator; it walks the dense region in ``BLOCK_KD``
steps (plain MMA) and the 2:4 region in ``BLOCK_G``-group steps, expanding each step's packed values and
4-bit indices in registers into one ``BLOCK_N x 4*BLOCK_G`` tile with zeros at the pruned positions for one
MMA: by byte permutes on NVIDIA GPUs (``_expand_pairs_by_permutes``, inline PTX), by selects elsewhere
(``_expand_pairs``). W is never decompressed in memory. The M tiles of an N
tile are neighbours in the grid, so they share its weights through L2. With ``SPLIT_K > 1`` programs split
both walks and add partial sums into an fp32 buffer with atomics. Past 48 rows (32 for very wide weights)
the operands are swapped (``SWAP_AB``: ``y^T = W x^T``), so one expanded weight tile serves up to 256 rows.

M >= ``SPARSE_CORES_MIN_M`` for bf16 weights on GPUs with sparse tensor cores (``_on_sparse_cores``):
x permuted once, the dense region by cuBLAS, the 2:4 region by cuSPARSELt added onto it (opt-in up to
``OVERLAP_MAX_ROWS`` rows: the two at once on two streams, then summed).

M > ``MMA_MAX_M`` for other weights (prefill): ``_spense_expand_kernel`` writes all of W as a dense
``[N, K]`` temporary in x's own channel order (contiguous writes; each group read from its packed place)
and one cuBLAS GEMM multiplies x as it comes; the temporary is freed.

FP8 values (``weight_scale [N]`` float32 beside them) take the same paths (the MMA kernel up to
``MMA_MAX_M`` rows, tiles by ``fp8_mma_tiles``): decoded in registers and
converted to x's dtype (W8A16) at decode, the per-channel scale applied once at the store; at prefill the
expansion writes all of W as FP8 bytes and ``torch._scaled_mm`` multiplies it with x quantized per row
(W8A8, ``_quantize_rows_kernel``; at decode through ``channel_perm``, at prefill in x's order).
``KernelConfig.quantize_x`` switches an MMA or prefill config between the two.

On sm90+ the gemv and MMA kernels are launched with programmatic dependent launch (``_launches_early``):
each may start before the kernel ahead of it ends and waits for it only before reading x.

Triton cannot issue Hopper's sparse MMA, so the 2:4 region costs dense MMA work; at decode the GEMM is
bound by the weight bytes read (0.67x dense at rho = 0.25), which is where a speedup has to come from.
Measured status against cuBLAS and that floor: docs/KERNELS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from vllm_spense.format import GROUP_SIZE, PackedSpenseWeight
from vllm_spense.kernels import cusparselt
from vllm_spense.kernels.reference import group_channels


@triton.jit
def _load_2_4_tile(pairs_ptr, meta_ptr, offs_n, gg, mask, stride_pn, stride_metan, VALUE_DTYPE: tl.constexpr):
    """Kept values and positions of a [BLOCK_N, BLOCK_G] tile of 2:4 groups.

    Each group's two values are read as one word (int16 for FP8, int32 for 16-bit values, int64 for fp32):
    one contiguous, vectorisable load instead of two strided ones. Returns (first, second, i0, i1); with
    ``VALUE_DTYPE`` int8 (FP8 values) the values are their bytes.
    """
    words = tl.load(pairs_ptr + offs_n[:, None] * stride_pn + gg[None, :], mask=mask, other=0)
    if VALUE_DTYPE == tl.int8:
        first = words.to(tl.int8)
        second = (words >> 8).to(tl.int8)
    elif VALUE_DTYPE == tl.float32:
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
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, w_scale_ptr=None, x_scale_ptr=None):
    """FP8 scales (per output channel of W, per row of a quantized x), bias (added once, by the first K
    slice), then a store, or an fp32 atomic add when K is split."""
    if w_scale_ptr is not None:
        acc *= tl.load(w_scale_ptr + offs_n, mask=mask_n, other=1.0)[None, :]
    if x_scale_ptr is not None:
        acc *= tl.load(x_scale_ptr + offs_m, mask=mask_m, other=1.0)[:, None]
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
def _mma(acc, x, w, FP32_DOT: tl.constexpr, SWAP_AB: tl.constexpr):
    """``acc += x @ w^T``; with ``SWAP_AB`` the transposed product ``acc^T += w @ x^T``: W's rows on the MMA's
    64-row side (the operand Hopper's wgmma may read from registers, where the 2:4 expansion builds it) and
    x's rows on the other, so each expanded weight tile serves up to 256 rows of x."""
    if SWAP_AB:
        if FP32_DOT:
            return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            return tl.dot(w, tl.trans(x), acc)
    else:
        if FP32_DOT:
            return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            return tl.dot(x, tl.trans(w), acc)


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
    PADDED_M: tl.constexpr = False, w_scale_ptr=None, x_scale_ptr=None, BYTE_PERMUTES: tl.constexpr = False,
    DENSE_ALIGN: tl.constexpr = 16, WORDS_ALIGN: tl.constexpr = 16, META_ALIGN: tl.constexpr = 16,
    AFTER_PREVIOUS: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
):
    """With ``BYTE_PERMUTES`` (NVIDIA GPUs) 2:4 values are expanded by ``_expand_pairs_by_permutes`` (16-bit
    values, and FP8 values times bf16 or fp16 x).
    FP8 values (``w_scale_ptr`` set) are converted to x's dtype after loading (W8A16), or, with x itself
    quantized per row to FP8 (``x_scale_ptr`` set), multiplied as FP8 on the tensor cores (W8A8); the
    scales multiply the accumulator once, at the store."""
    pid_m = tl.program_id(0)  # the M tiles of one N tile run side by side and share its weights through L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Offsets of W's rows in its three tensors. Triton specialises a stride on being a multiple of 16 only;
    # the ``*_ALIGN`` say what power of two (up to 16) each stride is a multiple of (``_alignment``), so the
    # loads of rows whose stride is not a multiple of 16 stay vectorised and pipelined (Qwen3-32B's down
    # shard at TP=4 and rho = 0.25 ran 2x slower without).
    dense_rows = tl.multiple_of(offs_n * stride_dwn, DENSE_ALIGN)[:, None]
    word_rows = tl.multiple_of(offs_n * stride_swn, WORDS_ALIGN)[:, None]
    meta_rows = tl.multiple_of(offs_n * stride_metan, META_ALIGN)[:, None]
    if AFTER_PREVIOUS:  # launched early (programmatic dependent launch): x is ready only after this
        tl.extra.cuda.gdc_wait()

    # Dense region: columns [0, KD) of the permuted activations times the stored dense columns.
    offs_kd = tl.arange(0, BLOCK_KD)
    for k0 in range(pid_k * BLOCK_KD, KD, SPLIT_K * BLOCK_KD):
        kk = k0 + offs_kd
        mask_k = kk < KD
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(mask_m[:, None] | PADDED_M) & mask_k[None, :], other=0.0)
        w = tl.load(dense_w_ptr + dense_rows + kk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = _mma(acc, x, w, FP32_DOT, SWAP_AB)

    # 2:4 region, BLOCK_G groups (BLOCK_G / 2 pairs) per step, expanded in registers into one zero-filled
    # [BLOCK_N, 4 * BLOCK_G] tile (``_expand_pairs``) against 4 * BLOCK_G contiguous activation columns.
    # The words are loaded inside the step that uses them: Triton's pipeliner then keeps NUM_STAGES steps of
    # them in flight (loading them a step ahead by hand instead measured 30-55% slower, docs/KERNELS.md).
    BLOCK_P: tl.constexpr = BLOCK_G // 2
    GP = GS // 2
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, 4 * BLOCK_G)
    value_dtype = dense_w_ptr.dtype.element_ty
    for p0 in range(pid_k * BLOCK_P, GP, SPLIT_K * BLOCK_P):
        pp = p0 + offs_p
        lo, hi, byte = _load_pair_words(sparse_w_ptr + word_rows, meta_ptr + meta_rows, pp[None, :],
                                        mask_n[:, None] & (pp < GP)[None, :], value_dtype)
        if x_scale_ptr is not None:  # W8A8: expand the FP8 bytes, then read the tile as FP8
            w = _expand_pairs(*_decode_pairs(lo, hi, byte, value_dtype, tl.int8)).to(tl.float8e4nv, bitcast=True)
        elif BYTE_PERMUTES and (value_dtype == tl.bfloat16 or value_dtype == tl.float16):
            w = _expand_pairs_by_permutes(lo, byte, x_ptr.dtype.element_ty)
        elif BYTE_PERMUTES and value_dtype == tl.float8e4nv and x_ptr.dtype.element_ty != tl.float32:
            w = _expand_pairs_by_permutes(lo, byte, x_ptr.dtype.element_ty, FP8=True)
        else:
            w = _expand_pairs(*_decode_pairs(lo, hi, byte, value_dtype, x_ptr.dtype.element_ty))
        cols = KD + 8 * p0 + offs_c
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=(mask_m[:, None] | PADDED_M) & (cols < KD + 4 * GS)[None, :], other=0.0)
        acc = _mma(acc, x, w, FP32_DOT, SWAP_AB)

    if SWAP_AB:
        acc = tl.trans(acc)
    _store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_om, HAS_BIAS, SPLIT_K,
                  w_scale_ptr, x_scale_ptr)


@triton.jit
def _fp8_bits_as(bits, OUT_DTYPE: tl.constexpr):
    """int8 bytes of float8_e4m3fn values as OUT_DTYPE numbers, or unchanged (the bytes) for OUT_DTYPE int8."""
    if OUT_DTYPE == tl.int8:
        return bits
    else:
        return bits.to(tl.float8e4nv, bitcast=True).to(OUT_DTYPE)


@triton.jit
def _load_quads(row_ptrs, quads, mask, VALUE_DTYPE: tl.constexpr):
    """Quads (four consecutive values) ``quads`` of the rows at ``row_ptrs``, in a tensor seen as ``quad_words``:
    one int32 word per quad for FP8, one int64 word for 16-bit values, two int64 words for fp32 (lo, hi;
    otherwise ``hi`` is ``lo``). One contiguous load per quad instead of four."""
    if VALUE_DTYPE == tl.float32:
        lo = tl.load(row_ptrs + 2 * quads, mask=mask, other=0)
        hi = tl.load(row_ptrs + 2 * quads + 1, mask=mask, other=0)
    else:
        lo = tl.load(row_ptrs + quads, mask=mask, other=0)
        hi = lo
    return lo, hi


@triton.jit
def _unpack_quad(lo, hi, VALUE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The four values of a quad (``_load_quads``) in memory order, as OUT_DTYPE; FP8 values with OUT_DTYPE
    int8 stay their bytes (``_fp8_bits_as``)."""
    if VALUE_DTYPE == tl.float8e4nv:
        return (_fp8_bits_as(lo.to(tl.int8), OUT_DTYPE), _fp8_bits_as((lo >> 8).to(tl.int8), OUT_DTYPE),
                _fp8_bits_as((lo >> 16).to(tl.int8), OUT_DTYPE), _fp8_bits_as((lo >> 24).to(tl.int8), OUT_DTYPE))
    elif VALUE_DTYPE == tl.float32:
        return (lo.to(tl.int32).to(tl.float32, bitcast=True).to(OUT_DTYPE),
                (lo >> 32).to(tl.int32).to(tl.float32, bitcast=True).to(OUT_DTYPE),
                hi.to(tl.int32).to(tl.float32, bitcast=True).to(OUT_DTYPE),
                (hi >> 32).to(tl.int32).to(tl.float32, bitcast=True).to(OUT_DTYPE))
    else:
        return (lo.to(tl.int16).to(VALUE_DTYPE, bitcast=True).to(OUT_DTYPE),
                (lo >> 16).to(tl.int16).to(VALUE_DTYPE, bitcast=True).to(OUT_DTYPE),
                (lo >> 32).to(tl.int16).to(VALUE_DTYPE, bitcast=True).to(OUT_DTYPE),
                (lo >> 48).to(tl.int16).to(VALUE_DTYPE, bitcast=True).to(OUT_DTYPE))


@triton.jit
def _load_pair_words(pair_rows, meta_rows, pp, mask, VALUE_DTYPE: tl.constexpr):
    """The raw words of a tile of 2:4 group *pairs* (groups 2p and 2p+1) of the rows of W that start at the
    pointers ``pair_rows`` (sparse_weight as ``quad_words``) and ``meta_rows`` (sparse_meta), shaped to
    broadcast against the pair indices ``pp`` (e.g. [BLOCK_N, 1] and [1, BLOCK_P]): (lo, hi, byte).

    A pair's four values are one quad (``_load_quads``), its two index nibbles one metadata byte. Every load
    is contiguous along the row and nothing is read twice. Split from ``_decode_pairs`` so a loop can load
    its next step before it decodes this one."""
    byte = tl.load(meta_rows + pp, mask=mask, other=0x44).to(tl.int32)
    lo, hi = _load_quads(pair_rows, pp, mask, VALUE_DTYPE)
    return lo, hi, byte


@triton.jit
def _decode_pairs(lo, hi, byte, VALUE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The first and second kept values and the two positions of group 2p, then of group 2p + 1, from
    ``_load_pair_words``; the values as ``OUT_DTYPE`` (``_unpack_quad``)."""
    a0, a1, b0, b1 = _unpack_quad(lo, hi, VALUE_DTYPE, OUT_DTYPE)
    return a0, a1, byte & 0x3, (byte >> 2) & 0x3, b0, b1, (byte >> 4) & 0x3, (byte >> 6) & 0x3


@triton.jit
def _pick_2_4(x0, x1, x2, x3, first, second, i0, i1):
    """first * x[i0] + second * x[i1] for one group per column, its four activations ``x0..x3`` given as
    [BLOCK_M, 1, columns] fp32 tiles against [1, BLOCK_N, columns] weights. The first index is 0..2 and the
    second 1..3, so each activation is picked with two selects."""
    x_first = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
    x_second = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
    return first * x_first + second * x_second


@triton.jit
def _expand_group(first, second, i0, i1):
    """The four positions of one 2:4 group per element (the first index is 0..2, the second 1..3)."""
    zero = tl.zeros_like(first)
    return (tl.where(i0 == 0, first, zero), tl.where(i0 == 1, first, tl.where(i1 == 1, second, zero)),
            tl.where(i0 == 2, first, tl.where(i1 == 2, second, zero)), tl.where(i1 == 3, second, zero))


@triton.jit
def _expand_pairs(a0, a1, ai0, ai1, b0, b1, bi0, bi1):
    """A [BLOCK_N, BLOCK_P] tile of group pairs as the dense [BLOCK_N, 8 * BLOCK_P] tile, zeros at the pruned
    positions: column 8p + q holds position q of pair p (groups 2p, then 2p + 1)."""
    w0, w1, w2, w3 = _expand_group(a0, a1, ai0, ai1)
    w4, w5, w6, w7 = _expand_group(b0, b1, bi0, bi1)
    return _interleave_pairs(w0, w1, w2, w3, w4, w5, w6, w7)


@triton.jit
def _interleave_pairs(w0, w1, w2, w3, w4, w5, w6, w7):
    """Eight [BLOCK_N, BLOCK_P] tiles, position q of every pair in ``wq``, as the [BLOCK_N, 8 * BLOCK_P] tile
    whose column 8p + q holds position q of pair p."""
    # join(join(join(w0, w4), join(w2, w6)), join(join(w1, w5), join(w3, w7)))[n, p, i, j, l] is position
    # 4i + 2j + l, so the row-major reshape puts the eight positions of each pair in order.
    tile = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    return tl.reshape(tile, (w0.shape[0], 8 * w0.shape[1]))


# A pair of 2:4 groups of 16-bit values (one ``quad_words`` word, one metadata byte) -> its eight positions,
# as four 32-bit registers (the MMA operand's bf16x2 / f16x2 pairs) built with byte permutes: a position's
# two bytes come from the group's first kept value (selector 0x10), its second (0x32) or zero (0x44, a byte
# of the zero operand). The selector of a group's four positions is 0x44444444 with 0x10 swapped in at byte
# i0 and 0x32 at byte i1 (two shifts and two xors). On sm_90 this took the MMA kernel's 2:4 loop from 1024
# to 701 SASS instructions a step (docs/KERNELS.md).
# One group: its selector from the metadata byte's two indices (``shift`` takes index i to 8 * i in bits 3-4),
# then the two permutes, from the group's half of the pair word (each followed by ``convert``: FP8 values), into
# outputs ``out`` .. ``out + 3``.
_GROUP_PTX = """
{shift_i0} t0, $9, {by_i0};
and.b32 t0, t0, 0x18;
{shift_i1} t1, $9, {by_i1};
and.b32 t1, t1, 0x18;
shl.b32 t0, c0, t0;
shl.b32 t1, c1, t1;
xor.b32 s, t0, t1;
xor.b32 s, s, 0x44444444;
prmt.b32 r, {word}, 0, s;{convert}
mov.b32 {{${out0}, ${out1}}}, r;
shr.b32 s, s, 16;
prmt.b32 r, {word}, 0, s;{convert}
mov.b32 {{${out2}, ${out3}}}, r;
"""


def _pair_ptx(words: tuple[str, str], convert: str = "", before: tuple[str, str] = ("", "")) -> str:
    """Both groups of a pair: group 2p's indices in bits 0-1 and 2-3 of the metadata byte, into outputs 0-3;
    group 2p + 1's in bits 4-7, into outputs 4-7; each from its word, with ``before`` ahead of it."""
    return (before[0] + _GROUP_PTX.format(shift_i0="shl.b32", by_i0=3, shift_i1="shl.b32", by_i1=1, word=words[0],
                                          out0=0, out1=1, out2=2, out3=3, convert=convert)
            + before[1] + _GROUP_PTX.format(shift_i0="shr.b32", by_i0=1, shift_i1="shr.b32", by_i1=3,
                                            word=words[1], out0=4, out1=5, out2=6, out3=7, convert=convert))


# 16-bit values: group 2p's two values in the pair word's low half, group 2p + 1's in its high half.
_EXPAND_PAIR_PTX = tl.constexpr(
    "{\n.reg .b32 wa, wb, c0, c1, t0, t1, s, r;\nmov.b64 {wa, wb}, $8;\nmov.b32 c0, 0x54;\nmov.b32 c1, 0x76;"
    + _pair_ptx(("wa", "wb")) + "}")

# The same for FP8 values (W8A16): the pair's four e4m3 bytes are one 32-bit word, and each permute puts a
# kept byte in the high byte of its 16-bit position (selector 0x04 / 0x14 for group 2p's first / second
# value, 0x24 / 0x34 for group 2p + 1's), zeros elsewhere. Sign, exponent and mantissa then move into
# place with a shift and two masks (bf16: the 7 bits right by 4; fp16: right by 1), which reads the e4m3
# bits as a number 2^-120 (bf16) or 2^-8 (fp16) times the value, subnormals included; one packed multiply
# by 2^120 or 2^8 (exact: a power of two) gives the value. Adding -0 keeps a kept -0 negative.
_FP8_CONVERT_PTX = """
shr.b32 t0, r, {shift};
and.b32 t0, t0, {bits};
and.b32 r, r, 0x80008000;
or.b32 r, r, t0;
fma.rn.{dtype}x2 r, r, {power}, {negative_zero};"""


def _fp8_expand_pair_ptx(shift: int, bits: int, dtype: str, power: int) -> str:
    """The FP8 pair expansion for one output type: its shift and exponent-mantissa mask, PTX type, 2^bias."""
    convert = _FP8_CONVERT_PTX.format(shift=shift, bits=hex(bits), dtype=dtype, power="k", negative_zero="z")
    return ("{\n.reg .b32 c0, c1, t0, t1, s, r, k, z;\n" + f"mov.b32 k, {hex(power)};\nmov.b32 z, 0x80008000;"
            + _pair_ptx(("$8", "$8"), convert, ("\nmov.b32 c0, 0x40;\nmov.b32 c1, 0x50;",
                                                 "mov.b32 c0, 0x60;\nmov.b32 c1, 0x70;"))
            + "}")


# 2^120 as bf16x2, 2^8 as f16x2.
_EXPAND_FP8_PAIR_PTX_BF16 = tl.constexpr(_fp8_expand_pair_ptx(4, 0x07F007F0, "bf16", 0x7B807B80))
_EXPAND_FP8_PAIR_PTX_F16 = tl.constexpr(_fp8_expand_pair_ptx(1, 0x3F803F80, "f16", 0x5C005C00))


@triton.jit
def _expand_pairs_by_permutes(lo, byte, OUT_DTYPE: tl.constexpr, FP8: tl.constexpr = False):
    """``_expand_pairs`` straight from the raw words of ``_load_pair_words`` with the byte permutes above:
    16-bit values (``lo`` int64), or with ``FP8`` e4m3 values converted to OUT_DTYPE, bf16 or fp16 (``lo``
    int32, four bytes); ``byte`` int32. NVIDIA GPUs only (inline PTX; the CPU interpreter and other values
    take ``_decode_pairs`` + ``_expand_pairs``)."""
    if not FP8:
        w = tl.inline_asm_elementwise(_EXPAND_PAIR_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,l,r", [lo, byte],
                                      dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    elif OUT_DTYPE == tl.bfloat16:
        w = tl.inline_asm_elementwise(_EXPAND_FP8_PAIR_PTX_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [lo, byte],
                                      dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    else:
        w = tl.inline_asm_elementwise(_EXPAND_FP8_PAIR_PTX_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [lo, byte],
                                      dtype=(tl.int16,) * 8, is_pure=True, pack=1)
    return _interleave_pairs(w[0].to(OUT_DTYPE, bitcast=True), w[1].to(OUT_DTYPE, bitcast=True),
                             w[2].to(OUT_DTYPE, bitcast=True), w[3].to(OUT_DTYPE, bitcast=True),
                             w[4].to(OUT_DTYPE, bitcast=True), w[5].to(OUT_DTYPE, bitcast=True),
                             w[6].to(OUT_DTYPE, bitcast=True), w[7].to(OUT_DTYPE, bitcast=True))


@triton.jit
def _gemv_x_words(x_rows, quads, mask, weights, X_DTYPE: tl.constexpr):
    """The activation words of each input quad ``quads`` (channels 4q .. 4q + 3; ``_load_quads``) laid out like
    ``weights`` (the step's weight words): one 8-byte load per quad instead of four 2-byte ones. The ``where``
    is always true; it makes the compiler move each loaded word into the weights' register layout once,
    instead of each of the four values unpacked from it (through shared memory each time: 2-7% of the gemv's
    time at M = 1)."""
    lo, hi = _load_quads(x_rows, quads, mask, X_DTYPE)
    in_weights_layout = (weights | 1) != 0
    return tl.where(in_weights_layout, lo, 0), tl.where(in_weights_layout, hi, 0)


@triton.jit
def _gemv_x_quads(x_rows, quads, mask, weights, X_DTYPE: tl.constexpr):
    """The four activations of each input quad as fp32 tiles shaped and laid out like ``weights``
    (``_gemv_x_words``)."""
    lo, hi = _gemv_x_words(x_rows, quads, mask, weights, X_DTYPE)
    return _unpack_quad(lo, hi, X_DTYPE, tl.float32)


# The gemv's FMAs in inline PTX (NVIDIA GPUs), for bf16 or fp16 activations against values of their own dtype
# or FP8 (e4m3) values. From Triton's own code the loops took 8.1 SASS instructions a dense value and 16.6 a
# kept 2:4 value, mostly unpacking words and selecting activations; with this PTX (and the loads vectorised,
# ``_spense_gemv_kernel``) 5.4 and 9.3 (bf16, 4 x 512 x 256 tiles, compiled for sm_90 with Triton 3.9 on a CPU
# and disassembled; docs/KERNELS.md). A bf16 value becomes fp32 with one shift (low half of a word) or mask
# (high half), an fp16 value with one cvt; two e4m3 values become an f16x2 word with one cvt (sm_89+).
_TO_F32 = {"bf16": ("shl.b32 {out}, {word}, 16;", "and.b32 {out}, {word}, 0xffff0000;"),
           "f16": ("{{ .reg .b16 l, h; mov.b32 {{l, h}}, {word}; cvt.f32.f16 {out}, l; }}",
                   "{{ .reg .b16 l, h; mov.b32 {{l, h}}, {word}; cvt.f32.f16 {out}, h; }}")}


def _fma_words_ptx(w_dtype: str, x_dtype: str, w: str, x: str, acc: str) -> str:
    """``$0 = acc + w.lo * x.lo + w.hi * x.hi`` for two 32-bit words of two 16-bit values each."""
    (w_low, w_high), (x_low, x_high) = _TO_F32[w_dtype], _TO_F32[x_dtype]
    return "\n".join((w_low.format(out="f", word=w), x_low.format(out="g", word=x), f"fma.rn.f32 $0, f, g, {acc};",
                      w_high.format(out="f", word=w), x_high.format(out="g", word=x), "fma.rn.f32 $0, f, g, $0;"))


def _weight_words_ptx(value: str, words: tuple[str, str], source: str) -> tuple[str, str]:
    """PTX that puts four values (``source``: an int64 of 16-bit values, or an int32 of e4m3 bytes) into two
    32-bit words of two 16-bit values each, and the dtype of those words."""
    if value == "e4m3":
        return ("{{ .reg .b16 l, h; mov.b32 {{l, h}}, {source}; cvt.rn.f16x2.e4m3x2 {w0}, l; "
                "cvt.rn.f16x2.e4m3x2 {w1}, h; }}").format(source=source, w0=words[0], w1=words[1]), "f16"
    return f"mov.b64 {{{words[0]}, {words[1]}}}, {source};", value


def _gemv_dense_ptx(value: str, x_dtype: str) -> str:
    """One dense quad: ``$0 = $1 + <$2, $3>``, the quad's four values ``$2`` and activations ``$3`` (int64)."""
    load_w, w_dtype = _weight_words_ptx(value, ("w0", "w1"), "$2")
    return ("{\n.reg .b32 w0, w1, x0, x1, f, g;\n" + load_w + "\nmov.b64 {x0, x1}, $3;\n"
            + _fma_words_ptx(w_dtype, x_dtype, "w0", "x0", "$1") + "\n"
            + _fma_words_ptx(w_dtype, x_dtype, "w1", "x1", "$0") + "\n}")


# A pair of 2:4 groups: ``$0 = $1 +`` the four kept values (``$2``: group 2p's two, then group 2p + 1's)
# times the activations under them, picked by one byte permute a group from the group's activation quad
# (``$4``, ``$5``, int64) by the metadata byte ``$3`` (indices i0, i1 of group 2p in bits 0-1 and 2-3, of group
# 2p + 1 in bits 4-5 and 6-7). The selector takes bytes 2 * i0, 2 * i0 + 1, 2 * i1, 2 * i1 + 1 of the quad:
# 0x22 * (i0 + 256 * i1) + 0x1010.
_GEMV_PAIR_SELECTORS_PTX = """
shl.b32 t, $3, 6;
or.b32 t, t, $3;
and.b32 t, t, 0x303;
mad.lo.u32 s, t, 0x22, 0x1010;
prmt.b32 pa, xa0, xa1, s;
shr.b32 t, $3, 4;
shl.b32 s, $3, 2;
or.b32 t, t, s;
and.b32 t, t, 0x303;
mad.lo.u32 s, t, 0x22, 0x1010;
prmt.b32 pb, xb0, xb1, s;
"""


def _gemv_pair_ptx(value: str, x_dtype: str) -> str:
    """One 2:4 pair (above) for values ``value`` against activations ``x_dtype``."""
    load_w, w_dtype = _weight_words_ptx(value, ("wa", "wb"), "$2")
    return ("{\n.reg .b32 wa, wb, xa0, xa1, xb0, xb1, t, s, pa, pb, f, g;\n" + load_w
            + "\nmov.b64 {xa0, xa1}, $4;\nmov.b64 {xb0, xb1}, $5;" + _GEMV_PAIR_SELECTORS_PTX
            + _fma_words_ptx(w_dtype, x_dtype, "wa", "pa", "$1") + "\n"
            + _fma_words_ptx(w_dtype, x_dtype, "wb", "pb", "$0") + "\n}")


_GEMV_DENSE_PTX_BF16 = tl.constexpr(_gemv_dense_ptx("bf16", "bf16"))
_GEMV_DENSE_PTX_F16 = tl.constexpr(_gemv_dense_ptx("f16", "f16"))
_GEMV_DENSE_PTX_E4M3_BF16 = tl.constexpr(_gemv_dense_ptx("e4m3", "bf16"))
_GEMV_DENSE_PTX_E4M3_F16 = tl.constexpr(_gemv_dense_ptx("e4m3", "f16"))
_GEMV_PAIR_PTX_BF16 = tl.constexpr(_gemv_pair_ptx("bf16", "bf16"))
_GEMV_PAIR_PTX_F16 = tl.constexpr(_gemv_pair_ptx("f16", "f16"))
_GEMV_PAIR_PTX_E4M3_BF16 = tl.constexpr(_gemv_pair_ptx("e4m3", "bf16"))
_GEMV_PAIR_PTX_E4M3_F16 = tl.constexpr(_gemv_pair_ptx("e4m3", "f16"))


@triton.jit
def _gemv_dense_fma_ptx(acc, w, x, VALUE_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr):
    """``acc`` plus the products of dense quads ``w`` (int64 of 16-bit values, int32 of FP8 ones) and their
    activation quads ``x`` (int64)."""
    if VALUE_DTYPE == tl.float8e4nv:
        asm: tl.constexpr = _GEMV_DENSE_PTX_E4M3_BF16 if X_DTYPE == tl.bfloat16 else _GEMV_DENSE_PTX_E4M3_F16
        constraints: tl.constexpr = "=f,f,r,l"
    else:
        asm: tl.constexpr = _GEMV_DENSE_PTX_BF16 if X_DTYPE == tl.bfloat16 else _GEMV_DENSE_PTX_F16
        constraints: tl.constexpr = "=f,f,l,l"
    return tl.inline_asm_elementwise(asm, constraints, [acc, w, x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_pair_fma_ptx(acc, w, byte, xa, xb, VALUE_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr):
    """``acc`` plus the products of 2:4 pairs ``w`` (int64 of 16-bit values, int32 of FP8 ones), ``byte``
    (int32) and their groups' activation quads ``xa``, ``xb`` (int64)."""
    if VALUE_DTYPE == tl.float8e4nv:
        asm: tl.constexpr = _GEMV_PAIR_PTX_E4M3_BF16 if X_DTYPE == tl.bfloat16 else _GEMV_PAIR_PTX_E4M3_F16
        constraints: tl.constexpr = "=f,f,r,r,l,l"
    else:
        asm: tl.constexpr = _GEMV_PAIR_PTX_BF16 if X_DTYPE == tl.bfloat16 else _GEMV_PAIR_PTX_F16
        constraints: tl.constexpr = "=f,f,l,r,l,l"
    return tl.inline_asm_elementwise(asm, constraints, [acc, w, byte, xa, xb], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _gemv_dense_load(q0, dense_rows, perm_ptr, mask_n, GD, VALUE_DTYPE: tl.constexpr, BLOCK_Q: tl.constexpr,
                     GATHER_X: tl.constexpr):
    """Dense quads [q0, q0 + BLOCK_Q) of the program's rows of W (``dense_rows``: pointers to their starts in
    dense_weight as ``quad_words``, [1, BLOCK_N, 1]) and the input quad of each (a dense group is four
    consecutive channels)."""
    qq = q0 + tl.arange(0, BLOCK_Q)[None, None, :]
    lo, hi = _load_quads(dense_rows, qq, mask_n & (qq < GD), VALUE_DTYPE)
    x_quads = (tl.load(perm_ptr + 4 * qq, mask=qq < GD, other=0) >> 2) if GATHER_X else qq
    return lo, hi, x_quads


@triton.jit
def _gemv_dense_fma(acc_d, q0, lo, hi, x_quads, x_rows, mask_m, GD, VALUE_DTYPE: tl.constexpr,
                    X_DTYPE: tl.constexpr, BLOCK_Q: tl.constexpr, PTX: tl.constexpr):
    """FMAs of one dense step (``_gemv_dense_load``) into the [BLOCK_M, BLOCK_N, BLOCK_Q] tile; with ``PTX``
    by ``_gemv_dense_fma_ptx``."""
    x_mask = mask_m & (q0 + tl.arange(0, BLOCK_Q)[None, None, :] < GD)
    if PTX:
        x_lo, _ = _gemv_x_words(x_rows, x_quads, x_mask, lo, X_DTYPE)
        return _gemv_dense_fma_ptx(acc_d, lo, x_lo, VALUE_DTYPE, X_DTYPE)
    x0, x1, x2, x3 = _gemv_x_quads(x_rows, x_quads, x_mask, lo, X_DTYPE)
    w0, w1, w2, w3 = _unpack_quad(lo, hi, VALUE_DTYPE, tl.float32)
    return acc_d + (x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3)


@triton.jit
def _gemv_sparse_load(p0, word_rows, meta_rows, perm_ptr, mask_n, GD, GP, VALUE_DTYPE: tl.constexpr,
                      BLOCK_P: tl.constexpr, GATHER_X: tl.constexpr):
    """2:4 group pairs [p0, p0 + BLOCK_P) of the program's rows of W (their starts, [1, BLOCK_N, 1];
    ``_load_pair_words``) and the input quad of each pair's two groups (a 2:4 group is four consecutive input
    channels; the 2:4 channels follow the ``GD`` dense quads in ``channel_perm`` and in a permuted x)."""
    pp = p0 + tl.arange(0, BLOCK_P)[None, None, :]
    lo, hi, byte = _load_pair_words(word_rows, meta_rows, pp, mask_n & (pp < GP), VALUE_DTYPE)
    if GATHER_X:
        quad_a = tl.load(perm_ptr + 4 * GD + 8 * pp, mask=pp < GP, other=0) >> 2
        quad_b = tl.load(perm_ptr + 4 * GD + 8 * pp + 4, mask=pp < GP, other=0) >> 2
    else:
        quad_a = GD + 2 * pp
        quad_b = quad_a + 1
    return lo, hi, byte, quad_a, quad_b


@triton.jit
def _gemv_sparse_fma(acc_s, p0, lo, hi, byte, quad_a, quad_b, x_rows, mask_m, GP, VALUE_DTYPE: tl.constexpr,
                     X_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, PTX: tl.constexpr):
    """FMAs of one 2:4 step (``_gemv_sparse_load``) into the [BLOCK_M, BLOCK_N, BLOCK_P] tile; with ``PTX``
    by ``_gemv_pair_fma_ptx``."""
    x_mask = mask_m & (p0 + tl.arange(0, BLOCK_P)[None, None, :] < GP)
    if PTX:
        xa, _ = _gemv_x_words(x_rows, quad_a, x_mask, lo, X_DTYPE)
        xb, _ = _gemv_x_words(x_rows, quad_b, x_mask, lo, X_DTYPE)
        return _gemv_pair_fma_ptx(acc_s, lo, byte, xa, xb, VALUE_DTYPE, X_DTYPE)
    a0, a1, ai0, ai1, b0, b1, bi0, bi1 = _decode_pairs(lo, hi, byte, VALUE_DTYPE, tl.float32)
    xa0, xa1, xa2, xa3 = _gemv_x_quads(x_rows, quad_a, x_mask, lo, X_DTYPE)
    xb0, xb1, xb2, xb3 = _gemv_x_quads(x_rows, quad_b, x_mask, lo, X_DTYPE)
    return acc_s + (_pick_2_4(xa0, xa1, xa2, xa3, a0, a1, ai0, ai1) + _pick_2_4(xb0, xb1, xb2, xb3, b0, b1, bi0, bi1))


@triton.jit
def _spense_gemv_kernel(
    x_ptr, dense_w_ptr, sparse_w_ptr, meta_ptr, bias_ptr, out_ptr,
    M, N, GD, GP,
    stride_xm, stride_dwn, stride_swn, stride_metan, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_G: tl.constexpr,
    VALUE_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, perm_ptr=None, GATHER_X: tl.constexpr = False,
    w_scale_ptr=None, DENSE_ALIGN: tl.constexpr = 16, WORDS_ALIGN: tl.constexpr = 16, META_ALIGN: tl.constexpr = 16,
    AFTER_PREVIOUS: tl.constexpr = False, BYTE_PERMUTES: tl.constexpr = False,
):
    """Decode (M <= BLOCK_M, a few rows): CUDA-core FMAs, no MMA and so no register-layout conversions.

    All M rows live in one program; partial products stay in [BLOCK_M, BLOCK_N, quads] fp32 tiles that are
    reduced once at the end. Every tensor is read as ``quad_words`` (``_load_quads``), one load per four
    values: ``x_ptr`` (x or its permuted copy), ``dense_w_ptr`` (dense_weight: one quad per dense group)
    and ``sparse_w_ptr`` (sparse_weight: one quad per pair of 2:4 groups, ``_load_pair_words``); the strides
    count words. ``VALUE_DTYPE`` / ``X_DTYPE`` say what the words hold. FP8 values are converted to fp32 as
    loaded (W8A16) and scaled once at the store. With ``GATHER_X`` the kernel reads ``x`` in its own channel
    order through ``perm_ptr`` (channel_perm; a group's four channels are one quad of x) instead of a
    permuted copy. The ``*_ALIGN`` are the row-stride hints of ``_spense_gemm_kernel``. ``GD`` / ``GP`` are
    the dense quads and 2:4 pairs of a row, passed rather than derived in the kernel so that Triton
    specialises them on divisibility by 16: the column masks are then constant over a thread's words and the
    weight loads become 16-byte (metadata 4-byte) vector loads. With ``BYTE_PERMUTES`` (NVIDIA GPUs) the FMAs
    of bf16 / fp16 activations against values of their dtype or FP8 values are inline PTX, the 2:4
    activations picked by byte permutes (``_gemv_pair_fma_ptx``).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Every tile is [BLOCK_M, BLOCK_N, columns] (x: [BLOCK_M, 1, columns], W: [1, BLOCK_N, columns]) from its
    # load on, so loads and FMAs share one register layout: with 2-D weight tiles against the 3-D partial
    # products, the compiler moved every step's weights through shared memory to change layout.
    dense_rows = dense_w_ptr + tl.multiple_of(offs_n * stride_dwn, DENSE_ALIGN)[None, :, None]
    word_rows = sparse_w_ptr + tl.multiple_of(offs_n * stride_swn, WORDS_ALIGN)[None, :, None]
    meta_rows = meta_ptr + tl.multiple_of(offs_n * stride_metan, META_ALIGN)[None, :, None]
    mask_n3 = mask_n[None, :, None]
    mask_m3 = mask_m[:, None, None]
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    BLOCK_Q: tl.constexpr = BLOCK_KD // 4
    BLOCK_P: tl.constexpr = BLOCK_G // 2
    PTX: tl.constexpr = BYTE_PERMUTES and (X_DTYPE == tl.bfloat16 or X_DTYPE == tl.float16) and (
        VALUE_DTYPE == X_DTYPE or VALUE_DTYPE == tl.float8e4nv)
    # Each step's weights are loaded at the end of the step before: as plain loads into registers, which
    # measured faster than the loads inside the step, which Triton's pipeliner stages through shared memory.
    step = SPLIT_K * BLOCK_Q
    # The first 2:4 step's loads are issued before the dense loop too, so they travel while it runs.
    lo_2_4, hi_2_4, byte, quad_a, quad_b = _gemv_sparse_load(pid_k * BLOCK_P, word_rows, meta_rows, perm_ptr,
                                                             mask_n3, GD, GP, VALUE_DTYPE, BLOCK_P, GATHER_X)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_Q), dtype=tl.float32)
    lo, hi, x_quads = _gemv_dense_load(pid_k * BLOCK_Q, dense_rows, perm_ptr, mask_n3, GD, VALUE_DTYPE, BLOCK_Q,
                                       GATHER_X)
    if AFTER_PREVIOUS:  # launched early: the first weights are on their way while the previous kernel ends
        tl.extra.cuda.gdc_wait()
    for q0 in range(pid_k * BLOCK_Q, GD, step):
        acc_d = _gemv_dense_fma(acc_d, q0, lo, hi, x_quads, x_rows, mask_m3, GD, VALUE_DTYPE, X_DTYPE, BLOCK_Q, PTX)
        lo, hi, x_quads = _gemv_dense_load(q0 + step, dense_rows, perm_ptr, mask_n3, GD, VALUE_DTYPE, BLOCK_Q,
                                           GATHER_X)
    step = SPLIT_K * BLOCK_P
    acc_s = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_P), dtype=tl.float32)
    lo, hi = lo_2_4, hi_2_4
    for p0 in range(pid_k * BLOCK_P, GP, step):
        acc_s = _gemv_sparse_fma(acc_s, p0, lo, hi, byte, quad_a, quad_b, x_rows, mask_m3, GP, VALUE_DTYPE, X_DTYPE,
                                 BLOCK_P, PTX)
        lo, hi, byte, quad_a, quad_b = _gemv_sparse_load(p0 + step, word_rows, meta_rows, perm_ptr, mask_n3, GD, GP,
                                                         VALUE_DTYPE, BLOCK_P, GATHER_X)
    acc = tl.sum(acc_d, axis=2) + tl.sum(acc_s, axis=2)
    _store_output(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_om, HAS_BIAS, SPLIT_K,
                  w_scale_ptr)


@triton.jit
def _group_positions_kernel(perm_ptr, pos_ptr, G, BLOCK: tl.constexpr):
    """The inverse of the group order of ``channel_perm``: ``pos[g]`` = the place of x's group g (channels
    4g .. 4g + 3) among the packed groups (the dense ones, then the 2:4 ones)."""
    places = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = places < G
    tl.store(pos_ptr + (tl.load(perm_ptr + 4 * places, mask=mask, other=0) >> 2), places, mask=mask)


@triton.jit
def _spense_expand_kernel(
    dense_w_ptr, sparse_w_ptr, meta_ptr, pos_ptr, w_scale_ptr, out_ptr,
    N, KD, GS,
    stride_dwn, stride_swn, stride_metan, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, VALUE_DTYPE: tl.constexpr,
):
    """All of W as a dense matrix in x's own channel order, zeros at the pruned positions, for the prefill
    path: cuBLAS then multiplies x as it comes, with no permuted copy of x and one GEMM.

    Programs walk x's groups and write contiguous tiles; each group's values are read from its place in
    the packed order (``pos_ptr``, ``_group_positions_kernel``). Both regions keep their groups in ascending
    channel order, so a tile's reads stay close together. (Walking the packed order and scattering the
    writes instead, 2 bytes a store, made the prefill path 1.3-6x slower.) FP8 values travel as int8 bytes:
    they are written as FP8 bytes (for ``torch._scaled_mm``) or, with ``w_scale_ptr``, dequantized.
    """
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    G = KD // 4 + GS
    gg = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)  # x's groups
    cols = pid_g * 4 * BLOCK_G + tl.arange(0, 4 * BLOCK_G)  # x's channels
    sg = tl.load(pos_ptr + gg, mask=gg < G, other=0) - KD // 4  # 2:4 group index (negative: dense)
    in_2_4 = (gg < G) & (sg >= 0)
    first, second, i0, i1 = _load_2_4_tile(sparse_w_ptr, meta_ptr, offs_n, tl.maximum(sg, 0),
                                           mask_n[:, None] & in_2_4[None, :], stride_swn, stride_metan, VALUE_DTYPE)
    w0, w1, w2, w3 = _expand_group(first, second, i0, i1)
    # join(join(w0, w2), join(w1, w3))[n, g, a, b] holds position 2a + b: reshaped, positions 0..3 in order.
    tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_N, 4 * BLOCK_G))
    in_w = cols < 4 * G
    dense_cols = 4 * tl.load(pos_ptr + cols // 4, mask=in_w, other=0) + cols % 4  # dense where < KD
    in_dense = in_w & (dense_cols < KD)
    dense = tl.load(dense_w_ptr + offs_n[:, None] * stride_dwn + dense_cols[None, :],
                    mask=mask_n[:, None] & in_dense[None, :], other=0)
    tile = tl.where(in_dense[None, :], dense, tile)
    if w_scale_ptr is not None:  # FP8 bytes -> dequantized values
        tile = tile.to(tl.float8e4nv, bitcast=True).to(tl.float32) * tl.load(
            w_scale_ptr + offs_n, mask=mask_n, other=1.0)[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + cols[None, :], tile.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & in_w[None, :])


@triton.jit
def _round_to_e4m3(v):
    """fp32 values in [-448, 448] rounded to nearest-even on the float8_e4m3fn grid, still fp32 (so the cast
    after is exact). Done by hand because Triton's CPU interpreter drops the carry when rounding overflows
    the mantissa (126.1 -> 64 instead of 128); the GPU's own conversion rounds the same way as this."""
    exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # e4m3: normal down to 2^-6
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even
    return ((v / ulp + magic) - magic) * ulp


@triton.jit
def _permute_quads_kernel(x_ptr, perm_ptr, out_ptr, Q, stride_xm, stride_om, WORDS: tl.constexpr,
                          BLOCK_Q: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = False):
    """``x[:, channel_perm]`` a quad at a time (four channels, ``quad_words``; WORDS words a quad): the
    permutation moves whole 4-channel groups, so quad j of the output is quad ``channel_perm[4 j] / 4`` of
    x. One 8-byte load per quad instead of torch's gather of single elements. ``LAUNCH_DEPENDENTS`` lets the
    MMA kernel after it start at once (it waits for this kernel's writes before reading them)."""
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    qq = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = qq < Q
    source = tl.load(perm_ptr + 4 * qq, mask=mask, other=0) >> 2
    for word in tl.static_range(WORDS):
        quads = tl.load(x_ptr + row * stride_xm + source * WORDS + word, mask=mask)
        tl.store(out_ptr + row * stride_om + qq * WORDS + word, quads, mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, perm_ptr, out_ptr, scale_ptr, K, stride_xm, stride_om, BLOCK_K: tl.constexpr):
    """One row of x per program, read through ``channel_perm`` (or in its own order, ``perm_ptr`` None): its
    scale (largest magnitude / 448, as ``format.fp8_scales``) and its values over that scale, rounded to
    float8_e4m3fn (W8A8)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        cols = tl.load(perm_ptr + kk, mask=kk < K, other=0) if perm_ptr is not None else kk
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_xm + cols, mask=kk < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1.1754943508222875e-38)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        cols = tl.load(perm_ptr + kk, mask=kk < K, other=0) if perm_ptr is not None else kk
        x = tl.load(x_ptr + row * stride_xm + cols, mask=kk < K, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + kk, _round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0)).to(tl.float8e4nv),
                 mask=kk < K)


@dataclasses.dataclass(frozen=True)
class SpenseGemmWeight:
    """The packed tensors plus the channel map, which ``process_weights_after_loading`` builds once per
    weight; the custom op wraps them in this object on every call, so it holds nothing derived by a GPU op.

    ``channel_perm [K]`` lists the dense channels, then the 2:4 channels: ``x[:, channel_perm]`` is the
    activation layout the fused kernel reads with plain contiguous loads. FP8 checkpoints add
    ``weight_scale [N]`` float32 (values are float8_e4m3fn). ``sparse_compressed``, where set, is the 2:4
    region in cuSPARSELt's form, which ``sparse_weight`` is a view into (``with_sparse_cores``).
    """

    dense_weight: torch.Tensor
    sparse_weight: torch.Tensor
    sparse_meta: torch.Tensor
    channel_perm: torch.Tensor
    n: int
    k: int
    weight_scale: torch.Tensor | None = None
    sparse_compressed: torch.Tensor | None = None  # the 2:4 region for cuSPARSELt (``with_sparse_cores``)

    @property
    def kd(self) -> int:
        """The dense region's width: how many of ``channel_perm``'s channels come first as dense columns."""
        return self.dense_weight.shape[1]

    @property
    def ks(self) -> int:
        """The 2:4 region's width in input channels (four per 2:4 group), the rest of ``channel_perm``."""
        return self.k - self.kd

    @property
    def dense_channels(self) -> torch.Tensor:
        return self.channel_perm.narrow(0, 0, self.kd)

    @property
    def sparse_channels(self) -> torch.Tensor:
        return self.channel_perm.narrow(0, self.kd, self.ks)

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale is not None

    @property
    def group_words(self) -> torch.Tensor:
        """sparse_weight as one word per 2:4 group (its two values): int16 for FP8, int32 for 16-bit values,
        int64 for fp32: what the expansion kernel loads."""
        size = self.sparse_weight.element_size()
        return self.sparse_weight.view({1: torch.int16, 2: torch.int32, 4: torch.int64}[size])

    @classmethod
    def from_packed(cls, packed: PackedSpenseWeight) -> "SpenseGemmWeight":
        dense_ch, sparse_ch = group_channels(packed.dense_mask)
        return cls.from_channel_perm(packed.dense_weight, packed.sparse_weight, packed.sparse_meta,
                                     torch.cat((dense_ch, sparse_ch)).to(torch.int32), packed.weight_scale)

    @classmethod
    def from_channel_perm(cls, dense_weight: torch.Tensor, sparse_weight: torch.Tensor, sparse_meta: torch.Tensor,
                          channel_perm: torch.Tensor, weight_scale: torch.Tensor | None = None,
                          sparse_compressed: torch.Tensor | None = None) -> "SpenseGemmWeight":
        """From the packed tensors and ``channel_perm`` (int32): what the custom op receives."""
        return cls(dense_weight.contiguous(), sparse_weight.contiguous(), sparse_meta.contiguous(), channel_perm,
                   dense_weight.shape[0], channel_perm.numel(), weight_scale, sparse_compressed)

    def with_sparse_cores(self) -> "SpenseGemmWeight":
        """This weight with its 2:4 region also in cuSPARSELt's compressed form, for the path on the GPU's
        sparse tensor cores (``_on_sparse_cores``, from ``SPARSE_CORES_MIN_M`` rows). ``sparse_weight``
        becomes a view into that buffer, so the only memory added is cuSPARSELt's copy of the positions
        (``cusparselt.compress``). Unchanged where cuSPARSELt cannot take the weight: no sparse tensor cores,
        FP8 or fp32 values, a shape it refuses, or a compressed operand that fails ``cusparselt.compress``'s
        check."""
        kd, ks = self.kd, self.ks
        if (self.sparse_compressed is not None or ks == 0 or self.n % 16 or ks % 64 or kd % 8
                or not cusparselt.available(self.sparse_weight.device, self.sparse_weight.dtype)):
            return self
        compressed = cusparselt.compress(self.sparse_weight, self.sparse_meta, self.k)
        if compressed is None:
            return self
        values, meta = compressed[0][:self.sparse_weight.numel()].view(self.sparse_weight.shape), compressed[1]
        return dataclasses.replace(self, sparse_weight=values, sparse_meta=meta, sparse_compressed=compressed[0])


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
    gather_x: bool = False  # gemv only: read x through channel_perm in the kernel instead of a permuted copy
    pad_rows: bool = True  # mma only: pad the permuted x to whole BLOCK_M-row tiles, read without row masks
    quantize_x: bool = False  # FP8 weights, mma/unpack only: x quantized per row to FP8 too (W8A8), not W8A16
    swap_ab: bool = False  # mma only: multiply W @ x^T (W's rows on the MMA's wide side) and store transposed
    # sparse_cores only: both regions at once on two streams up to OVERLAP_MAX_ROWS rows (None: OVERLAP_REGIONS)
    overlap_regions: bool | None = None


# Decode, one row: the CUDA-core kernel, x read through channel_perm in the kernel (no permuted copy); tiles
# by ``gemv_tiles``. This one (4 rows x (512 dense columns, 256 2:4 groups) a step) is the one for weights with
# many rows.
DECODE_GEMV = KernelConfig(1, 4, 512, 256, 1, 4, 3, "gemv", gather_x=True)
# Batched decode: the fused MMA kernel up to MMA_MAX_M rows (up to SPARSE_CORES_MIN_M - 1 for weights
# with_sparse_cores), tiles by ``mma_tiles`` (``fp8_mma_tiles`` for FP8 values). Beyond, W expanded +
# cuBLAS won at 512 rows on the 32B/TP4 shards and at 1024 on every shape; the 8B shapes still lost 5-40% to
# the MMA kernel at 512: sweep_mid_m2_h200.json, sweep_mid_m_tp4_h200.json.
MMA_MAX_M = 256
BATCHED_DECODE_MMA = KernelConfig(16, 32, 256, 128, 1, 4, 3)
# Prefill: all of W expanded in x's channel order in block_n x block_g-group tiles, then one cuBLAS GEMM.
UNPACK_AND_CUBLAS = KernelConfig(0, 32, 0, 64, 1, 4, 1, "unpack")
# FP8 prefill: x quantized per row, all of W expanded to FP8 bytes, torch._scaled_mm (cuBLASLt FP8), which
# needs N and K in multiples of 16; other shapes dequantize W and use cuBLAS in x's dtype (UNPACK_AND_CUBLAS).
FP8_PREFILL = dataclasses.replace(UNPACK_AND_CUBLAS, quantize_x=True)
# Prefill and batched decode (from SPARSE_CORES_MIN_M rows) on the sparse tensor cores, for weights
# ``with_sparse_cores``: x permuted once, the dense region by cuBLAS, the 2:4 region by cuSPARSELt added onto
# it (``_on_sparse_cores``).
CUBLAS_AND_CUSPARSELT = KernelConfig(0, 0, 0, 0, 1, 4, 1, "sparse_cores")
# From this many rows, weights with_sparse_cores take that path instead of the MMA kernel: with each plan's
# algorithm searched at its own row count (cusparselt.SEARCH_OWN_ROWS_MAX) it took 0.68-0.98x the MMA
# kernel's time on six of the eight bench_gemm shapes at 96-128 rows (8B down 1.05x, 32B/TP4 o 1.03x) and
# 0.57-0.92x on all eight at 192-256; at 64 rows it lost on six (H200, crossover_sparse_cores_h200.json).
# 65 is where mma_tiles moves to 128-row tiles: the 8B shapes summed 0.94x at 72-88 rows, 1.21x at 64
# (crossover_sparse_cores_65_95_h200.json).
SPARSE_CORES_MIN_M = 65
# cuSPARSELt plans are per row count: rows are padded to a multiple of this, so a server builds at most
# max_num_batched_tokens / 128 plans per weight shape (a few ms of host time each, once).
SPARSE_CORES_ROW_STEP = 128
# Opt-in (``SPENSE_OVERLAP_REGIONS=1`` in the environment, read at import): up to OVERLAP_MAX_ROWS (padded)
# rows the sparse_cores path runs the dense region's cuBLAS GEMM on a second stream beside cuSPARSELt's 2:4
# product and adds the two (``_beside``), since at batched-decode sizes neither GEMM fills the GPU. On an H200
# that took the 8B shapes' time to 0.88x at 128 rows and 0.93x at 256 (a wash at 384-512) and decode in the
# harness +4-5% at batch 96-128, but under vLLM it gave +4% at batch 128, within the runs' spread, and its
# servers' 2048-token prefill ran 0.70x and 0.78x dense (cause not found), so it stays off by default
# (docs/KERNELS.md, "Batched decode on the sparse tensor cores"; docs/PERFORMANCE.md, v13).
OVERLAP_REGIONS = os.environ.get("SPENSE_OVERLAP_REGIONS", "0") == "1"
OVERLAP_MAX_ROWS = 256
# vLLM's largest CUDA-graph batch by default: the sizes up to it get their cuSPARSELt plans at warm-up.
CAPTURED_MAX_M = 512
# The permutation of x before cuSPARSELt: 8 warps a row (1024 quads a program) ran 2-17% faster than 4 on the
# 8B o and down inputs at 2048 and 4096 rows on an H200, near a plain copy of x's bytes
# (bench_cusparselt.py --permute, bench_cusparselt_permute_h200.json).
PREFILL_PERMUTE_WARPS = 8


def mma_tiles(m: int, n: int, k: int) -> KernelConfig:
    """The MMA kernel's tiles for ``m`` rows of x against a 16-bit ``[n, k]`` weight: rules fitted to sweeps of
    bench_gemm.py's Qwen3 shapes on an H200.

    Up to 32 rows (the best of 18 configs per shape at M = 8, sweep_mma_shapes_h200.json; 17-32 rows from
    sweep_mid_m_h200.json): 16-row tiles of x, K split four ways when it is long (8B down: 128 output tiles
    of 32 columns, each walking 12288 channels; up to 16 rows only, it cost 7% at 64), 64-column tiles for
    very wide weights (8B gate_up), the longer steps only for few output tiles and no split; at 17-32 rows
    wide weights take 32-row tiles. Beyond 48 rows, and beyond 32 for the gate_up shapes (n >= 12288; at
    33-48 rows the others lost up to 26% against 16-row tiles, ab_mid_m_h200_v2.json): swapped operands,
    each expanded weight tile serving up to 256 rows of x (128 where 256-row tiles would leave fewer than 80
    programs), and K split in two or four when the grid has 64 programs or fewer (the H200 has 132 SMs).
    That rule is 4.7% off the best of 29-69 configs per shape and M (geometric mean over M = 48-256;
    sweep_mid_m_h200.json, sweep_mid_m2_h200.json, and sweep_mid_m_tp4_h200.json for the 32B/TP4 shards)."""
    if m > 48 or (m > 32 and n >= 12288):
        block_n = 64
        n_tiles = _cdiv(n, block_n)
        block_m = 256 if m > 128 and n_tiles * _cdiv(m, 256) >= 80 else min(128, _next_power_of_2(m))
        programs = n_tiles * _cdiv(m, block_m)
        split_k = 1 if programs > 64 else 2 if programs > 32 else 4
        return KernelConfig(block_m, block_n, 64, 32, split_k, 8 if block_m == 256 or split_k > 1 else 4, 3,
                            swap_ab=True)
    wide = 16 < m <= 32 and n > 4096
    split_k = 4 if k >= 6144 and m <= 16 else 1
    block_n = 64 if n >= 16384 or wide else 32
    block_kd, block_g = (256, 128) if split_k == 1 and n <= 4096 else (128, 64)
    return dataclasses.replace(BATCHED_DECODE_MMA, block_m=32 if wide else 16, block_n=block_n, block_kd=block_kd,
                               block_g=block_g, split_k=split_k)


def gemv_tiles(n: int, k: int, multiprocessors: int, fp8: bool = False) -> KernelConfig:
    """The gemv's tiles (M = 1) for an ``[n, k]`` weight on a GPU of ``multiprocessors`` SMs: rules fitted to
    sweeps of 24-30 configs on bench_gemm.py's eight Qwen3 shapes on an H200 (sweep_gemv_ptx_h200.json,
    sweep_gemv_ptx_fp8_h200.json), with the gemv's FMAs in PTX.

    A program walks all of K for its rows with one step of weights in flight, so a GPU is busiest when every
    program is resident at once (one wave, no tail): 8 programs an SM at 4 rows (56-64 registers a thread),
    6 at 8 rows (80; ptxas on a CPU compile for sm_90). 16-bit values: 4 rows a program with 1024-column
    steps where n / 4 programs fit in one wave (8B o and down), 8 rows where n / 8 do (8B qkv, 32B/TP4 o
    and down), else 4 rows and 512 columns, the shortest tail (gate_up): 1.01x the best config's time
    (geometric mean over the eight shapes). FP8 values: 8 rows, 1024-column steps, 512 for K <= 2048, about
    1.05x the best."""
    if fp8:
        return dataclasses.replace(DECODE_GEMV, block_n=8, block_kd=1024 if k > 2048 else 512)
    if _cdiv(n, 4) <= 8 * multiprocessors:
        return dataclasses.replace(DECODE_GEMV, block_kd=1024)
    return dataclasses.replace(DECODE_GEMV, block_n=8) if _cdiv(n, 8) <= 6 * multiprocessors else DECODE_GEMV


# Two rows of x against a weight of at most 2^24 values (16-bit values): the gemv kernel with both rows in one
# program beats the MMA kernel, whose fixed costs (x's permutation launch, the pipeline's fill; our reading,
# not measured) weigh most on small weights: 8B o 11.4 vs 13.6 us, 32B/TP4 qkv 11.8 vs 15.0, o 8.4 vs 11.0
# (H200). On larger weights it loses (8B qkv 18.5 vs 17.6, gate_up 52 vs 41), and at three rows and more
# everywhere, since each row adds its own FMAs and activation picks (sweep_gemv_rows_*_h200.json).
GEMV_TWO_ROWS_MAX_WEIGHT = 2**24


def gemv_two_rows_tiles(k: int) -> KernelConfig:
    """The gemv's tiles for two rows of x: 8 rows of W a program, 512-column steps (256 for K < 4096, where
    a short row would leave a step's 2:4 groups half empty)."""
    columns = 512 if k >= 4096 else 256
    return dataclasses.replace(DECODE_GEMV, block_m=2, block_n=8, block_kd=columns, block_g=columns // 2)


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on host ints. Every Spense call computes a few of these before its launches, and
    ``triton.cdiv`` goes through Triton's constexpr-function wrapper (about 2 us a call on the CPU here)."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (n >= 1), on host ints, for the same reason as ``_cdiv``."""
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The device's SM count; 132 (an H100 / H200) off CUDA, where only the CPU interpreter runs the kernels."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def fp8_mma_tiles(m: int, n: int, k: int) -> KernelConfig:
    """The MMA kernel's tiles for FP8 values (W8A16): ``mma_tiles``' swapped operands (past 48 rows, 32 for
    gate_up-sized weights) and its 32-row tiles for those weights at 17-32 rows; else ``BATCHED_DECODE_MMA``,
    whose longer K steps without split suit 1-byte values (``mma_tiles``' shorter steps and split-K cost the
    8B qkv and down 16-35% at 2-16 rows, its 32-row tiles qkv 6% at 32). Against the W8A8 expansion
    path used before at 65-256 rows, the swap took 0.42-0.69x the time on the 8B shapes at 96-128 rows and
    0.83x / 0.94x summed over the four at 192 / 256 rows, where o and down alone lost up to 38% (H200,
    ab_fp8_mid_m_h200.json); with the FP8 byte permutes since, down ties that path at 256 rows and o beats it
    (ab_fp8_permutes_h200.json)."""
    tiles = mma_tiles(m, n, k)
    return tiles if tiles.swap_ab or (tiles.block_m > 16 and n >= 12288) else BATCHED_DECODE_MMA


def choose_config(m: int, n: int, k: int, device: torch.device, fp8: bool = False,
                  sparse_cores: bool = False) -> KernelConfig:
    """Kernel and tiles by M, N and K: the gemv kernel for one row (``gemv_tiles``, by the device's SM count)
    and for two against small 16-bit weights (``gemv_two_rows_tiles``); cuBLAS plus cuSPARSELt from
    ``SPARSE_CORES_MIN_M`` rows for weights with ``sparse_cores`` (``SpenseGemmWeight.with_sparse_cores``);
    else the fused MMA kernel up to ``MMA_MAX_M`` rows (``mma_tiles`` by shape, ``fp8_mma_tiles`` for FP8
    values) and W expanded + one cuBLAS GEMM beyond. FP8 weights are multiplied in x's dtype (W8A16) at
    decode and as FP8 (W8A8) at prefill where cuBLASLt takes the shape."""
    if sparse_cores and m >= SPARSE_CORES_MIN_M:
        return CUBLAS_AND_CUSPARSELT
    if m == 1:
        return gemv_tiles(n, k, multiprocessors(device), fp8)
    if m == 2 and not fp8 and n * k <= GEMV_TWO_ROWS_MAX_WEIGHT:
        return gemv_two_rows_tiles(k)
    if m <= MMA_MAX_M:
        return fp8_mma_tiles(m, n, k) if fp8 else mma_tiles(m, n, k)
    return FP8_PREFILL if fp8 and n % 16 == 0 and k % 16 == 0 else UNPACK_AND_CUBLAS


def check_inputs(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None) -> None:
    """Every shape, dtype and stride the kernels rely on, checked before launch (devices compared as
    indices: a ``.device`` is a new object each time, and this runs on every call)."""
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"spense_gemm: x must be [M, {weight.k}], found {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"spense_gemm: x dtype must be float16, bfloat16 or float32, found {x.dtype}")
    kd, gs, device = weight.kd, weight.ks // GROUP_SIZE, x.get_device()
    values = torch.float8_e4m3fn if weight.is_fp8 else x.dtype
    expected = {"dense_weight": ((weight.n, kd), values), "sparse_weight": ((weight.n, 2 * gs), values),
                "sparse_meta": ((weight.n, gs // 2), torch.uint8)}
    if weight.is_fp8:
        expected["weight_scale"] = ((weight.n,), torch.float32)
    for name, (shape, dtype) in expected.items():
        tensor = getattr(weight, name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.stride(-1) != 1:
            raise ValueError(f"spense_gemm: {name} must be {dtype} {list(shape)} with a contiguous last dimension, "
                             f"found {tensor.dtype} {list(tensor.shape)}")
        if tensor.get_device() != device:
            raise ValueError(f"spense_gemm: {name} is on {tensor.device}, x on {x.device}")
    if kd + 4 * gs != weight.k or gs % 2 or weight.channel_perm.numel() != weight.k:
        raise ValueError(f"spense_gemm: {kd} dense + {4 * gs} 2:4 channels do not make K={weight.k} "
                         f"with an even number of 2:4 groups")
    if weight.channel_perm.dtype != torch.int32 or weight.channel_perm.get_device() != device:
        raise ValueError(f"spense_gemm: channel_perm must be int32 on {x.device}, found {weight.channel_perm.dtype} "
                         f"on {weight.channel_perm.device}")
    if bias is not None and (bias.shape != (weight.n,) or bias.get_device() != device):
        raise ValueError(f"spense_gemm: bias must be [{weight.n}] on {x.device}, found {list(bias.shape)}")


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float8_e4m3fn: tl.float8e4nv}


def quad_words(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whose rows hold whole quads (four values) seen as words: one int32 per quad of 1-byte
    values, one int64 per quad of 2-byte values, two int64 for 4-byte ones: what ``_load_quads`` reads.
    For sparse_weight a quad is a pair of 2:4 groups. A tensor that does not start on an 8-byte boundary
    (a view into a larger buffer) is copied first."""
    word = torch.int32 if tensor.element_size() == 1 else torch.int64
    if tensor.numel() == 0:  # no dense region (rho = 0): its strides need not allow the view
        return torch.empty(*tensor.shape[:-1], 0, device=tensor.device, dtype=word)
    return (tensor.clone() if tensor.data_ptr() % 8 else tensor).view(word)


@functools.lru_cache(maxsize=None)
def _launches_early(device: torch.device) -> bool:
    """Whether the gemv / MMA kernel is launched with programmatic dependent launch (NVIDIA sm90+): it may
    then start while the kernel before it in the stream (vLLM's norm or activation, or our permutation)
    finishes, and waits for it (``gdc_wait``) only before reading x; every write comes after the wait."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _converts_fp8(device: torch.device) -> bool:
    """Whether the GPU converts e4m3 values in one instruction (``cvt.rn.f16x2.e4m3x2``, sm_89+), which the
    gemv's inline PTX for FP8 values uses."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _alignment(stride: int) -> int:
    """The largest power of two, up to 16, that divides ``stride`` (16 for 0: a row never read)."""
    return min(16, stride & -stride) if stride > 0 else 16


def expand_weight(weight: SpenseGemmWeight, dtype: torch.dtype, block_n: int = 32, block_g: int = 64) -> torch.Tensor:
    """All of W as a dense ``[N, K]`` temporary in x's own channel order (``_spense_expand_kernel``), never kept:
    16/32-bit values as stored (``dtype`` is theirs); FP8 values as FP8 (``dtype`` float8_e4m3fn, for
    ``torch._scaled_mm``) or dequantized to ``dtype``."""
    kd, gs = weight.kd, weight.ks // GROUP_SIZE
    out = torch.empty(weight.n, weight.k, device=weight.sparse_weight.device, dtype=dtype)
    dense = weight.dense_weight.view(torch.int8) if weight.is_fp8 else weight.dense_weight
    target = out.view(torch.int8) if dtype == torch.float8_e4m3fn else out
    scale = weight.weight_scale if weight.is_fp8 and dtype != torch.float8_e4m3fn else None
    groups = weight.k // GROUP_SIZE
    positions = torch.empty(groups, device=out.device, dtype=torch.int32)
    _group_positions_kernel[(_cdiv(groups, 1024),)](weight.channel_perm, positions, groups, BLOCK=1024)
    _spense_expand_kernel[(_cdiv(weight.n, block_n), _cdiv(groups, block_g))](
        dense, weight.group_words, weight.sparse_meta, positions, scale, target, weight.n, kd, gs,
        dense.stride(0), weight.group_words.stride(0), weight.sparse_meta.stride(0), target.stride(0),
        BLOCK_N=block_n, BLOCK_G=block_g, VALUE_DTYPE=tl.int8 if weight.is_fp8 else _TL_DTYPES[dtype])
    return out


def _row_buffer(rows: int, m: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, k]`` buffer for ``m`` rows of x padded to whole tiles: the padding rows reach only output
    rows that are never stored, so they stay unset on the GPU; elsewhere they are zeroed, since Triton's
    CPU interpreter warns about arithmetic on garbage."""
    buffer = torch.empty(rows, k, device=device, dtype=dtype)
    if rows > m and device.type != "cuda":
        buffer[m:].zero_()
    return buffer


def permute_columns(x: torch.Tensor, channel_perm: torch.Tensor, rows: int, launch_dependents: bool = False,
                    num_warps: int = 4) -> torch.Tensor:
    """``x[:, channel_perm]`` (dense channels first, then the 2:4 channels) in a buffer of ``rows >= M``
    rows (the padding rows are left unset on the GPU). One launch of ``_permute_quads_kernel``, in place
    of torch's ``index_select``, which cost about a fifth of the MMA path's time at M = 8 (docs/KERNELS.md).
    ``num_warps``: 8 for prefill-sized x (``PREFILL_PERMUTE_WARPS``)."""
    m, k = x.shape
    permuted = _row_buffer(rows, m, k, x.dtype, x.device)
    source, target = quad_words(x.contiguous()), quad_words(permuted)
    words = source.shape[1] // (k // GROUP_SIZE)
    block = min(1024, _next_power_of_2(k // GROUP_SIZE))
    _permute_quads_kernel[(m, _cdiv(k // GROUP_SIZE, block))](
        source, channel_perm, target, k // GROUP_SIZE, source.stride(0), target.stride(0), WORDS=words, BLOCK_Q=block,
        LAUNCH_DEPENDENTS=launch_dependents, num_warps=num_warps)
    return permuted


def quantize_rows_fp8(x: torch.Tensor, channel_perm: torch.Tensor | None,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[:, channel_perm]`` (``x`` itself for None) quantized per row to float8_e4m3fn, in a buffer of
    ``rows >= M`` rows (the padding rows are left unset), and the per-row scales ``[rows]`` float32."""
    m, k = x.shape
    quantized = _row_buffer(rows, m, k, torch.float8_e4m3fn, x.device)
    scale = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows > m:
        scale[m:] = 1.0
    _quantize_rows_kernel[(m,)](x, channel_perm, quantized, scale, k, x.stride(0), quantized.stride(0),
                                BLOCK_K=min(1024, _next_power_of_2(k)))
    return quantized, scale


def _prefill(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None,
             config: KernelConfig) -> torch.Tensor:
    """One cuBLAS GEMM on all of W expanded in x's channel order (``expand_weight``): FP8 x FP8 with x
    quantized per row (W8A8, ``config.quantize_x``), else in x's dtype."""
    if weight.is_fp8 and config.quantize_x:
        x_fp8, x_scale = quantize_rows_fp8(x, None, x.shape[0])
        w_fp8 = expand_weight(weight, torch.float8_e4m3fn, config.block_n, config.block_g)
        y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale[:, None], scale_b=weight.weight_scale[None, :],
                             out_dtype=x.dtype)
        return y if bias is None else y.add_(bias)
    return torch.nn.functional.linear(x, expand_weight(weight, x.dtype, config.block_n, config.block_g), bias)


def _sparse_cores_rows(m: int) -> int:
    return _cdiv(m, SPARSE_CORES_ROW_STEP) * SPARSE_CORES_ROW_STEP


def _on_sparse_cores(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None, rows: int,
                     overlap: bool) -> torch.Tensor:
    """x permuted once into a buffer of ``rows`` (``_sparse_cores_rows``: whole ``SPARSE_CORES_ROW_STEP``-row
    steps), its dense columns times the dense region by cuBLAS (bias in its epilogue) and its 2:4 columns
    times the 2:4 region on the sparse tensor cores by cuSPARSELt (``cusparselt.add_sparse_product``),
    which adds its product onto the dense one in place; with ``overlap`` (opt-in, ``OVERLAP_REGIONS``, up to
    ``OVERLAP_MAX_ROWS`` rows) the two run at once, the dense product on a second stream (``_beside``), and
    one add sums them. The padding rows are left unset and their outputs dropped. Views by ``narrow``, not
    indexing, and cuBLAS allocating y: this path runs once per layer of a host-bound prefill, where each
    ``[:, :kd]`` costs a few us more (docs/PERFORMANCE.md). Each region's product is rounded to x's dtype
    before they are summed (one stream: 1.87e-3 relative error against fp64 for a bf16 8B qkv at 100 rows,
    where the MMA kernel, one fp32 sum for both regions, gave 1.66e-3; check_plugin_h200_v12/v13.txt)."""
    m, kd = x.shape[0], weight.kd
    x_perm = permute_columns(x, weight.channel_perm, rows, num_warps=PREFILL_PERMUTE_WARPS)
    x_dense, x_sparse = x_perm.narrow(1, 0, kd), x_perm.narrow(1, kd, weight.ks)
    if bias is not None and bias.dtype != x.dtype:  # addmm takes the bias only in x's dtype
        bias = bias.to(x.dtype)
    if kd == 0:
        y = (torch.zeros(rows, weight.n, device=x.device, dtype=x.dtype) if bias is None
             else bias.expand(rows, -1).contiguous())
        cusparselt.add_sparse_product(weight.sparse_compressed, x_sparse, y)
    elif overlap:
        y, dense = (torch.empty(rows, weight.n, device=x.device, dtype=x.dtype) for _ in range(2))
        _beside(x.device, lambda: _dense_region_product(x_dense, weight, bias, out=dense),
                lambda: cusparselt.add_sparse_product(weight.sparse_compressed, x_sparse, y, accumulate=False))
        y += dense
    else:
        y = _dense_region_product(x_dense, weight, bias)
        cusparselt.add_sparse_product(weight.sparse_compressed, x_sparse, y)
    return y if rows == m else y.narrow(0, 0, m)


def _dense_region_product(x_dense: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``x_dense @ dense_weight^T (+ bias)`` on cuBLAS, the bias (in x's dtype) in its epilogue."""
    if bias is None:
        return torch.mm(x_dense, weight.dense_weight.t(), out=out)
    return torch.addmm(bias, x_dense, weight.dense_weight.t(), out=out)


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _beside(device: torch.device, on_side, on_current) -> None:
    """``on_side()`` on a second stream of ``device`` and ``on_current()`` on the current one, so the GPU can
    run them at once; the current stream then waits for the second. Both work only on tensors allocated
    before the call (nothing the caching allocator could hand out while the second stream still reads it),
    and CUDA-graph capture follows the fork and the join. Off CUDA: one after the other."""
    if device.type != "cuda":
        on_side()
        on_current()
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(index)
    current, side = torch.cuda.current_stream(index), _side_streams[index]
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            on_side()
        on_current()
    finally:  # joined even when cuSPARSELt refuses: a capture must not end with the second stream forked
        current.wait_stream(side)


def spense_gemm(x: torch.Tensor, weight: SpenseGemmWeight, bias: torch.Tensor | None = None,
                config: KernelConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias -> [M, N]`` in x's dtype; the path and tiles are chosen here, by M."""
    check_inputs(x, weight, bias)
    m = x.shape[0]
    if out is not None and (out.shape != (m, weight.n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"spense_gemm: out must be a contiguous {x.dtype} [{m}, {weight.n}] tensor")
    sparse_cores = weight.sparse_compressed is not None
    config = config or choose_config(m, weight.n, weight.k, x.device, weight.is_fp8, sparse_cores)
    w8a8 = weight.is_fp8 and config.quantize_x
    if w8a8 and config.kernel == "gemv":
        raise ValueError("spense_gemm: quantize_x (W8A8) needs the mma or unpack kernel, not gemv")
    if config.kernel == "sparse_cores" and not sparse_cores:
        raise ValueError("spense_gemm: the sparse_cores path needs a weight with_sparse_cores()")
    if config.kernel == "sparse_cores" and m > 0:
        rows = _sparse_cores_rows(m)
        plan = (weight.n, weight.ks, rows, weight.k, x.dtype, x.device)
        # No plan may be built inside a CUDA-graph capture; a size cuSPARSELt refused takes the path of weights
        # without sparse cores (the MMA kernel or the expansion).
        if not (cusparselt.refused(*plan) or (x.is_cuda and torch.cuda.is_current_stream_capturing()
                                              and not cusparselt.has_plan(*plan))):
            try:
                overlap = OVERLAP_REGIONS if config.overlap_regions is None else config.overlap_regions
                y = _on_sparse_cores(x.contiguous(), weight, bias, rows, overlap and rows <= OVERLAP_MAX_ROWS)
                return y if out is None else out.copy_(y)
            except cusparselt.CusparseLtError:  # refused at this size (logged once, remembered)
                pass
        config = choose_config(m, weight.n, weight.k, x.device, weight.is_fp8)
    if config.kernel == "unpack" and m > 0:  # prefill: cuBLAS allocates its own output; copy only into ``out``
        y = _prefill(x.contiguous(), weight, bias, config)
        return y if out is None else out.copy_(y)
    result = out if out is not None else torch.empty(m, weight.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return result
    gather = config.kernel == "gemv" and config.gather_x
    # The MMA kernel reads whole BLOCK_M-row tiles of x unmasked when the permuted copy is padded to them.
    rows = _cdiv(m, config.block_m) * config.block_m if config.kernel == "mma" and config.pad_rows else m
    padded = rows != m
    early = _launches_early(x.device)
    byte_permutes = x.is_cuda and torch.version.hip is None  # inline PTX
    x_scale = None
    if gather:
        x_perm = x.contiguous()
    elif w8a8:
        x_perm, x_scale = quantize_rows_fp8(x, weight.channel_perm, rows)
    else:
        x_perm = permute_columns(x, weight.channel_perm, rows, launch_dependents=early)
    # Split-K programs add partial sums: they need a zeroed fp32 buffer.
    acc = torch.zeros(m, weight.n, device=x.device, dtype=torch.float32) if config.split_k > 1 else result
    n, kd, gs = weight.n, weight.kd, weight.ks // GROUP_SIZE
    values, bias_arg = quad_words(weight.sparse_weight), bias if bias is not None else x
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_KD=config.block_kd, BLOCK_G=config.block_g,
                 num_warps=config.num_warps, num_stages=config.num_stages, AFTER_PREVIOUS=early, launch_pdl=early)
    if config.kernel == "gemv":
        if m > config.block_m:
            raise ValueError(f"spense_gemm: the gemv kernel takes M <= block_m={config.block_m}, found M={m}")
        x_words, dense_words = quad_words(x_perm), quad_words(weight.dense_weight)
        _spense_gemv_kernel[(_cdiv(n, config.block_n), config.split_k)](
            x_words, dense_words, values, weight.sparse_meta, bias_arg, acc, m, n, kd // 4, gs // 2,
            x_words.stride(0), dense_words.stride(0), values.stride(0), weight.sparse_meta.stride(0), acc.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=config.split_k, **tiles,
            VALUE_DTYPE=_TL_DTYPES[weight.dense_weight.dtype], X_DTYPE=_TL_DTYPES[x.dtype],
            perm_ptr=weight.channel_perm, GATHER_X=gather, w_scale_ptr=weight.weight_scale,
            DENSE_ALIGN=_alignment(dense_words.stride(0)), WORDS_ALIGN=_alignment(values.stride(0)),
            META_ALIGN=_alignment(weight.sparse_meta.stride(0)),
            BYTE_PERMUTES=byte_permutes and (not weight.is_fp8 or _converts_fp8(x.device)))
    else:
        _spense_gemm_kernel[(_cdiv(m, config.block_m), _cdiv(n, config.block_n), config.split_k)](
            x_perm, weight.dense_weight, values, weight.sparse_meta, bias_arg, acc, m, n, kd, gs,
            x_perm.stride(0), weight.dense_weight.stride(0), values.stride(0), weight.sparse_meta.stride(0),
            acc.stride(0), HAS_BIAS=bias is not None, SPLIT_K=config.split_k,
            FP32_DOT=x_perm.dtype == torch.float32, **tiles, PADDED_M=padded,
            w_scale_ptr=weight.weight_scale, x_scale_ptr=x_scale, BYTE_PERMUTES=byte_permutes,
            DENSE_ALIGN=_alignment(weight.dense_weight.stride(0)), WORDS_ALIGN=_alignment(values.stride(0)),
            META_ALIGN=_alignment(weight.sparse_meta.stride(0)), SWAP_AB=config.swap_ab)
    if config.split_k > 1:
        result.copy_(acc)
    return result


def warmup_row_counts(n: int, k: int, fp8: bool = False, device: torch.device = torch.device("cuda")) -> list[int]:
    """One row count M per compiled kernel variant ``spense_gemm`` can need for an ``[n, k]`` weight: each
    config ``choose_config`` picks, with M a multiple of 16 and not (Triton specialises integer arguments
    on it; M = 1 is the gemv's own config) and, for the MMA kernel, with and without padding to whole row
    tiles (``PADDED_M``). Past ``MMA_MAX_M`` the prefill path's kernels do not take M at all. ``device``: the
    GPU the weight is on (the gemv's tiles depend on its SM count)."""
    variants = {}
    for m in range(1, MMA_MAX_M + 33):
        config = choose_config(m, n, k, device, fp8)
        variants.setdefault((config, m % 16 == 0, config.kernel == "mma" and m % config.block_m == 0), m)
    return sorted(variants.values())


def warm_up(weight: SpenseGemmWeight, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
    """Compile now every kernel variant this weight can take (``warmup_row_counts``), at load time and
    outside any CUDA-graph capture, instead of at the first batch of each new size while serving: there a
    compile stalls every request in flight (vLLM's JIT monitor warned of one in H200 serving runs before).
    Weights whose sizes share their divisibility share compiled kernels, so only the first layers pay."""
    device = weight.dense_weight.device
    for m in warmup_row_counts(weight.n, weight.k, weight.is_fp8, device):  # and sizes cuSPARSELt refuses
        spense_gemm(torch.zeros(m, weight.k, device=device, dtype=dtype), weight, bias,
                    config=choose_config(m, weight.n, weight.k, device, weight.is_fp8))
    if weight.sparse_compressed is not None:
        # cuSPARSELt plans, each with its algorithm search, for the sizes vLLM captures (<= 512), and one past
        # them, whose search at cusparselt.SEARCH_ROWS all longer prefills share
        first = _sparse_cores_rows(SPARSE_CORES_MIN_M)
        for m in range(first, CAPTURED_MAX_M + SPARSE_CORES_ROW_STEP + 1, SPARSE_CORES_ROW_STEP):
            spense_gemm(torch.zeros(m, weight.k, device=device, dtype=dtype), weight, bias)
