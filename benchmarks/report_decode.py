"""Turn a bench_decode.py JSON into markdown tables (stdout) and a PNG of decode speedup vs batch.

    python benchmarks/report_decode.py bench_decode.json --png docs/decode_speedup_h100.png
"""

from __future__ import annotations

import argparse
import json


def _speedup(entry: dict) -> str:
    """Over dense bf16, and for FP8 variants also over dense FP8."""
    text = f"{entry['speedup']:.2f}x" if "speedup" in entry else "n/a"
    return text + (f"; {entry['speedup_fp8']:.2f}x vs dense fp8" if "speedup_fp8" in entry else "")


def _check(check: dict) -> str:
    """Worst relative errors over the checked batches."""
    return (f"{max(c['worst_linear'] for c in check.values()):.1e}, "
            f"{max(c['logits'] for c in check.values()):.1e}")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(data: dict) -> str:
    """Decode tokens/s (speedup over dense), where the decode step's time goes, prefill and weight memory."""
    variants, config = data["variants"], data["config"]
    batches = [str(b) for b in config["batches"]]
    lengths = [str(t) for t in config["prefill"]]
    out = [f"{data['device']}, {data['dtype']}, torch {data['torch']}, triton {data['triton']}: "
           f"{config['layers']} layers, hidden {config['hidden']}, intermediate {config['intermediate']}, "
           f"{config['heads']}/{config['kv_heads']} heads of {config['head_dim']}, vocab {config['vocab']}; "
           f"{'CUDA graphs' if config['cuda_graphs'] else 'eager (no CUDA graphs)'}; {config['notes']}.", "",
           f"Decode tokens/s (speedup over dense), context {config['context']}:", "",
           _row(["variant", *(f"batch {b}" for b in batches)]), "|" + " --- |" * (1 + len(batches))]
    for name, result in variants.items():
        out.append(_row([name, *(f"{result['decode'][b]['tokens_per_s']:.1f} ({_speedup(result['decode'][b])})"
                                 for b in batches)]))
    out += ["", "Decode step ms, of which the Linears alone (GEMM share); the rest is attention, norms, RoPE, "
                "embedding and lm_head:", "",
            _row(["variant", *(f"batch {b}" for b in batches)]), "|" + " --- |" * (1 + len(batches))]
    for name, result in variants.items():
        cells = [f"{d['step_ms']:.2f} ms, Linears {d['linear_ms']:.2f} ms ({d['gemm_share']:.0%})"
                 for d in (result["decode"][b] for b in batches)]
        out.append(_row([name, *cells]))
    out += ["", "Prefill (batch 1, eager) tokens/s (speedup) and weight memory:", "",
            _row(["variant", *(f"prefill {t}" for t in lengths), "Linear weights GiB", "model GiB",
                  "check vs unpacked: worst Linear, logits"]), "|" + " --- |" * (4 + len(lengths))]
    for name, result in variants.items():
        check = result.get("check_rel_err")
        out.append(_row([name, *(f"{result['prefill'][t]['tokens_per_s']:.0f} ({_speedup(result['prefill'][t])})"
                                 for t in lengths),
                         f"{result['linear_bytes'] / 2**30:.3f}", f"{result['model_bytes'] / 2**30:.3f}",
                         _check(check) if check else "-"]))
    return "\n".join(out)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = data["config"]["batches"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in data["variants"].items():
        ax.plot(batches, [result["decode"][str(b)].get("speedup", float("nan")) for b in batches], marker="o",
                label=name if name == "dense" else f"Spense {name}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (tokens per decode step)")
    ax.set_ylabel("decode speedup over dense (F.linear: cuBLAS on GPU)")
    ax.set_title(f"End-to-end decode, context {data['config']['context']} ({data['device']}, {data['dtype']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--png")
    args = parser.parse_args()
    with open(args.json) as handle:
        data = json.load(handle)
    print(tables(data))
    if args.png:
        plot(data, args.png)


if __name__ == "__main__":
    main()
