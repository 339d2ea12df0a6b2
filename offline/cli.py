"""``spense-prune``: a Hugging Face model folder or GGUF file in, a Spense checkpoint folder out."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import sys

import torch

from vllm_spense.format import (DEFAULT_IGNORE, GROUP_SIZE, SpenseFormatError, SpenseQuantConfig,
                                dense_fraction_for_bytes, stored_bytes_ratio)
from vllm_spense.offline.allocation import ALLOCATIONS, dense_plan, dense_share
from vllm_spense.offline.calibration import (CALIBRATION_GENRES, CalibrationError, random_windows, read_text,
                                             shakespeare_files, text_files, tokenize)
from vllm_spense.offline.models import ModelSourceError, decoder_layers, default_model_path, load_model
from vllm_spense.offline.pruner import (FP8_COMPENSATIONS, METHODS, WEIGHT_DTYPES, PruneError, PruneRecipe,
                                        prune_model, resolve_chunk_size)
from vllm_spense.offline.selection import SELECTIONS
from vllm_spense.offline.sparsegpt import ORDERS, HessianError
from vllm_spense.offline.writer import CheckpointWriter, OutputError

logger = logging.getLogger("spense-prune")
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
USER_ERRORS = (CalibrationError, ModelSourceError, PruneError, SpenseFormatError, HessianError, OutputError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spense-prune", description="One-shot SpenseGPT pruning into the Spense format (docs/FORMAT.md).")
    parser.add_argument("model", nargs="?", help="Hugging Face model folder or .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    parser.add_argument("--calibration", help="calibration text file or folder of .txt/.md files "
                        "(default: Shakespeare's comedies and histories)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--dense-budget", "--dense-fraction", dest="dense_budget", type=float, default=0.25,
                        help="share of the pruned layers' weights kept dense; 0 gives plain 2:4 (default 0.25)")
    budget.add_argument("--target-bytes", type=float, help="instead of a budget: the pruned layers' stored bytes "
                        "(what a decode step reads) as a share of their dense bytes, e.g. 0.7; the largest budget "
                        "that fits is used")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                        help="uniform: every matrix keeps the budget's fraction; adaptive: a fraction per decoder "
                        "layer from a first pass that measures how much pruning each layer raises the calibration "
                        "loss (the whole model then runs on --device; docs/QUALITY.md)")
    parser.add_argument("--method", choices=METHODS, default="spensegpt")
    parser.add_argument("--selection", choices=SELECTIONS, default="error", help="how dense groups are chosen (error: best measured, docs/QUALITY.md)")
    parser.add_argument("--order", choices=ORDERS, default="dense-last", help="OBS sweep order (default: dense "
                        "groups last, so they absorb every pruned group's error)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, help="channels per balanced chunk (default: 128, or the largest "
                        "power of two that divides every layer's input width)")
    parser.add_argument("--damp", type=float, default=0.01, help="Hessian damping, relative to its mean diagonal")
    parser.add_argument("--blocksize", type=int, default=128, help="columns per lazy OBS update")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    parser.add_argument("--save-dtype", choices=("auto", *SAVE_DTYPES), default="auto",
                        help="dtype of the written weights (auto: the model's own, bfloat16 for GGUF)")
    parser.add_argument("--weight-dtype", choices=WEIGHT_DTYPES,
                        help="store the pruned Linears' values as FP8 (e4m3) with per-output-channel scales "
                             "(default: in --save-dtype)")
    parser.add_argument("--fp8-compensation", choices=FP8_COMPENSATIONS, default="obs",
                        help="obs: round inside the OBS sweep and compensate the rounding error (default); "
                             "after: round the finished pruned weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def _source_dtype(model_path: pathlib.Path) -> torch.dtype:
    if model_path.is_dir():
        config = json.loads((model_path / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype")
        if name in SAVE_DTYPES:
            return SAVE_DTYPES[name]
    return torch.bfloat16


def _files_digest(files: list[pathlib.Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def output_config(model, quant: SpenseQuantConfig, save_dtype: torch.dtype) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # e.g. the GGUF loader's
    config["dtype"] = str(save_dtype).removeprefix("torch.")
    config["quantization_config"] = quant.to_dict()
    return config


def non_layer_tensors(model, save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and an untied lm_head: everything outside the decoder layers."""
    layers = decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    prefixes = tuple(names[layer] + "." for layer in layers)
    tied = getattr(model.config, "tie_word_embeddings", False)
    rest = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight"):
            continue
        rest[key] = (value.to(save_dtype) if value.is_floating_point() else value).contiguous()
    return rest


