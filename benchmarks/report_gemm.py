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
    geo = math.exp(sum(map(math.log, decode)) / len(decode))
    return (f"decode (8B shapes, M <= 16, rho = 0.25): geometric-mean speedup {geo:.2f}x (target 1.5x); "
            f"fraction of the bandwidth floor {min(floors):.0%}-{max(floors):.0%} (target >= 80%). "
            f"prefill (all shapes, M >= 2048, rho = 0.25): {min(prefill):.2f}x-{max(prefill):.2f}x (target >= 1.0x).")


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
    if args.png:
        plot(data["rows"], args.png, data["device"])


if __name__ == "__main__":
    main()
