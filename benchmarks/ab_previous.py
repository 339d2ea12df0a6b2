"""The current kernels against an earlier copy of them, both on their default paths, in one run on one card.

    git show REV:kernels/spense_gemm.py > benchmarks/_old_spense_gemm.py
    python benchmarks/ab_previous.py --json ab.json      # or: bash benchmarks/run_gpu.sh OUT ab

Qwen3-8B shapes (``--shapes``: any of bench_gemm.py's), rho = 0.25, bf16 (``--fp8``: FP8 weight values, bf16 x),
M in 1, 2, 8, 16, 64, 2048 (``--ms``);
cuBLAS beside them; each kernel's relative error against the checked cuBLAS + expansion path in fp32,
computed once per shape and M. Timing as bench_gemm.py (CUDA graphs, rotating weights, median).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

from bench_gemm import rotating_weights, timed
from vllm_spense.kernels import spense_gemm as current

MS = (1, 2, 8, 16, 64, 2048)


def load_previous(path: str):
    spec = importlib.util.spec_from_file_location("_old_spense_gemm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def reference(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ W^T`` in fp32 through the checked cuBLAS + expansion path (FP8 values dequantized first)."""
    scale = w.weight_scale[:, None] if w.is_fp8 else 1.0
    return current.spense_gemm(x.float(), current.SpenseGemmWeight.from_channel_perm(
        w.dense_weight.float() * scale, w.sparse_weight.float() * scale, w.sparse_meta, w.channel_perm),
        config=current.UNPACK_AND_CUBLAS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "_old_spense_gemm.py"))
    parser.add_argument("--shapes", nargs="*", default=["8B qkv", "8B o", "8B gate_up", "8B down"])
    parser.add_argument("--ms", nargs="*", type=int, default=list(MS))
    parser.add_argument("--fp8", action="store_true", help="FP8 weight values (bf16 activations)")
    parser.add_argument("--json")
    args = parser.parse_args()
    kernels = {"current": current, "previous": load_previous(args.previous)}
    rows = []
    for name in args.shapes:
        k, ws, dense_ws = rotating_weights(name, 0.25, args.fp8)
        for m in args.ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
            row = {"shape": name, "m": m, "cublas_us": timed(lambda w, x: F.linear(x, w), dense_ws, xs) * 1e3}
            expected = reference(xs[0], ws[0])
            for label, module in kernels.items():
                row[f"{label}_us"] = timed(lambda w, x, module=module: module.spense_gemm(x, w), ws, xs) * 1e3
                got = module.spense_gemm(xs[0], ws[0]).float()
                row[f"{label}_rel_error"] = ((got - expected).norm() / expected.norm()).item()
            print(json.dumps({key: round(v, 5) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
            rows.append(row)
        del ws, dense_ws
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "fp8": args.fp8, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
