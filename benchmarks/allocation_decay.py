"""Diagnostic: how the adaptive plan's perplexity depends on the decay of its loss model.

    python benchmarks/allocation_decay.py --decays 1.0 3.2 [--budget 0.25]

One sensitivity pass (``allocation.measure_sensitivity``, calibration windows only), then for each decay
the plan ``adaptive_plan`` makes from the same loss rises, a SpenseGPT prune with it and the held-out
perplexity of docs/QUALITY.md. It reads the evaluation text, so it only explains the shipped method (which
measures its decay on calibration data); it must never choose it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from vllm_spense.offline import quality
from vllm_spense.offline.allocation import adaptive_plan, measure_sensitivity
from vllm_spense.offline.pruner import PruneRecipe, prune_model, resolve_chunk_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decays", nargs="+", type=float, required=True)
    parser.add_argument("--budget", type=float, default=0.25)
    args = parser.parse_args()
    model, calibration, held_out = quality.load_setting()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = PruneRecipe(dense_fraction=args.budget, allocation="adaptive")
    chunk_size = resolve_chunk_size(model, recipe)
    layers = measure_sensitivity(model, calibration, recipe, chunk_size, device=torch.device("cpu"), batch_size=8)
    print(json.dumps({"measured_decay": layers[0].decay}), flush=True)
    for decay in args.decays:
        model.load_state_dict(original)
        plan = adaptive_plan([dataclasses.replace(s, decay=decay) for s in layers], args.budget, chunk_size)
        prune_model(model, calibration, recipe, save_dtype=torch.float32, plan=plan)
        dense = [plan[s.linears[0]] for s in layers]
        print(json.dumps({"decay": decay, "dense_groups_per_chunk": dense,
                          "perplexity": quality.perplexity(model, held_out)}), flush=True)


if __name__ == "__main__":
    main()
