"""The fused Triton GEMM against fp64 math on ragged shapes, every dispatch path, output poisoned first.

On a CPU machine this runs in Triton's interpreter (fp16 and fp32 only: bf16 is wrong there); the GPU
script benchmarks/check_kernels_gpu.py covers bf16 and the real compiler.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.format import fp8_round, fp8_scales, pack
from vllm_spense.kernels.spense_gemm import (_EXPAND_FP8_PAIR_PTX_BF16, _EXPAND_FP8_PAIR_PTX_F16, _EXPAND_PAIR_PTX,
                                             _GEMV_DENSE_PTX_BF16, _GEMV_DENSE_PTX_E4M3_BF16, _GEMV_DENSE_PTX_E4M3_F16,
                                             _GEMV_DENSE_PTX_F16, _GEMV_PAIR_PTX_BF16, _GEMV_PAIR_PTX_E4M3_BF16,
                                             _GEMV_PAIR_PTX_E4M3_F16, _GEMV_PAIR_PTX_F16,
                                             BATCHED_DECODE_MMA, DECODE_GEMV, gemv_tiles, gemv_two_rows_tiles,
                                             FP8_PREFILL, MMA_MAX_M, UNPACK_AND_CUBLAS, KernelConfig, SpenseGemmWeight,
                                             choose_config, expand_weight, mma_tiles, permute_columns, spense_gemm,
                                             warmup_row_counts)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, K, chunk, dense groups per chunk): N never a multiple of the tile; pure 2:4 and rho = 0.5 included.
SHAPES = [(37, 192, 64, 2), (129, 256, 128, 8), (70, 128, 128, 0), (33, 384, 128, 16)]
CONFIGS = {
    "decode": KernelConfig(16, 64, 128, 32, 1, 4, 2),
    "decode split-k": KernelConfig(16, 64, 64, 16, 3, 4, 2),
    "mid": KernelConfig(64, 128, 64, 16, 1, 4, 2),
    "decode unpadded": KernelConfig(16, 32, 64, 16, 1, 4, 2, pad_rows=False),
    "decode split-k 4": KernelConfig(16, 32, 128, 64, 4, 4, 3),
    "mid swap-ab split-k": KernelConfig(32, 64, 64, 16, 2, 4, 2, swap_ab=True),
    "gemv": KernelConfig(4, 32, 32, 16, 1, 4, 1, "gemv"),
    "gemv split-k": KernelConfig(4, 16, 16, 8, 3, 4, 1, "gemv"),
    "gemv gather": KernelConfig(4, 8, 32, 16, 2, 4, 1, "gemv", gather_x=True),
    "prefill (unpack + GEMM)": UNPACK_AND_CUBLAS,
}


def make_weight(shape, dtype, generator):
    n, k, chunk, dense = shape
    mask = random_dense_mask(k, chunk, dense, generator)
    weight = random_pruned_weight(n, k, mask, generator, dtype)
    packed = pack(weight, mask, chunk)
    return weight, SpenseGemmWeight.from_packed(packed._replace(**{
        f: getattr(packed, f).to(DEVICE) for f in packed._fields if getattr(packed, f) is not None}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17, 100])
@pytest.mark.parametrize("path", [None, *CONFIGS])
def test_gemm_matches_fp64(dtype, shape, m, path):
    if path in CONFIGS and CONFIGS[path].kernel == "gemv" and m > CONFIGS[path].block_m:
        pytest.skip("the gemv kernel serves M <= block_m only (choose_config never sends more)")
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    weight, gemm_weight = make_weight(shape, dtype, generator)
    x = torch.randn(m, shape[1], generator=generator).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=generator).to(dtype).to(DEVICE)
    out = torch.full((m, shape[0]), float("nan"), dtype=dtype, device=DEVICE)  # poison
    spense_gemm(x, gemm_weight, bias, config=CONFIGS.get(path), out=out)
    if (CONFIGS.get(path) or choose_config(m, *shape[:2], torch.device(DEVICE))).kernel == "unpack":
        assert torch.equal(spense_gemm(x, gemm_weight, bias, config=CONFIGS.get(path)), out)  # no out: same y
    expected = x.double().cpu() @ weight.double().t() + bias.double().cpu()
    error = (out.double().cpu() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all()
    assert error < (2e-3 if dtype == torch.float16 else 1e-5), f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_two_rows_take_the_gemv_and_match_fp64(dtype, shape, generator):
    """M = 2 against these small weights dispatches to the gemv with both rows in one program
    (``gemv_two_rows_tiles``), poisoned output, against fp64."""
    assert choose_config(2, *shape[:2], torch.device(DEVICE)) == gemv_two_rows_tiles(shape[1])
    weight, gemm_weight = make_weight(shape, dtype, generator)
    x = torch.randn(2, shape[1], generator=generator).to(dtype).to(DEVICE)
    out = torch.full((2, shape[0]), float("nan"), dtype=dtype, device=DEVICE)
    spense_gemm(x, gemm_weight, out=out)
    expected = x.double().cpu() @ weight.double().t()
    error = (out.double().cpu() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all() and error < (2e-3 if dtype == torch.float16 else 1e-5), f"error {error:.2e}"


@pytest.mark.parametrize("path", ["gemv", "gemv gather", "decode", "prefill (unpack + GEMM)"])
def test_x_that_starts_off_a_word_boundary(path, generator):
    """Every path reads x four channels per 8-byte word (the gemv directly, the others when permuting it);
    an x that is a view starting 2 bytes into a buffer (as a slice of a larger activation buffer can) must
    still give the right product."""
    shape = SHAPES[1]
    weight, gemm_weight = make_weight(shape, torch.float16, generator)
    buffer = torch.randn(3 * shape[1] + 1, generator=generator).to(torch.float16).to(DEVICE)
    x = buffer[1:].view(3, shape[1])
    assert x.data_ptr() % 8 != 0
    out = spense_gemm(x, gemm_weight, config=CONFIGS[path])
    expected = x.double().cpu() @ weight.double().t()
    assert (out.double().cpu() - expected).norm() / expected.norm() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 70])
def test_permuted_activations_are_x_at_channel_perm(dtype, m, generator):
    """The quad-wise permutation against torch's indexing (exact: values are only moved), from a column slice
    of a wider buffer, into a buffer padded to more rows."""
    _, gemm_weight = make_weight(SHAPES[3], dtype, generator)
    k = SHAPES[3][1]
    wide = torch.randn(m, k + 12, generator=generator).to(dtype).to(DEVICE)
    x = wide[:, 4:4 + k]
    permuted = permute_columns(x, gemm_weight.channel_perm, m + 11)
    assert permuted.shape == (m + 11, k)
    assert torch.equal(permuted[:m], x[:, gemm_weight.channel_perm.long()])


def _packed_fma(a: int, b: int, c: int, dtype: torch.dtype) -> int:
    """``fma.rn.{bf16,f16}x2``: a * b + c on each 16-bit half, computed in fp64 and rounded once to dtype."""
    halves = [torch.tensor([(v >> shift) & 0xFFFF for v in (a, b, c)], dtype=torch.int32).to(torch.int16).view(dtype)
              for shift in (0, 16)]
    results = [(h[0].double() * h[1].double() + h[2].double()).to(dtype).view(torch.int16).item() & 0xFFFF
               for h in halves]
    return results[0] | results[1] << 16


def _float_bits(value: float, dtype: torch.dtype) -> int:
    bits = {torch.float32: torch.int32, torch.float16: torch.int16}[dtype]
    mask = 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
    return torch.tensor([value], dtype=torch.float64).to(dtype).view(bits).item() & mask


def _bits_float(bits: int, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).item()


def _run_ptx(ptx: str, inputs: dict[str, int]) -> dict[str, int]:
    """Shipped inline PTX executed instruction by instruction in Python, every register a 16- or 32-bit
    pattern: the ops the kernels use (mov and word splits, shl, shr, and, or, xor, mad.lo, prmt, fma on
    f32 / bf16x2 / f16x2, cvt f16 -> f32 and e4m3x2 -> f16x2). Returns the registers, outputs ``$i``."""
    regs = dict(inputs)

    def value(token):
        return regs[token] if token in regs else int(token, 0)

    for statement in re.split(r"[;\n]", ptx):
        statement = statement.strip().strip("{}").strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, args = statement.split(None, 1)
        if args.startswith("{"):  # mov.b64 / mov.b32 {lo, hi}, word: the word's two halves
            lo, hi = args[1:args.index("}")].replace(" ", "").split(",")
            bits = 32 if op == "mov.b64" else 16
            word = value(args.rsplit(",", 1)[1].strip())
            regs[lo], regs[hi] = word & ((1 << bits) - 1), word >> bits
            continue
        dest, *sources = [t.strip() for t in args.split(",")]
        operands = [value(t) for t in sources]
        if op == "mov.b32":
            result = operands[0]
        elif op == "shl.b32":
            result = operands[0] << operands[1] if operands[1] < 32 else 0
        elif op == "shr.b32":
            result = operands[0] >> operands[1]
        elif op == "and.b32":
            result = operands[0] & operands[1]
        elif op == "xor.b32":
            result = operands[0] ^ operands[1]
        elif op == "or.b32":
            result = operands[0] | operands[1]
        elif op == "mad.lo.u32":
            result = operands[0] * operands[1] + operands[2]
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            result = _packed_fma(*operands, torch.bfloat16 if "bf16" in op else torch.float16)
        elif op == "fma.rn.f32":
            a, b, c = (_bits_float(v, torch.float32) for v in operands)
            result = _float_bits(a * b + c, torch.float32)
        elif op == "cvt.f32.f16":
            result = _float_bits(_bits_float(operands[0], torch.float16), torch.float32)
        elif op == "cvt.rn.f16x2.e4m3x2":  # the low byte into the low half
            pair = torch.tensor([operands[0] & 0xFF, operands[0] >> 8], dtype=torch.uint8).view(torch.float8_e4m3fn)
            halves = pair.to(torch.float16).view(torch.int16).tolist()
            result = (halves[0] & 0xFFFF) | (halves[1] & 0xFFFF) << 16
        elif op == "prmt.b32":  # bytes of {b, a} picked by the low four nibbles of c
            pool = [(operands[0] >> 8 * i) & 0xFF for i in range(4)] + [(operands[1] >> 8 * i) & 0xFF for i in range(4)]
            result = sum(pool[(operands[2] >> 4 * i) & 0x7] << 8 * i for i in range(4))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[dest] = result & 0xFFFFFFFF
    return regs


def _run_expand_pair_ptx(pair_word: int, meta_byte: int, ptx: str = _EXPAND_PAIR_PTX.value) -> list[int]:
    """The PTX of ``_expand_pairs_by_permutes`` (or of its FP8 version) run by ``_run_ptx``: its eight 16-bit
    outputs."""
    regs = _run_ptx(ptx, {"$8": pair_word, "$9": meta_byte})
    return [regs[f"${i}"] for i in range(8)]


def test_byte_permute_expansion_places_every_kept_value(generator):
    """The GPU's byte-permute expansion (inline PTX, which the CPU interpreter cannot run) against the
    positions it must produce, for every valid metadata byte of a group pair: first value at i0, second at
    i1 of each group, zeros elsewhere."""
    for byte in range(256):
        (a0, a1), (b0, b1) = (byte & 3, byte >> 2 & 3), (byte >> 4 & 3, byte >> 6 & 3)
        if a0 >= a1 or b0 >= b1:
            continue  # not a 2:4 index pair (the first index is always the smaller)
        values = torch.randint(1, 2**16, (4,), generator=generator).tolist()
        word = values[0] | values[1] << 16 | values[2] << 32 | values[3] << 48
        expected = [0] * 8
        expected[a0], expected[a1], expected[4 + b0], expected[4 + b1] = values
        assert _run_expand_pair_ptx(word, byte) == expected, f"metadata byte {byte:#04x}"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_fp8_byte_permute_expansion_places_and_converts_every_value(out_dtype, generator):
    """The FP8 version (inline PTX) against torch's own e4m3 conversion: every valid metadata byte of a
    group pair with random kept values, then every non-NaN e4m3 byte (subnormals, -0 and 448 included) in
    each of the four kept slots; zeros at the pruned positions."""
    ptx = (_EXPAND_FP8_PAIR_PTX_BF16 if out_dtype == torch.bfloat16 else _EXPAND_FP8_PAIR_PTX_F16).value
    finite = [b for b in range(256) if b & 0x7F != 0x7F]  # 0x7F and 0xFF are e4m3's NaNs

    def converted(byte_values):
        values = torch.tensor(byte_values, dtype=torch.uint8).view(torch.float8_e4m3fn).to(out_dtype)
        return [v & 0xFFFF for v in values.view(torch.int16).tolist()]

    def check(byte_values, meta):
        (a0, a1), (b0, b1) = (meta & 3, meta >> 2 & 3), (meta >> 4 & 3, meta >> 6 & 3)
        expected = [0] * 8
        expected[a0], expected[a1], expected[4 + b0], expected[4 + b1] = converted(byte_values)
        word = sum(b << 8 * i for i, b in enumerate(byte_values))
        assert _run_expand_pair_ptx(word, meta, ptx) == expected, f"bytes {byte_values}, metadata {meta:#04x}"

    valid = [m for m in range(256) if (m & 3) < (m >> 2 & 3) and (m >> 4 & 3) < (m >> 6 & 3)]
    for meta in valid:
        check([finite[i] for i in torch.randint(len(finite), (4,), generator=generator).tolist()], meta)
    for start in range(0, len(finite), 4):
        chunk = (finite[start:start + 4] + finite[:4])[:4]
        check(chunk, valid[torch.randint(len(valid), (1,), generator=generator).item()])


GEMV_PTX = {  # (values, activations): (the gemv's dense-quad PTX, its 2:4-pair PTX)
    (torch.bfloat16, torch.bfloat16): (_GEMV_DENSE_PTX_BF16, _GEMV_PAIR_PTX_BF16),
    (torch.float16, torch.float16): (_GEMV_DENSE_PTX_F16, _GEMV_PAIR_PTX_F16),
    (torch.float8_e4m3fn, torch.bfloat16): (_GEMV_DENSE_PTX_E4M3_BF16, _GEMV_PAIR_PTX_E4M3_BF16),
    (torch.float8_e4m3fn, torch.float16): (_GEMV_DENSE_PTX_E4M3_F16, _GEMV_PAIR_PTX_E4M3_F16)}


@pytest.mark.parametrize("dtypes", list(GEMV_PTX), ids=lambda d: f"{str(d[0])[6:]}-x-{str(d[1])[6:]}")
def test_gemv_ptx_fmas_match_fp64(dtypes, generator):
    """The gemv's inline PTX (which the CPU interpreter cannot run), executed by ``_run_ptx``, against fp64:
    a dense quad's four products, and a 2:4 pair's four kept values times the activations their metadata
    byte picks, for every valid metadata byte, each added to a random fp32 accumulator."""
    value_dtype, x_dtype = dtypes
    dense_ptx, pair_ptx = (ptx.value for ptx in GEMV_PTX[dtypes])

    def random_word(dtype, count=4):
        """``count`` random values of ``dtype`` and their word (memory order, low bits first)."""
        values = (torch.randn(count, generator=generator) * 2).to(dtype)
        width = 8 if dtype == torch.float8_e4m3fn else 16
        bits = values.view(torch.uint8 if width == 8 else torch.int16).tolist()
        return values.double(), sum((b & (1 << width) - 1) << width * i for i, b in enumerate(bits))

    def run(ptx, inputs, products):
        """The PTX on ``inputs`` against the fp64 sum of ``products`` and a random accumulator, to within the
        rounding of four fp32 FMAs on terms of these sizes."""
        acc = torch.randn(1, generator=generator, dtype=torch.float64).float().double().item()
        got = _bits_float(_run_ptx(ptx, {"$1": _float_bits(acc, torch.float32), **inputs})["$0"], torch.float32)
        expected = acc + products.sum().item()
        assert abs(got - expected) <= 4 * 2**-24 * (abs(acc) + products.abs().sum().item()), (inputs, got, expected)

    for _ in range(16):
        w, w_word = random_word(value_dtype)
        x, x_word = random_word(x_dtype)
        run(dense_ptx, {"$2": w_word, "$3": x_word}, w * x)
    valid = [m for m in range(256) if (m & 3) < (m >> 2 & 3) and (m >> 4 & 3) < (m >> 6 & 3)]
    for meta in valid:
        w, w_word = random_word(value_dtype)
        (xa, xa_word), (xb, xb_word) = random_word(x_dtype), random_word(x_dtype)
        picked = torch.stack((xa[meta & 3], xa[meta >> 2 & 3], xb[meta >> 4 & 3], xb[meta >> 6 & 3]))
        run(pair_ptx, {"$2": w_word, "$3": meta, "$4": xa_word, "$5": xb_word}, w * picked)


@pytest.mark.parametrize("shape", SHAPES)
def test_expanded_weight_is_the_weight_in_x_channel_order(shape, generator):
    """The prefill path's temporary, against the weight it was packed from (exact: values are only moved)."""
    weight, gemm_weight = make_weight(shape, torch.float16, generator)
    expanded = expand_weight(gemm_weight, torch.float16, block_n=16, block_g=8)  # ragged against N and groups
    assert torch.equal(expanded.cpu(), weight)


