"""Spense GEMM vs cuBLAS bf16 vs torch's 2:4 (cuSPARSELt/CUTLASS) on Qwen3 layer shapes; with --fp8,
Spense FP8 vs dense FP8 (``torch._scaled_mm``).

    python benchmarks/bench_gemm.py --json gemm.json [--fp8 | --fp8-only]

Every variant runs under a CUDA graph (as vLLM decodes) via ``triton.testing.do_bench_cudagraph``,
median of the replays. Weights and inputs rotate over enough copies (> 3x L2) that no call reads
another call's weights from L2. The bandwidth floor of a call is the bytes it must move (packed weights
+ x + y) over the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing

from benchmarks_common import spense_weight_for
from vllm_spense.format import fp8_scales
from vllm_spense.kernels.spense_gemm import MMA_MAX_M, UNPACK_AND_CUBLAS, choose_config, spense_gemm
from vllm_spense.offline.sparsegpt import magnitude_2_4

SHAPES = {  # name: (N, K)
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate_up": (24576, 4096), "8B down": (4096, 12288),
    "32B/TP4 qkv": (2560, 5120), "32B/TP4 o": (5120, 2048), "32B/TP4 gate_up": (12800, 5120),
    "32B/TP4 down": (5120, 6400),
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
RHOS = [0.0, 0.125, 0.25, 0.5]
ROTATE_BYTES = 160 * 2**20


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def weight_bytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if isinstance(w, tuple):  # dense FP8: values and scales
        return sum(t.numel() * t.element_size() for t in w)
    tensors = (w.dense_weight, w.sparse_weight, w.sparse_meta) + ((w.weight_scale,) if w.is_fp8 else ())
    return sum(t.numel() * t.element_size() for t in tensors)


def fp8_variants(base: torch.Tensor, copies: int, spense: bool = True) -> dict:
    """Dense FP8 (``torch._scaled_mm`` on x already quantized per token: the quantization is not timed, so
    the baseline is a lower bound) and Spense FP8 at rho = 0.125 / 0.25 on the default path, plus at
    rho = 0.25 the other activation mode of each path: W8A8 (x quantized to FP8, FP8 MMAs) at decode where
    the default is W8A16, W8A16 at prefill where the default is W8A8. Values: (weights, call, x -> input)."""
    from vllm_spense.format import fp8_values
    from vllm_spense.kernels.spense_gemm import BATCHED_DECODE_MMA, quantize_rows_fp8

    scale = fp8_scales(base)
    dense = [(fp8_values(base, scale), scale.clone()) for _ in range(copies)]

    def quantized(x):
        return quantize_rows_fp8(x, None, x.shape[0])

    def scaled_mm(w, xq):
        return torch._scaled_mm(xq[0], w[0].t(), scale_a=xq[1][:, None], scale_b=w[1][None, :],
                                out_dtype=torch.bfloat16)

    variants = {"dense fp8 (_scaled_mm)": (dense, scaled_mm, quantized)}
    if not spense:
        return variants
    for rho in (0.125, 0.25):
        variants[f"spense fp8 rho={rho}"] = ([spense_weight_for(base, rho, fp8=True) for _ in range(copies)],
                                             lambda w, x: spense_gemm(x, w), None)
    w25 = variants["spense fp8 rho=0.25"][0]
    w8a8_mma = dataclasses.replace(BATCHED_DECODE_MMA, quantize_x=True)
    variants["spense fp8 rho=0.25 other mode"] = (w25, lambda w, x: spense_gemm(
        x, w, config=w8a8_mma if x.shape[0] <= MMA_MAX_M else UNPACK_AND_CUBLAS), None)
    return variants


def timed(make_call, weights, xs) -> float:
    pairs = itertools.cycle(list(zip(weights, itertools.cycle(xs))))
    return triton.testing.do_bench_cudagraph(lambda: make_call(*next(pairs)), rep=30, return_mode="median")


def rotating_weights(name: str, rho: float, fp8: bool = False):
    """(K, Spense weights, dense weights) of one shape: enough copies that L2 never holds the next one."""
    n, k = SHAPES[name]
    base = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    copies = max(1, -(-ROTATE_BYTES // weight_bytes(base)))
    return k, [spense_weight_for(base, rho, fp8) for _ in range(copies)], [base.clone() for _ in range(copies)]


SWEEP_KERNELS = ("mma", "mma2w", "gemv", "swap", "rows", "unpack")
DEFAULT_SWEEP_KERNELS = ("mma", "gemv")
SWEEP_SHAPES = ("8B qkv", "8B o", "8B gate_up", "8B down")


def decode_configs(m: int, fp8: bool = False, kernels: tuple[str, ...] = DEFAULT_SWEEP_KERNELS):
    """Tile configs worth timing at decode: at M = 1 the CUDA-core gemv (x read through channel_perm in the
    kernel; rows per program, dense columns / 2:4 groups per step, warps), larger steps for FP8's 1-byte
    values; at M > 1 those of ``kernels``: the MMA kernel with 16-row tiles (FP8: W8A16 and W8A8), the gemv
    kernel with all M rows in one program, the MMA kernel with swapped operands (W's rows on the MMA's wide
    side, up to 256 rows of x a program), the MMA kernel with 32-128-row tiles, and W expanded + cuBLAS."""
    from vllm_spense.kernels.spense_gemm import UNPACK_AND_CUBLAS, KernelConfig

    if m > 1:
        steps, modes = ((128, 64), (256, 128)), (False, True) if fp8 else (False,)
        rows = triton.next_power_of_2(m)
        configs = {
            "mma": [KernelConfig(16, block_n, kd, g, split_k, 4, 3, quantize_x=w8a8)
                    for block_n, (kd, g), split_k, w8a8 in itertools.product((16, 32, 64), steps, (1, 2, 4), modes)],
            # gemv: 4 warps (8 lost 1.3-2.6x at M = 1), steps where the [rows, block_n, kd] partial-product
            # tile holds 2048-16384 values (16-128 fp32 registers a thread: the PTX FMAs add a quad's four
            # products into one).
            "gemv": [KernelConfig(rows, block_n, kd, kd // 2, 1, 4, 3, "gemv", gather_x=True)
                     for block_n, kd in itertools.product((4, 8), (128, 256, 512, 1024))
                     if 2048 <= rows * block_n * kd <= 16384],
            # the MMA kernel with 2 warps: one 8-column MMA tile a warp at block_n 16, two at 32
            "mma2w": [KernelConfig(16, block_n, kd, g, split_k, 2, 3)
                      for block_n, (kd, g), split_k in itertools.product((16, 32), steps, (1, 2))],
            "swap": [KernelConfig(block_m, block_n, kd, g, split_k, warps, 3, swap_ab=True)
                     for block_m, block_n, (kd, g), split_k, warps in itertools.product(
                         sorted({min(128, max(16, rows)), min(256, max(16, rows))}), (64, 128),
                         ((64, 32), (128, 64)), (1, 2, 4), (4, 8))],
            "rows": [KernelConfig(block_m, block_n, kd, g, 1, 4, 3)
                     for block_m, block_n, (kd, g) in itertools.product((32, 64, 128), (32, 64), steps)
                     if block_m <= max(32, rows)],
            "unpack": [UNPACK_AND_CUBLAS]}
        return [config for kernel in kernels for config in configs[kernel]]
    steps = ((512, 256), (1024, 256), (1024, 512), (2048, 512)) + (((2048, 1024),) if fp8 else ())
    return [KernelConfig(m, block_n, kd, g, 1, warps, 3, "gemv", gather_x=True)
            for block_n, (kd, g), warps in itertools.product((4, 8, 16), steps, (4, 8))]


def sweep_decode(path: str | None, fp8: bool = False, ms: tuple[int, ...] = (1,),
                 kernels: tuple[str, ...] = DEFAULT_SWEEP_KERNELS, shapes: tuple[str, ...] = SWEEP_SHAPES) -> None:
    """Time decode tile configs (``decode_configs``) on ``shapes`` at rho = 0.25 against cuBLAS
    (and dense FP8 with ``fp8``) and the default path (what choose_config encodes), at each M of ``ms``."""
    from vllm_spense.kernels.spense_gemm import UNPACK_AND_CUBLAS, choose_config

    try:
        # An earlier kernel to compare with, when copied beside this file, e.g.
        # git show 25dd06a:kernels/spense_gemm.py > benchmarks/_old_spense_gemm.py
        import _old_spense_gemm as old
    except ImportError:
        old = None
    results = []
    for name in shapes:
        k, ws, dense_ws = rotating_weights(name, 0.25, fp8)
        copies = len(ws)
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            row = {"shape": name, "m": m, "fp8": fp8,
                   "cublas_us": timed(lambda w, x: F.linear(x, w), dense_ws, xs) * 1e3,
                   "default": str(choose_config(m, SHAPES[name][0], k, torch.device("cuda"), fp8,
                                                ws[0].sparse_compressed is not None)),
                   "default_us": timed(lambda w, x: spense_gemm(x, w), ws, xs) * 1e3}
            if fp8:
                dense_fp8 = fp8_variants(dense_ws[0], copies, spense=False)["dense fp8 (_scaled_mm)"]
                row["dense_fp8_us"] = timed(dense_fp8[1], dense_fp8[0], [dense_fp8[2](x) for x in xs]) * 1e3
            if old is not None and m <= 4 and not fp8:
                row["old_gemv_us"] = timed(lambda w, x: old.spense_gemm(x, w), ws, xs) * 1e3
            timings, configs = {}, {str(config): config for config in decode_configs(m, fp8, kernels)}
            for config in configs.values():
                try:
                    timings[str(config)] = timed(lambda w, x: spense_gemm(x, w, config=config), ws, xs) * 1e3
                except Exception as error:  # noqa: BLE001 - a config that does not compile is skipped
                    print(name, m, config, error)
            best = min(timings, key=timings.get)
            expected = spense_gemm(xs[0], ws[0], config=UNPACK_AND_CUBLAS).float()  # checked path as reference
            got = spense_gemm(xs[0], ws[0], config=configs[best]).float()
            row.update(best=best, best_us=timings[best], timings_us=timings,
                       best_rel_error=((got - expected).norm() / expected.norm()).item())
            results.append(row)
            print(f"sweep {name} m={m}: cuBLAS {row['cublas_us']:.1f} us, dense FP8 "
                  f"{row.get('dense_fp8_us', float('nan')):.1f} us, default {row['default_us']:.1f} us, "
                  f"old gemv {row.get('old_gemv_us', float('nan')):.1f} us, best {timings[best]:.1f} us {best} "
                  f"(error {row['best_rel_error']:.1e})",
                  flush=True)
        del ws, dense_ws
        torch.cuda.empty_cache()
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)


CROSSOVER_MS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def crossover(path: str, shapes: list[str], ms: list[int]) -> None:
    """The default path against the path of weights without sparse tensor cores (``without_sparse_cores_us``:
    the MMA kernel up to ``MMA_MAX_M`` rows, with ``mma_tiles``), the fused MMA kernel with 16- and 32-row
    tiles, the cuBLAS + 2:4 expansion path and cuBLAS + cuSPARSELt (``CUBLAS_AND_CUSPARSELT``, where the
    weight has it; up to ``OVERLAP_MAX_ROWS`` rows also with its regions at once on two streams,
    ``sparse_cores_overlap_us``), at each M of ``ms``, rho = 0.25: where ``MMA_MAX_M`` and ``SPARSE_CORES_MIN_M`` should
    sit. Also the MMA kernel without the row padding of x (``KernelConfig.pad_rows``), at M = 8 and 24."""
    from vllm_spense.kernels import spense_gemm as module

    mma = {f"mma {block_m}": dataclasses.replace(module.BATCHED_DECODE_MMA, block_m=block_m) for block_m in (16, 32)}
    overlapped = dataclasses.replace(module.CUBLAS_AND_CUSPARSELT, overlap_regions=True)
    results = []
    for name in shapes:
        k, ws, dense_ws = rotating_weights(name, 0.25)
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
            without = module.choose_config(m, ws[0].n, k, xs[0].device)
            row = {"shape": name, "m": m, "cublas_us": timed(lambda w, x: F.linear(x, w), dense_ws, xs) * 1e3,
                   "default_us": timed(lambda w, x: spense_gemm(x, w), ws, xs) * 1e3,
                   "without_sparse_cores_us": timed(lambda w, x: spense_gemm(x, w, config=without), ws, xs) * 1e3,
                   "unpack_us": timed(lambda w, x: spense_gemm(x, w, config=module.UNPACK_AND_CUBLAS), ws, xs) * 1e3}
            if m > 1:
                for label, config in mma.items():
                    row[f"{label}_us"] = timed(lambda w, x: spense_gemm(x, w, config=config), ws, xs) * 1e3
                if ws[0].sparse_compressed is not None:
                    row["sparse_cores_us"] = timed(
                        lambda w, x: spense_gemm(x, w, config=module.CUBLAS_AND_CUSPARSELT), ws, xs) * 1e3
                    if module._sparse_cores_rows(m) <= module.OVERLAP_MAX_ROWS:
                        row["sparse_cores_overlap_us"] = timed(
                            lambda w, x: spense_gemm(x, w, config=overlapped), ws, xs) * 1e3
            if m in (8, 24):
                unpadded = dataclasses.replace(module.BATCHED_DECODE_MMA, pad_rows=False)
                row["default unpadded_us"] = timed(lambda w, x: spense_gemm(x, w, config=unpadded), ws, xs) * 1e3
            results.append(row)
            print(f"crossover {name} m={m}: " + ", ".join(f"{key[:-3]} {value:.1f}" for key, value in row.items()
                                                          if key.endswith("_us")), flush=True)
        del ws, dense_ws
        torch.cuda.empty_cache()
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--shapes", nargs="*", help="default: all of SHAPES; the 8B ones with --crossover")
    parser.add_argument("--ms", nargs="*", type=int, help="default: MS; CROSSOVER_MS with --crossover")
    parser.add_argument("--sweep", help="also time decode tile configs; write them to this JSON file")
    parser.add_argument("--crossover", help="only time the paths against each other by M (crossover); write this JSON")
    parser.add_argument("--sweep-ms", nargs="*", type=int, default=[1], help="the M values --sweep times")
    parser.add_argument("--sweep-kernels", nargs="*", choices=SWEEP_KERNELS, default=list(DEFAULT_SWEEP_KERNELS),
                        help="the kernels --sweep times at M > 1 (decode_configs)")
    parser.add_argument("--sweep-shapes", nargs="*", choices=list(SHAPES), default=list(SWEEP_SHAPES))
    parser.add_argument("--fp8", action="store_true", help="also time the FP8 variants (fp8_variants)")
    parser.add_argument("--fp8-only", action="store_true", help="cuBLAS bf16 and the FP8 variants only")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.crossover:
        return crossover(args.crossover, args.shapes or list(SWEEP_SHAPES), args.ms or CROSSOVER_MS)
    if args.sweep:
        sweep_decode(args.sweep, args.fp8, tuple(args.sweep_ms), tuple(args.sweep_kernels), tuple(args.sweep_shapes))
        if args.fp8:
            return None
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    rows = []
    for name in (args.shapes if args.shapes is not None else list(SHAPES)):
        n, k = SHAPES[name]
        base = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = max(1, -(-ROTATE_BYTES // weight_bytes(base)))
        dense_ws = [base.clone() for _ in range(copies)]
        variants = {"cublas": (dense_ws, lambda w, x: F.linear(x, w), None)}
        for rho in RHOS if not args.fp8_only else ():
            sw = [spense_weight_for(base, rho) for _ in range(copies)]
            variants[f"spense rho={rho}"] = (sw, lambda w, x: spense_gemm(x, w), None)
            if rho == 0.25:  # without cuSPARSELt (what runs elsewhere): the MMA kernel, then W expanded + cuBLAS
                variants["spense rho=0.25 expand"] = (sw, lambda w, x: spense_gemm(
                    x, w, config=choose_config(x.shape[0], w.n, w.k, x.device)), None)
        try:
            from torch.sparse import to_sparse_semi_structured

            if not args.fp8_only:
                w24 = magnitude_2_4(base)
                variants["torch 2:4"] = ([to_sparse_semi_structured(w24.clone()) for _ in range(copies)],
                                         lambda w, x: F.linear(x, w), None)
        except (RuntimeError, ValueError) as error:  # the row then says n/a
            print(f"torch 2:4 unavailable for {name}: {error}")
        if args.fp8 or args.fp8_only:
            variants.update(fp8_variants(base, copies))
        for m in args.ms or MS:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, copies // 2))]
            io_bytes = 2 * m * (k + n)
            result = {"shape": name, "n": n, "k": k, "m": m}
            for label, (ws, call, convert) in variants.items():
                try:
                    ms = timed(call, ws, [convert(x) for x in xs] if convert else xs)
                except Exception as error:  # noqa: BLE001
                    print(f"{label} {name} m={m}: {error}")
                    continue
                floor_ms = (weight_bytes(ws[0]) + io_bytes) / bandwidth * 1e3
                result[label] = {"ms": ms, "floor_fraction": floor_ms / ms}
            cublas = result["cublas"]["ms"]
            for label in variants:
                if label in result:
                    result[label]["speedup"] = cublas / result[label]["ms"]
            rows.append(result)
            print(json.dumps({k2: (round(v["ms"] * 1e3, 1), round(v["speedup"], 2)) if isinstance(v, dict) else v
                              for k2, v in result.items()}), flush=True)
        del variants, dense_ws
        torch.cuda.empty_cache()
        if args.json:  # after every shape, so a cut-off run keeps what it measured
            with open(args.json, "w") as handle:
                json.dump({"device": device, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
