"""GPU correctness of the fused Spense GEMM: bf16 and fp16 activations, 16-bit and FP8 weights, every
dispatch path, against fp64 math (W8A8 paths: on x rounded per row to FP8 as format.fp8_round does).

    python benchmarks/check_kernels_gpu.py [--quick]
    compute-sanitizer --tool memcheck python benchmarks/check_kernels_gpu.py --quick

Fresh random inputs each case, output poisoned with NaN before each call, relative error
||y - y_ref|| / ||y_ref|| with y_ref = x @ W^T in fp64 on the reconstructed weight. Exits 1 on failure.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from vllm_spense.format import GROUP_SIZE, fp8_round, fp8_scales, pack
from vllm_spense.kernels import cusparselt
from vllm_spense.kernels.spense_gemm import (BATCHED_DECODE_MMA, CUBLAS_AND_CUSPARSELT, OVERLAP_MAX_ROWS,
                                             UNPACK_AND_CUBLAS, KernelConfig, SpenseGemmWeight, _sparse_cores_rows,
                                             choose_config, spense_gemm)

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# W8A8 multiplies FP8 operands on the tensor cores, whose accumulation keeps fewer bits than fp32 (about 14
# on Hopper, DeepSeek-V3 report, section 3.3.2): bf16-level error whatever the output dtype. Measured worst
# 2.0e-3 for fp16 on the H100 (n=37, k=256, split-K), against 2.4e-4 for W8A16.
W8A8_TOLERANCE = 1e-2
SHAPES = [(6144, 4096, 8), (4096, 12288, 4), (2560, 5120, 0), (1000, 640, 16), (37, 256, 2)]
MS = [1, 2, 3, 16, 17, 64, 100, 256, 1000, 4096]
# --quick (what runs under compute-sanitizer, ~100x slower): ragged shapes, every path still reached.
QUICK_SHAPES = [(1000, 640, 16), (37, 256, 2)]
QUICK_MS = [1, 2, 3, 17, 100, 300]
# 16-bit values only: a third of the values zero, for cuSPARSELt's placement of zeros (``random_case``).
ZEROS_SHAPE, ZERO_FRACTION = (2048, 1024, 8), 0.3


def random_case(n: int, k: int, dense_per_chunk: int, dtype: torch.dtype, fp8: bool = False,
                zero_fraction: float = 0.0):
    """(weight, packed): with ``fp8`` the weight (float32) is on the FP8 grid of its rows' scales, packed FP8;
    ``zero_fraction`` of the values set to exactly 0 as well, so some 2:4 groups keep fewer than two
    nonzeros (whose zeros cuSPARSELt may place elsewhere than ``pack``)."""
    mask = torch.zeros(k // 128, 32, dtype=torch.bool)
    for chunk in mask:
        chunk[torch.randperm(32)[:dense_per_chunk]] = True
    mask = mask.reshape(-1).cuda()
    weight = torch.randn(n, k, device="cuda", dtype=torch.float32 if fp8 else dtype)
    groups = weight.view(n, -1, GROUP_SIZE)
    drop = torch.rand(groups.shape, device="cuda").argsort(-1)[..., :2]
    zeroed = torch.zeros_like(groups).scatter_(-1, drop, 1).bool() & ~mask[None, :, None]
    groups[zeroed] = 0
    weight[torch.rand_like(weight, dtype=torch.float32) < zero_fraction] = 0
    if not fp8:
        return weight, SpenseGemmWeight.from_packed(pack(weight, mask, 128))
    weight *= torch.rand(n, 1, device="cuda") + 0.05  # rows of different magnitudes, each with its own scale
    scale = fp8_scales(weight)
    weight = fp8_round(weight, scale)
    return weight, SpenseGemmWeight.from_packed(pack(weight, mask, 128, weight_scale=scale))


OVERLAPPED_REGIONS = dataclasses.replace(CUBLAS_AND_CUSPARSELT, overlap_regions=True)


def check_product_ignores_y() -> int:
    """``add_sparse_product(..., accumulate=False)`` (beta = 0), which the overlapped path writes into an
    uninitialised buffer, must not read y: called on a y full of NaN, against fp64. Returns the failures."""
    weight, gemm = random_case(2048, 1024, 8, torch.bfloat16)
    gemm = gemm.with_sparse_cores()
    if gemm.sparse_compressed is None:
        print("cuSPARSELt beta = 0: not run (this GPU has no cuSPARSELt path)")
        return 0
    region = weight.double()[:, gemm.channel_perm.long()][:, gemm.kd:]
    failures = 0
    for m in (100, 256):  # x's 2:4 columns as the path passes them: a view with the permuted x's row stride
        x = torch.randn(_sparse_cores_rows(m), gemm.k, device="cuda", dtype=torch.bfloat16).narrow(1, gemm.kd, gemm.ks)
        y = torch.full((x.shape[0], gemm.n), float("nan"), device="cuda", dtype=torch.bfloat16)
        cusparselt.add_sparse_product(gemm.sparse_compressed, x, y, accumulate=False)
        ref = x.double() @ region.t()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        ok = err < TOLERANCE[torch.bfloat16] and bool(torch.isfinite(y).all())
        failures += not ok
        print(f"{'ok' if ok else 'FAIL'} cuSPARSELt beta = 0 onto NaN, {x.shape[0]} rows: rel_err={err:.2e}")
    return failures


def main(quick: bool = False) -> int:
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failures, worst = 0, {}
    forced = {"split-k": KernelConfig(16, 64, 128, 32, 4, 4, 4), "no-split": KernelConfig(16, 64, 128, 32, 1, 4, 4)}
    forced_gemv = {"gemv split-k": KernelConfig(4, 32, 64, 32, 4, 4, 3, "gemv"),
                   "gemv no-split": KernelConfig(4, 64, 64, 16, 1, 4, 3, "gemv"),
                   "gemv gather": KernelConfig(4, 8, 128, 64, 2, 4, 3, "gemv", gather_x=True)}
    # FP8 values: the other activation mode of each path is forced too (W8A8 MMA at decode, W8A16 at prefill).
    forced_fp8 = {"w8a8 mma": dataclasses.replace(BATCHED_DECODE_MMA, quantize_x=True),
                  "w8a8 mma split-k": KernelConfig(16, 64, 128, 32, 4, 4, 4, quantize_x=True)}
    for dtype, fp8 in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
                       (torch.float16, True)):
        cases = [(shape, 0.0) for shape in shapes] + ([] if fp8 else [(ZEROS_SHAPE, ZERO_FRACTION)])
        for (n, k, dense), zeros in cases:
            weight, gemm = random_case(n, k, dense, dtype, fp8, zeros)
            bias = torch.randn(n, device="cuda", dtype=dtype)
            ref_w = weight.double()
            # The same weight with its 2:4 region on cuSPARSELt for prefill (its metadata may be rebuilt, so
            # every path runs on it too); unchanged where cuSPARSELt does not take the shape.
            on_sparse_cores = gemm.with_sparse_cores()
            print(f"{str(dtype)[6:]}{' fp8' if fp8 else ''} n={n} k={k} dense={dense} zeros={zeros}: "
                  f"cuSPARSELt {'yes' if on_sparse_cores.sparse_compressed is not None else 'no'}"
                  f"{', metadata rebuilt' if on_sparse_cores.sparse_meta is not gemm.sparse_meta else ''}")
            for m in ms:
                paths = {"auto": None, **(forced if m <= 64 else {}), **(forced_gemv if m <= 4 else {})}
                if fp8:
                    paths.update(forced_fp8 if m <= 64 else {"w8a16 unpack": UNPACK_AND_CUBLAS})
                runs = [(path, config, gemm) for path, config in paths.items()]
                if on_sparse_cores is not gemm:
                    runs.append(("sparse cores weight", None, on_sparse_cores))
                    if _sparse_cores_rows(m) <= OVERLAP_MAX_ROWS:  # the opt-in two streams, too
                        runs.append(("sparse cores overlapped", OVERLAPPED_REGIONS, on_sparse_cores))
                for path, config, weight_used in runs:
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    spense_gemm(x, weight_used, bias, config=config, out=out)
                    torch.cuda.synchronize()
                    used = config or choose_config(m, n, k, x.device, fp8, weight_used.sparse_compressed is not None)
                    w8a8 = fp8 and used.quantize_x
                    x_ref = fp8_round(x.float(), fp8_scales(x.float())) if w8a8 else x
                    ref = x_ref.double() @ ref_w.t() + bias.double()
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    key = (f"{str(dtype)[6:]}{' fp8 W8A8' if w8a8 else ' fp8 W8A16' if fp8 else ''} {used.kernel} "
                           f"block_m={used.block_m} split_k>1={used.split_k > 1}{' gather' if used.gather_x else ''}"
                           f"{' swap-ab' if used.swap_ab else ''}"
                           f"{' overlapped' if config is OVERLAPPED_REGIONS and weight_used.kd else ''}")
                    worst[key] = max(worst.get(key, 0.0), err)
                    if not (err < (W8A8_TOLERANCE if w8a8 else TOLERANCE[dtype])) or not torch.isfinite(out).all():
                        failures += 1
                        print(f"FAIL {dtype} n={n} k={k} dense={dense} m={m} path={path} rel_err={err:.2e}")
    failures += check_product_ignores_y()
    print("| dtype / path | worst relative error |")
    print("| --- | ---: |")
    for key, err in sorted(worst.items()):
        print(f"| {key} | {err:.2e} |")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv[1:]))
