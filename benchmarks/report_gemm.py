"""Turn a bench_gemm.py JSON into docs/KERNELS.md's table (markdown on stdout) and a PNG of speedup vs M.

    python benchmarks/report_gemm.py docs/measurements/bench_gemm_h100_v4.json --png docs/gemm_speedup_h100.png
"""

from __future__ import annotations

import argparse
import json
import math

RHOS = ["spense rho=0.0", "spense rho=0.125", "spense rho=0.25", "spense rho=0.5"]
DECODE_SHAPES = ["8B qkv", "8B o", "8B gate_up", "8B down"]


def table(rows: list[dict]) -> str:
    head = "| shape | M | cuBLAS us | " + " | ".join(f"{r[7:]} us (x, floor)" for r in RHOS) + " | torch 2:4 us (x) |"
    lines = [head, "|" + " --- |" * (4 + len(RHOS))]
    for row in rows:
        cells = [row["shape"], str(row["m"]), f"{row['cublas']['ms'] * 1e3:.1f}"]
        for label in RHOS:
            v = row.get(label)
            cells.append(f"{v['ms'] * 1e3:.1f} ({v['speedup']:.2f}x, {v['floor_fraction']:.0%})" if v else "n/a")
        v = row.get("torch 2:4")
        cells.append(f"{v['ms'] * 1e3:.1f} ({v['speedup']:.2f}x)" if v else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """The issue's targets: decode geomean at rho = 0.25 over the 8B shapes, and prefill at M >= 2048."""
    decode = [r["spense rho=0.25"]["speedup"] for r in rows if r["shape"] in DECODE_SHAPES and r["m"] <= 16]
    floors = [r["spense rho=0.25"]["floor_fraction"] for r in rows if r["shape"] in DECODE_SHAPES and r["m"] <= 16]
    prefill = [r["spense rho=0.25"]["speedup"] for r in rows if r["m"] >= 2048]
    geo = _geomean(decode)
    return (f"decode (8B shapes, M <= 16, rho = 0.25): geometric-mean speedup {geo:.2f}x (target 1.5x); "
            f"fraction of the bandwidth floor {min(floors):.0%}-{max(floors):.0%} (target >= 80%). "
            f"prefill (all shapes, M >= 2048, rho = 0.25): {min(prefill):.2f}x-{max(prefill):.2f}x (target >= 1.0x).")


FP8 = ["dense fp8 (_scaled_mm)", "spense fp8 rho=0.125", "spense fp8 rho=0.25", "spense fp8 rho=0.25 other mode"]


def fp8_table(rows: list[dict]) -> str:
    """The FP8 rows (bench_gemm.py --fp8): microseconds and speedup over dense FP8 and over cuBLAS bf16."""
    rows = [r for r in rows if FP8[0] in r]
    if not rows:
        return ""
    lines = ["| shape | M | cuBLAS bf16 us | dense FP8 us | " + " | ".join(
        f"{label[6:]} us (x dense FP8, x bf16)" for label in FP8[1:]) + " |", "|" + " --- |" * (3 + len(FP8))]
    for row in rows:
        fp8 = row[FP8[0]]["ms"]
        cells = [row["shape"], str(row["m"]), f"{row['cublas']['ms'] * 1e3:.1f}", f"{fp8 * 1e3:.1f}"]
        for label in FP8[1:]:
            v = row[label]
            cells.append(f"{v['ms'] * 1e3:.1f} ({fp8 / v['ms']:.2f}x, {v['speedup']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def fp8_targets(rows: list[dict]) -> str:
    """Issue 8's targets: Spense FP8 at rho = 0.25, 8B shapes, M <= 16, over dense FP8 and cuBLAS bf16."""
    decode = [r for r in rows if FP8[0] in r and r["shape"] in DECODE_SHAPES and r["m"] <= 16]
    if not decode:
        return ""
    over_fp8 = [r[FP8[0]]["ms"] / r["spense fp8 rho=0.25"]["ms"] for r in decode]
    over_bf16 = [r["spense fp8 rho=0.25"]["speedup"] for r in decode]
    prefill = [r[FP8[0]]["ms"] / r["spense fp8 rho=0.25"]["ms"] for r in rows if FP8[0] in r and r["m"] >= 2048]
    return (f"FP8 decode (8B shapes, M <= 16, rho = 0.25): geometric mean {_geomean(over_fp8):.2f}x over dense FP8 "
            f"(range {min(over_fp8):.2f}-{max(over_fp8):.2f}x, target 1.3x), {_geomean(over_bf16):.2f}x over cuBLAS "
            f"bf16 (range {min(over_bf16):.2f}-{max(over_bf16):.2f}x, target 2x). FP8 prefill (M >= 2048): "
            f"{min(prefill):.2f}-{max(prefill):.2f}x over dense FP8.")


def plot(rows: list[dict], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True, sharey=True)
    for ax, shape in zip(axes.flat, dict.fromkeys(r["shape"] for r in rows)):
        shape_rows = [r for r in rows if r["shape"] == shape]
        ms = [r["m"] for r in shape_rows]
        for label in [*RHOS, "torch 2:4"]:
            ax.plot(ms, [r[label]["speedup"] if label in r else float("nan") for r in shape_rows], marker="o",
                    markersize=3, label=label.replace("spense ", "Spense "))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(shape)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("M (tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over cuBLAS bf16")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Spense GEMM speedup vs M ({device}, bf16, CUDA graphs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--png")
    args = parser.parse_args()
    with open(args.json) as handle:
        data = json.load(handle)
    print(table(data["rows"]))
    print()
    print(targets(data["rows"]))
    if fp8_table(data["rows"]):
        print()
        print(fp8_table(data["rows"]))
        print()
        print(fp8_targets(data["rows"]))
    if args.png:
        plot(data["rows"], args.png, data["device"])


if __name__ == "__main__":
    main()
