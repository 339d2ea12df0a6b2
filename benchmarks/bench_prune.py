"""Pruner speed on the GPU: seconds per decoder layer and peak GPU memory on a Qwen3-8B-shaped model.

    python benchmarks/bench_prune.py --layers 2 --json out.json

Random weights (bf16) with Qwen3-8B's layer shapes (hidden 4096, intermediate 12288, 32 query / 8 KV
heads of 128) and random calibration tokens: pruning cost does not depend on the values. The model is
built on the CPU and the driver moves one layer at a time to the GPU, exactly as ``spense-prune``
does; nothing is written to disk (the checkpoint writer is left out of the timing).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vllm_spense.offline.pruner import PruneRecipe, prune_model

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=151936, max_position_embeddings=4096, rope_theta=1_000_000.0)
FULL_MODEL_LAYERS = 36


def build_model(layers: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(num_hidden_layers=layers, **QWEN3_8B)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():  # default init is tiny; use realistic weight scales
        param.data.normal_(0, 0.02)
    return model.eval()


def time_recipe(model, recipe: PruneRecipe, nsamples: int, seqlen: int) -> dict:
    calibration = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    stamps = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()

    def on_layer(index, stats):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    prune_model(model, calibration, recipe, device="cuda", save_dtype=torch.bfloat16, batch_size=8, on_layer=on_layer)
    per_layer = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    # The first layer also pays for capturing the calibration activations; report both.
    steady = per_layer[1:] or per_layer
    return {"recipe": f"{recipe.method} rho={recipe.dense_fraction} {recipe.selection}",
            "nsamples": nsamples, "seqlen": seqlen, "seconds_per_layer": [round(s, 2) for s in per_layer],
            "steady_seconds_per_layer": round(sum(steady) / len(steady), 2),
            "projected_36_layers_minutes": round((per_layer[0] + sum(steady) / len(steady) * (FULL_MODEL_LAYERS - 1)) / 60, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    results = []
    runs = [(PruneRecipe(dense_fraction=0.25, selection="activation"), 64, 512),
            (PruneRecipe(dense_fraction=0.25, selection="error"), 64, 512),
            (PruneRecipe(dense_fraction=0.25, selection="activation"), 128, 2048)]
    for recipe, nsamples, seqlen in runs:
        model = build_model(args.layers)
        results.append(time_recipe(model, recipe, nsamples, seqlen))
        print(json.dumps(results[-1]), flush=True)
        del model
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
                      handle, indent=2)
    print("| recipe | calibration | s/layer (steady) | 36 layers (min) | peak GPU GiB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['recipe']} | {r['nsamples']} x {r['seqlen']} | {r['steady_seconds_per_layer']} | "
              f"{r['projected_36_layers_minutes']} | {r['peak_gpu_gib']} |")


if __name__ == "__main__":
    main()