def test_dispatch_by_m_picks_decode_and_prefill_tiles():
    cpu = torch.device("cpu")
    assert choose_config(2, 6144, 4096, cpu) == mma_tiles(2, 6144, 4096)
    # Two rows against a weight of at most 2^24 values: the gemv kernel with both rows in one program.
    assert choose_config(2, 4096, 4096, cpu) == gemv_two_rows_tiles(4096)
    assert (gemv_two_rows_tiles(4096).block_kd, gemv_two_rows_tiles(2048).block_kd) == (512, 256)
    assert choose_config(2, 4096, 4096, cpu, fp8=True).kernel == choose_config(3, 4096, 4096, cpu).kernel == "mma"
    # One row: the gemv's tiles by how many programs fit in one wave of a 132-SM GPU (gemv_tiles).
    assert choose_config(1, 24576, 4096, cpu) == DECODE_GEMV  # many waves: 4 rows, 512-column steps
    assert choose_config(1, 4096, 12288, cpu) == dataclasses.replace(DECODE_GEMV, block_kd=1024)  # 1024 programs
    assert choose_config(1, 6144, 4096, cpu) == dataclasses.replace(DECODE_GEMV, block_n=8)  # 768 of 8 rows
    assert gemv_tiles(6144, 4096, 264) == dataclasses.replace(DECODE_GEMV, block_kd=1024)  # twice the SMs
    # MMA tiles by shape (mma_tiles): long K split, very wide N in 64-column tiles; FP8 values keep 16-row
    # tiles without the split (fp8_mma_tiles).
    assert choose_config(8, 4096, 12288, cpu) == mma_tiles(8, 4096, 12288)
    assert mma_tiles(8, 4096, 12288).split_k == 4 and mma_tiles(24, 4096, 12288).split_k == 1
    assert mma_tiles(8, 24576, 4096).block_n == 64 and mma_tiles(8, 6144, 4096).block_kd == 128
    assert choose_config(8, 4096, 12288, cpu, fp8=True) == BATCHED_DECODE_MMA
    # At 17-32 rows wide weights take 32-row tiles; past 48 rows (32 for gate_up shapes) the operands swap, up
    # to 256 rows of x a program, K split where the grid is small (64 output tiles of 8B o and down).
    assert (mma_tiles(24, 6144, 4096).block_m, mma_tiles(24, 4096, 4096).block_m) == (32, 16)
    assert mma_tiles(40, 6144, 4096).block_m == 16 and not mma_tiles(48, 6144, 4096).swap_ab
    assert mma_tiles(49, 6144, 4096).swap_ab and mma_tiles(33, 24576, 4096).swap_ab
    assert [mma_tiles(m, 6144, 4096).block_m for m in (49, 100, 128, 129, MMA_MAX_M)] == [64, 128, 128, 256, 256]
    assert mma_tiles(MMA_MAX_M, 4096, 4096).block_m == 128  # 256-row tiles would leave 64 programs
    assert [mma_tiles(m, 4096, 12288).split_k for m in (64, 128, 256)] == [2, 2, 1]
    assert mma_tiles(64, 2560, 5120).split_k == 2 and mma_tiles(64, 2048, 5120).split_k == 4
    assert mma_tiles(128, 6144, 4096).split_k == 1
    assert choose_config(MMA_MAX_M, 4096, 4096, cpu) == mma_tiles(MMA_MAX_M, 4096, 4096)
    assert choose_config(MMA_MAX_M + 1, 4096, 4096, cpu) == UNPACK_AND_CUBLAS
    assert choose_config(4096, 4096, 4096, cpu) == UNPACK_AND_CUBLAS


