"""``spense-prune``: a Hugging Face model folder or GGUF file in, a Spense checkpoint folder out."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pathlib
import sys

import torch

from vllm_spense.format import DEFAULT_IGNORE, SpenseFormatError, SpenseQuantConfig
from vllm_spense.offline.calibration import (CALIBRATION_GENRES, CalibrationError, random_windows, read_text,
                                             shakespeare_files, text_files, tokenize)
from vllm_spense.offline.models import ModelSourceError, decoder_layers, default_model_path, load_model
from vllm_spense.offline.pruner import METHODS, PruneError, PruneRecipe, prune_model, resolve_chunk_size
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
    parser.add_argument("--dense-fraction", type=float, default=0.25, help="share of input-channel groups kept "
                        "dense; 0 gives plain 2:4 (default 0.25)")
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


def run(args: argparse.Namespace) -> pathlib.Path:
    recipe = PruneRecipe(method=args.method, dense_fraction=args.dense_fraction, selection=args.selection,
                         order=args.order, chunk_size=args.chunk_size, blocksize=args.blocksize, damp=args.damp,
                         seed=args.seed)
    if args.nsamples < 1 or args.seqlen < 2:
        raise PruneError(f"--nsamples must be >= 1 and --seqlen >= 2, found {args.nsamples} and {args.seqlen}")
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise OutputError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    model_path = pathlib.Path(args.model) if args.model else default_model_path()
    calibration_files = text_files(args.calibration) if args.calibration else shakespeare_files(CALIBRATION_GENRES)
    model, tokenizer = load_model(model_path)
    chunk_size = resolve_chunk_size(model, recipe)
    windows = random_windows(tokenize(tokenizer, read_text(calibration_files)), args.nsamples, args.seqlen, args.seed)
    save_dtype = SAVE_DTYPES[args.save_dtype] if args.save_dtype != "auto" else _source_dtype(model_path)
    quant = SpenseQuantConfig(
        dense_fraction=recipe.dense_fraction, chunk_size=chunk_size, ignore=DEFAULT_IGNORE,
        pruning={"method": recipe.method, "selection": recipe.selection, "order": recipe.order,
                 "nsamples": args.nsamples, "seqlen": args.seqlen, "damp": recipe.damp, "seed": recipe.seed})
    run_settings = {"model": str(model_path.resolve()), "calibration_sha256": _files_digest(calibration_files),
                    "save_dtype": str(save_dtype), "quantization_config": quant.to_dict(),
                    "blocksize": recipe.blocksize, "batch_size": args.batch_size}
    writer = CheckpointWriter(out, run_settings, len(decoder_layers(model)), overwrite=args.overwrite)
    writer.open()
    prune_model(model, windows, recipe, device=args.device, save_dtype=save_dtype, batch_size=args.batch_size,
                store=writer)
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
