"""Why the batched-decode MMA path costs ~20 us whatever its tiles: the compiler's resource report
(registers, spills, shared memory) of each variant next to its time.

    python benchmarks/kernel_report.py [--json report.json]

The MMA kernel (``BATCHED_DECODE_MMA``'s tiles) at M = 8, rho = 0.25, on the Qwen3-8B o and qkv weights,
with num_stages 1-4, split-K 1/2/4 and 4 or 8 warps: if shared memory limits how many programs an SM
holds, fewer stages should buy occupancy and split-K should then help. Weights rotate as in bench_gemm.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch

from bench_gemm import SHAPES, rotating_weights, timed
from benchmarks_common import compiled_variants
from vllm_spense.kernels import spense_gemm as sg

SM_SHARED_BYTES = 228 * 1024  # shared memory per SM on Hopper (H100 / H200)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    resources, rows = {}, []
    for name in ("8B o", "8B qkv"):
        k, ws, _ = rotating_weights(name, 0.25)
        xs = [torch.randn(8, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
        for stages, split_k, warps in itertools.product((1, 2, 3, 4), (1, 2, 4), (4, 8)):
            config = dataclasses.replace(sg.BATCHED_DECODE_MMA, num_stages=stages, split_k=split_k, num_warps=warps)
            before = {id(c) for c in compiled_variants(sg._spense_gemm_kernel)}
            sg.spense_gemm(xs[0], ws[0], config=config)  # compiles a variant the first time these tiles run
            new = [c for c in compiled_variants(sg._spense_gemm_kernel) if id(c) not in before]
            if new:
                meta = new[0].metadata
                resources[(stages, split_k, warps)] = dict(regs=new[0].n_regs, spills=new[0].n_spills,
                                                           shared=meta.shared)
            res = resources.get((stages, split_k, warps), {})
            us = timed(lambda w, x, config=config: sg.spense_gemm(x, w, config=config), ws, xs) * 1e3
            programs = SHAPES[name][0] // config.block_n * split_k
            row = dict(shape=name, m=8, stages=stages, split_k=split_k, warps=warps, us=us, programs=programs, **res)
            if res.get("shared"):
                row["programs_per_sm_by_shared"] = SM_SHARED_BYTES // res["shared"]
            rows.append(row)
            print(f"{name} M=8 stages={stages} split_k={split_k} warps={warps}: {us:.1f} us, {programs} programs, "
                  f"regs={res.get('regs')} spills={res.get('spills')} shared={res.get('shared')}", flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