def budget_for_target_bytes(target: float, value_bytes: int, allocation: str, chunk_size: int) -> float:
    """The largest dense budget whose pruned layers store at most ``target`` times their dense bytes."""
    floor = stored_bytes_ratio(0.0, value_bytes)
    if not floor <= target < 1.0:
        raise PruneError(f"--target-bytes must be in [{floor:.4f}, 1): plain 2:4 stores {floor:.4f}x the dense "
                         f"bytes at {value_bytes} bytes per value, found {target}")
    budget = dense_fraction_for_bytes(target, value_bytes)
    if allocation == "uniform":  # a whole, even number of dense groups per chunk
        step = 2 * GROUP_SIZE / chunk_size
        budget = math.floor(budget / step + 1e-9) * step
    return budget


def run(args: argparse.Namespace) -> pathlib.Path:
    if args.nsamples < 1 or args.seqlen < 2:
        raise PruneError(f"--nsamples must be >= 1 and --seqlen >= 2, found {args.nsamples} and {args.seqlen}")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    model_path = pathlib.Path(args.model) if args.model else default_model_path()
    calibration_files = text_files(args.calibration) if args.calibration else shakespeare_files(CALIBRATION_GENRES)
    save_dtype = SAVE_DTYPES[args.save_dtype] if args.save_dtype != "auto" else _source_dtype(model_path)
    model, tokenizer = load_model(model_path)
    recipe = PruneRecipe(method=args.method, dense_fraction=args.dense_budget, allocation=args.allocation,
                         selection=args.selection, order=args.order, chunk_size=args.chunk_size,
                         blocksize=args.blocksize, damp=args.damp, seed=args.seed, weight_dtype=args.weight_dtype,
                         fp8_compensation=args.fp8_compensation)
    value_bytes = 1 if recipe.weight_dtype == "fp8" else save_dtype.itemsize
    if args.target_bytes is not None:
        budget = budget_for_target_bytes(args.target_bytes, value_bytes, args.allocation,
                                         resolve_chunk_size(model, recipe, widths_only=True))
        recipe = dataclasses.replace(recipe, dense_fraction=budget)
        logger.info("--target-bytes %g at %s: dense budget %g", args.target_bytes, save_dtype, budget)
    chunk_size = resolve_chunk_size(model, recipe)
    windows = random_windows(tokenize(tokenizer, read_text(calibration_files)), args.nsamples, args.seqlen, args.seed)
    plan = dense_plan(model, windows, recipe, chunk_size, device=torch.device(args.device),
                      batch_size=args.batch_size)
    share = dense_share(plan, model, chunk_size)
    logger.info("dense share %.4f of the pruned weights (budget %g, %s): they store %.4fx their dense bytes",
                share, recipe.dense_fraction, recipe.allocation, stored_bytes_ratio(share, value_bytes))
    pruning = {"method": recipe.method, "selection": recipe.selection, "order": recipe.order,
               "allocation": recipe.allocation, "dense_share": round(share, 6), "nsamples": args.nsamples,
               "seqlen": args.seqlen, "damp": recipe.damp, "seed": recipe.seed}
    if args.target_bytes is not None:
        pruning["target_bytes"] = args.target_bytes
    if recipe.weight_dtype is not None:
        pruning["fp8_compensation"] = recipe.fp8_compensation
    per_layer = recipe.allocation == "adaptive"
    quant = SpenseQuantConfig(
        dense_fraction=recipe.dense_fraction, chunk_size=chunk_size, ignore=DEFAULT_IGNORE, pruning=pruning,
        dense_fractions={name: d * GROUP_SIZE / chunk_size for name, d in plan.items()} if per_layer else {},
        weight_dtype="float8_e4m3fn" if recipe.weight_dtype == "fp8" else None)
    run_settings = {"model": str(model_path.resolve()), "calibration_sha256": _files_digest(calibration_files),
                    "save_dtype": str(save_dtype), "quantization_config": quant.to_dict(),
                    "blocksize": recipe.blocksize, "batch_size": args.batch_size}
    writer = CheckpointWriter(out, run_settings, len(decoder_layers(model)), overwrite=args.overwrite)
    writer.open()
    prune_model(model, windows, recipe, device=args.device, save_dtype=save_dtype, batch_size=args.batch_size,
                store=writer, plan=plan)
    return writer.finish(non_layer_tensors(model, save_dtype), output_config(model, quant, save_dtype), tokenizer)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except USER_ERRORS as error:
        print(f"spense-prune: error: {error}", file=sys.stderr)
        return 2
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