@pytest.mark.parametrize("fp8", [False, True])
def test_warm_up_row_counts_cover_every_compiled_variant(fp8):
    """Triton compiles a kernel per config, per specialisation of M (a multiple of 16 or not) and, for the MMA
    kernel, per PADDED_M: every M an engine may send shares all three with one of the warm-up's row counts,
    so nothing compiles after the load-time warm-up (check_plugin_gpu.py counts the compiles on the GPU)."""
    cpu = torch.device("cpu")
    for n, k in ((6144, 4096), (24576, 4096), (4096, 12288), (1000, 640), (2560, 5120), (5120, 6400)):
        counts = warmup_row_counts(n, k, fp8, cpu)
        assert counts[0] == 1 and len(counts) <= 20, counts

        def variant(m):
            config = choose_config(m, n, k, cpu, fp8)
            return config, m % 16 == 0, config.kernel == "mma" and m % config.block_m == 0

        warmed = {variant(m) for m in counts}
        missing = [m for m in range(1, 4 * MMA_MAX_M) if variant(m) not in warmed]
        assert not missing, (n, k, missing[:5])


def test_bad_inputs_are_refused_before_launch():
    generator = torch.Generator().manual_seed(0)
    _, gemm_weight = make_weight(SHAPES[0], torch.float16, generator)
    with pytest.raises(ValueError, match="x must be \\[M, 192\\], found \\[2, 191\\]"):
        spense_gemm(torch.randn(2, 191, dtype=torch.float16, device=DEVICE), gemm_weight)
    with pytest.raises(ValueError, match="dense_weight must be torch.float32"):
        spense_gemm(torch.randn(2, 192, device=DEVICE), gemm_weight)
    bad_meta = dataclasses.replace(gemm_weight, sparse_meta=gemm_weight.sparse_meta[:, :-1])
    with pytest.raises(ValueError, match="sparse_meta must be torch.uint8 \\[37, 21\\].*found torch.uint8 \\[37, 20\\]"):
        spense_gemm(torch.randn(2, 192, dtype=torch.float16, device=DEVICE), bad_meta)
    with pytest.raises(ValueError, match="bias must be \\[37\\]"):
        spense_gemm(torch.randn(2, 192, dtype=torch.float16, device=DEVICE), gemm_weight,
                    torch.randn(36, dtype=torch.float16, device=DEVICE))
    int64_perm = dataclasses.replace(gemm_weight, channel_perm=gemm_weight.channel_perm.long())
    with pytest.raises(ValueError, match="channel_perm must be int32 .*found torch.int64"):
        spense_gemm(torch.randn(2, 192, dtype=torch.float16, device=DEVICE), int64_perm)


