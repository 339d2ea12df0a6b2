"""The quality table of docs/QUALITY.md: held-out perplexity of each pruning recipe on one model.

    python -m vllm_spense.offline.quality              # dense, SparseGPT 2:4, SpenseGPT rho=0.25
    python -m vllm_spense.offline.quality --rows full  # every row of docs/QUALITY.md

Every row prunes the same loaded model (weights restored between rows) in float32 on the same
calibration windows and is scored on the same held-out windows; FP8 rows are scored twice, with float
activations (W8A16) and with activations rounded to FP8 per token (W8A8, what the FP8 prefill path runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from vllm_spense.offline.calibration import CALIBRATION_GENRES, random_windows, read_text, shakespeare_files, tokenize
from vllm_spense.offline.evaluate import evaluation_windows, perplexity
from vllm_spense.format import fp8_round, fp8_scales
from vllm_spense.offline.models import decoder_layers, default_model_path, load_model, target_linears
from vllm_spense.offline.allocation import dense_plan, dense_share
from vllm_spense.offline.pruner import UNSTRUCTURED, PruneRecipe, prune_model, resolve_chunk_size

DENSE_FP8 = "dense FP8"  # a row that only rounds every targeted Linear to FP8 (per-output-channel scales)

MAIN_ROWS = {
    "dense": None,
    "SparseGPT 2:4": PruneRecipe(method="sparsegpt", dense_fraction=0.0),
    "SpenseGPT rho=0.25 error (default)": PruneRecipe(dense_fraction=0.25),
}


def full_rows() -> dict[str, PruneRecipe | str | None]:
    rows: dict[str, PruneRecipe | str | None] = {
        "dense": None,
        "magnitude 2:4": PruneRecipe(method="magnitude", dense_fraction=0.0),
        "Wanda 2:4": PruneRecipe(method="wanda", dense_fraction=0.0),
        "SparseGPT 2:4": PruneRecipe(method="sparsegpt", dense_fraction=0.0),
    }
    for rho in (0.125, 0.25):
        for selection in ("activation", "error", "random"):
            rows[f"SpenseGPT rho={rho} {selection}"] = PruneRecipe(dense_fraction=rho, selection=selection)
    for rho in (0.125, 0.25):
        rows[f"SpenseGPT budget={rho} error, adaptive allocation"] = PruneRecipe(dense_fraction=rho,
                                                                                allocation="adaptive")
    for selection in ("activation", "error"):
        rows[f"SpenseGPT rho=0.25 {selection}, natural order"] = PruneRecipe(
            dense_fraction=0.25, selection=selection, order="natural")
    rows["SparseGPT unstructured 37.5%"] = PruneRecipe(method=UNSTRUCTURED, dense_fraction=0.0, sparsity=0.375)
    rows["dense, FP8 weights (rounded)"] = DENSE_FP8
    for rho in (0.125, 0.25):
        for compensation, how in (("obs", "rounding compensated in the OBS sweep"), ("after", "rounded after")):
            rows[f"SpenseGPT rho={rho} error, FP8 weights ({how})"] = PruneRecipe(
                dense_fraction=rho, weight_dtype="fp8", fp8_compensation=compensation)
    return rows


@torch.no_grad()
def round_linears_to_fp8(model) -> None:
    """Dense FP8 reference: every targeted Linear rounded to FP8 with per-output-channel scales."""
    for layer in decoder_layers(model):
        for linear in target_linears(layer).values():
            linear.weight.copy_(fp8_round(linear.weight, fp8_scales(linear.weight)).to(linear.weight.dtype))


@contextlib.contextmanager
def fp8_activations(model):
    """W8A8 as the FP8 prefill path serves it: every targeted Linear's input rounded to FP8 per token (scale =
    the token's largest magnitude / 448, ``format.fp8_scales``) while the context is open."""
    def round_input(module, args):
        x = args[0]
        rows = x.reshape(-1, x.shape[-1]).float()
        return (fp8_round(rows, fp8_scales(rows)).to(x.dtype).reshape(x.shape), *args[1:])

    handles = [linear.register_forward_pre_hook(round_input)
               for layer in decoder_layers(model) for linear in target_linears(layer).values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def overall_sparsity(recipe: PruneRecipe | str | None, dense_share: float) -> float:
    """Share of the pruned layers' weights set to zero (``dense_share``: of the weights kept dense)."""
    if not isinstance(recipe, PruneRecipe):
        return 0.0
    if recipe.sparsity is not None:
        return recipe.sparsity
    return 0.5 * (1.0 - dense_share)


def load_setting(model_path=None, nsamples: int = 64, seqlen: int = 512, eval_windows: int = 16,
                 eval_seqlen: int = 1024, seed: int = 0) -> tuple:
    """(model, calibration windows, held-out windows) of the quality table: one setting for every row."""
    model, tokenizer = load_model(model_path or default_model_path())
    calibration = random_windows(tokenize(tokenizer, read_text(shakespeare_files(CALIBRATION_GENRES))),
                                 nsamples, seqlen, seed)
    return model, calibration, evaluation_windows(tokenizer, None, eval_windows, eval_seqlen)


def run_table(rows: dict[str, PruneRecipe | str | None], model_path=None, nsamples: int = 64, seqlen: int = 512,
              eval_windows: int = 16, eval_seqlen: int = 1024, device: str = "cpu", seed: int = 0) -> list[dict]:
    model, calibration, held_out = load_setting(model_path, nsamples, seqlen, eval_windows, eval_seqlen, seed)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for label, recipe in rows.items():
        model.load_state_dict(original)
        start = time.time()
        share = 0.0
        if recipe == DENSE_FP8:
            round_linears_to_fp8(model)
        elif recipe is not None:
            chunk_size = resolve_chunk_size(model, recipe)
            plan = dense_plan(model, calibration, recipe, chunk_size, device=torch.device(device), batch_size=8)
            share = dense_share(plan, model, chunk_size)
            prune_model(model, calibration, recipe, device=device, save_dtype=torch.float32, plan=plan)
        pruned_s = time.time() - start
        ppl = perplexity(model.to(device), held_out)
        results.append({"row": label, "sparsity": overall_sparsity(recipe, share), "perplexity": ppl,
                        "prune_seconds": round(pruned_s, 1)})
        if recipe == DENSE_FP8 or getattr(recipe, "weight_dtype", None) == "fp8":
            with fp8_activations(model):  # the same FP8 weights with the activations FP8 too (W8A8)
                results[-1]["perplexity_w8a8"] = perplexity(model, held_out)
        model.to("cpu")
        print(json.dumps(results[-1]), flush=True)
    return results


def markdown(results: list[dict]) -> str:
    """The table, with the share of SparseGPT 2:4's perplexity increase each row removes."""
    by_row = {r["row"]: r["perplexity"] for r in results}
    dense, sparsegpt = by_row.get("dense"), by_row.get("SparseGPT 2:4")
    lines = ["| recipe | overall sparsity | perplexity | SparseGPT 2:4 increase removed |",
             "| --- | ---: | ---: | ---: |"]
    for r in results:
        removed = ""
        if dense is not None and sparsegpt is not None and r["row"] not in ("dense", "SparseGPT 2:4"):
            removed = f"{100 * (sparsegpt - r['perplexity']) / (sparsegpt - dense):.0f}%"
        lines.append(f"| {r['row']} | {r['sparsity']:.1%} | {r['perplexity']:.2f} | {removed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", choices=("main", "full"), default="main")
    parser.add_argument("--model", help="model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", help="keep only rows whose name contains one of these strings")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    rows = MAIN_ROWS if args.rows == "main" else full_rows()
    if args.only:
        rows = {label: recipe for label, recipe in rows.items() if any(part in label for part in args.only)}
    results = run_table(rows, args.model, args.nsamples, args.seqlen, args.eval_windows, args.eval_seqlen,
                        args.device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
