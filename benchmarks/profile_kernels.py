"""Hardware counters (Nsight Compute) of the decode GEMMs next to cuBLAS's: where the Spense kernels' time goes.

    bash benchmarks/run_gpu.sh OUT ncu                     # profiles, then summarizes into OUT/ncu_summary.txt
    python benchmarks/profile_kernels.py --summarize OUT/ncu.csv OUT/ncu_manifest.json

Run under ``ncu --profile-from-start off``, the script warms every workload up outside the profiled range,
then runs each once inside it (cudaProfilerStart/Stop), behind a marker kernel whose grid size is the
workload's index, so the summary can tell which kernels belong to which workload without relying on kernel
names. Workloads: cuBLAS bf16, Spense rho = 0.25 bf16 and Spense FP8 rho = 0.25 at M = 1 and M = 8 on the
four Qwen3-8B shapes. ncu flushes the caches before each kernel (its default), so every weight is read cold,
as in decode.
"""

from __future__ import annotations

import argparse
import csv
import json

import torch

STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "mio_throttle", "lg_throttle", "math_pipe_throttle",
          "wait", "not_selected", "selected", "no_instruction", "dispatch_stall", "branch_resolving", "drain",
          "membar", "imc_miss", "tex_throttle", "sleeping", "misc")
COLUMNS = {  # label: raw metric of the ncu CSV (percentages of the unit's peak over the kernel's time)
    "us": "gpu__time_duration.sum",
    "dram GB": "dram__bytes_read.sum",
    "dram %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "L1 %": "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "LSU wavefronts %": "l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed",
    "ALU pipe %": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_elapsed",
    "issue %": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "warps %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "warp insts": "smsp__inst_executed.sum",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
}


def workloads():
    """(label, call) pairs, built once (weights included) so the profiled range holds only the GEMMs."""
    import torch.nn.functional as F

    from bench_gemm import SHAPES
    from benchmarks_common import spense_weight_for
    from vllm_spense.kernels.spense_gemm import spense_gemm

    result = []
    for name in ("8B qkv", "8B o", "8B gate_up", "8B down"):
        n, k = SHAPES[name]
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bf16, fp8 = spense_weight_for(dense, 0.25), spense_weight_for(dense, 0.25, fp8=True)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            result.append((f"{name} M={m} cuBLAS bf16", lambda x=x, w=dense: F.linear(x, w)))
            result.append((f"{name} M={m} Spense rho=0.25", lambda x=x, w=bf16: spense_gemm(x, w)))
            if m == 1:
                result.append((f"{name} M={m} Spense FP8 rho=0.25", lambda x=x, w=fp8: spense_gemm(x, w)))
    return result


def profile(manifest_path: str) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _profile_marker(ptr):
        tl.store(ptr + tl.program_id(0), 0)

    runs = workloads()
    scratch = torch.empty(len(runs) + 1, device="cuda", dtype=torch.int32)
    for _, call in runs:  # compile and warm up outside the profiled range
        call()
    _profile_marker[(1,)](scratch)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for index, (_, call) in enumerate(runs):
        _profile_marker[(index + 1,)](scratch)
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    with open(manifest_path, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "workloads": [label for label, _ in runs]}, handle)


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def summarize(csv_path: str, manifest_path: str) -> str:
    """One line per workload: its kernels' total time and the counters of its longest kernel."""
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    with open(csv_path) as handle:
        lines = [line for line in handle if line.startswith('"')]  # ncu prints its own notes before the CSV
    rows = list(csv.DictReader(lines))
    units, rows = rows[0], rows[1:]
    groups: dict[int, list[dict]] = {}
    current = None
    for row in rows:
        if "_profile_marker" in row["Kernel Name"]:
            current = int(_number(row["launch__grid_size"])) - 1
            continue
        if current is not None:
            groups.setdefault(current, []).append(row)
    known = {"us": {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0},
             "dram GB": {"byte": 1e-9, "Kbyte": 1e-6, "Mbyte": 1e-3, "Gbyte": 1.0}}
    scale = {}
    for key, factors in known.items():
        unit = units.get(COLUMNS[key])
        if unit not in factors:
            raise ValueError(f"{csv_path}: {COLUMNS[key]} is in {unit!r}, expected one of {sorted(factors)}")
        scale[key] = factors[unit]
    out = [f"device: {manifest['device']}",
           "| workload | kernels | " + " | ".join(COLUMNS) + " | top stalls (warps per issue) | kernel names |",
           "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | --- | --- |"]
    for index, label in enumerate(manifest["workloads"]):
        kernels = groups.get(index, [])
        if not kernels:
            out.append(f"| {label} | 0 | (no kernels profiled) |")
            continue
        total_us = sum(_number(row[COLUMNS["us"]]) for row in kernels) * scale["us"]
        main = max(kernels, key=lambda row: _number(row[COLUMNS["us"]]))
        values = []
        for key, metric in COLUMNS.items():
            value = _number(main.get(metric, "nan")) * scale.get(key, 1.0)
            values.append(f"{total_us:.1f}" if key == "us" else f"{value:.3g}")
        stalls = {reason: _number(main.get(f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio", "nan"))
                  for reason in STALLS}
        top = sorted(((v, r) for r, v in stalls.items() if v == v), reverse=True)[:4]
        names = ", ".join(row["Kernel Name"][:40] for row in kernels)
        out.append(f"| {label} | {len(kernels)} | " + " | ".join(values) + " | "
                   + ", ".join(f"{r} {v:.2f}" for v, r in top) + f" | {names} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", help="profile: write the workload labels here")
    parser.add_argument("--summarize", nargs=2, metavar=("CSV", "MANIFEST"))
    args = parser.parse_args()
    if args.summarize:
        print(summarize(*args.summarize))
    else:
        profile(args.manifest or "ncu_manifest.json")


if __name__ == "__main__":
    main()