FP8_CONFIGS = {
    "gemv": KernelConfig(4, 8, 32, 16, 2, 4, 1, "gemv", gather_x=True),
    "mma W8A16": KernelConfig(16, 32, 64, 16, 1, 4, 2),
    "mma W8A16 split-k": KernelConfig(16, 32, 32, 16, 3, 4, 2, pad_rows=False),
    "mma W8A8": KernelConfig(16, 32, 64, 32, 1, 4, 2, quantize_x=True),
    "mma W8A16 swap-ab": KernelConfig(64, 64, 64, 16, 1, 4, 2, swap_ab=True),
    "prefill W8A16": UNPACK_AND_CUBLAS,
    "prefill W8A8": FP8_PREFILL,
}


def make_fp8_weight(shape, generator):
    """A pruned weight on the FP8 grid of its per-row scales (float32) and its FP8 Spense tensors."""
    n, k, chunk, dense = shape
    mask = random_dense_mask(k, chunk, dense, generator)
    weight = random_pruned_weight(n, k, mask, generator) * torch.rand(n, 1, generator=generator) * 4
    scale = fp8_scales(weight)
    on_grid = fp8_round(weight, scale)
    packed = pack(on_grid, mask, chunk, weight_scale=scale)
    return on_grid, SpenseGemmWeight.from_packed(packed._replace(**{
        f: getattr(packed, f).to(DEVICE) for f in packed._fields if getattr(packed, f) is not None}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 192, 64, 2), (48, 256, 128, 8), (33, 384, 128, 16)])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("path", [None, *FP8_CONFIGS])
def test_fp8_gemm_matches_fp64(dtype, shape, m, path):
    """FP8 values times per-row scales, against fp64 math on the dequantized weight; W8A8 paths against x
    rounded per row to FP8 the way format.fp8_round rounds a weight (scale = row max / 448)."""
    config = FP8_CONFIGS.get(path)
    if config is not None and config.kernel == "gemv" and m > config.block_m:
        pytest.skip("the gemv kernel serves M <= block_m only")
    if path == "prefill W8A8" and shape[0] % 16:
        pytest.skip("torch._scaled_mm needs N in multiples of 16; choose_config sends such shapes to W8A16")
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    weight, gemm_weight = make_fp8_weight(shape, generator)
    x = (torch.randn(m, shape[1], generator=generator) * torch.rand(m, 1, generator=generator) * 3).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype).to(DEVICE)
    out = torch.full((m, shape[0]), float("nan"), dtype=dtype, device=DEVICE)  # poison
    spense_gemm(x.to(DEVICE), gemm_weight, bias, config=config, out=out)
    used = config or choose_config(m, *shape[:2], torch.device(DEVICE), fp8=True)
    if used.kernel == "unpack":
        assert torch.equal(spense_gemm(x.to(DEVICE), gemm_weight, bias, config=config), out)  # no out: same y
    x_ref = fp8_round(x.float(), fp8_scales(x.float())) if used.quantize_x else x
    expected = x_ref.double() @ weight.double().t() + bias.double().cpu()
    error = (out.double().cpu() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all()
    assert error < (2e-3 if dtype == torch.float16 or used.quantize_x else 1e-5), f"relative error {error:.2e}"


def test_fp8_expansion_is_the_weight_in_x_channel_order(generator):
    """The FP8 prefill temporaries: exact FP8 bytes, and the dequantized weight in fp32."""
    weight, gemm_weight = make_fp8_weight((37, 384, 128, 16), generator)
    as_fp8 = expand_weight(gemm_weight, torch.float8_e4m3fn, block_n=16, block_g=8).cpu()
    assert torch.equal(as_fp8.float() * gemm_weight.weight_scale.cpu()[:, None], weight)
    assert torch.equal(expand_weight(gemm_weight, torch.float32, block_n=16, block_g=8).cpu(), weight)


def test_fp8_dispatch_quantizes_x_only_at_prefill_on_cublaslt_shapes():
    cpu = torch.device("cpu")
    assert choose_config(1, 4096, 4096, cpu, fp8=True) == dataclasses.replace(DECODE_GEMV, block_n=8, block_kd=1024)
    assert choose_config(1, 5120, 2048, cpu, fp8=True) == dataclasses.replace(DECODE_GEMV, block_n=8)  # short K
    assert choose_config(48, 4096, 4096, cpu, fp8=True) == BATCHED_DECODE_MMA  # W8A16, 16-row tiles
    assert choose_config(32, 24576, 4096, cpu, fp8=True) == mma_tiles(32, 24576, 4096)  # 32-row tiles, wide W
    assert choose_config(MMA_MAX_M, 4096, 4096, cpu, fp8=True).swap_ab  # W8A16, swapped operands
    assert not choose_config(MMA_MAX_M, 4096, 4096, cpu, fp8=True).quantize_x
    assert choose_config(MMA_MAX_M + 1, 4096, 4096, cpu, fp8=True) == FP8_PREFILL
    assert choose_config(4096, 4104, 4096, cpu, fp8=True) == UNPACK_AND_CUBLAS  # N not a multiple of 16
