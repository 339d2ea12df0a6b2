"""``spense-eval``: held-out perplexity of a dense model or a Spense checkpoint (run densely in transformers)."""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
from torch import nn

from vllm_spense.checkpoint import dense_state_dict, read_config
from vllm_spense.format import SpenseFormatError
from vllm_spense.offline.calibration import (EVALUATION_GENRES, CalibrationError, consecutive_windows, read_text,
                                             shakespeare_files, text_files, tokenize)
from vllm_spense.offline.models import ModelSourceError, default_model_path, load_model


def load_spense_as_dense(folder: str | pathlib.Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Spense checkpoint, every Spense layer rebuilt as a dense zero-filled weight."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config, _, state = dense_state_dict(folder)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SpenseFormatError(f"{folder}: tensors do not match the model: missing {sorted(set(missing) - tied)}, "
                                f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def load_any(path: str | pathlib.Path):
    """A Spense checkpoint, a dense model folder or a GGUF file."""
    path = pathlib.Path(path)
    if path.is_dir() and (path / "config.json").is_file() and read_config(path)[1] is not None:
        return load_spense_as_dense(path)
    return load_model(path)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every window."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(model.device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                          reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluation_windows(tokenizer, text: str | None = None, nwindows: int = 16, seqlen: int = 1024) -> torch.Tensor:
    files = text_files(text) if text else shakespeare_files(EVALUATION_GENRES)
    return consecutive_windows(tokenize(tokenizer, read_text(files)), nwindows, seqlen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spense-eval", description="Held-out perplexity of a dense or Spense model.")
    parser.add_argument("model", nargs="?", help="Spense checkpoint, model folder or .gguf (default: embedded model)")
    parser.add_argument("--text", help="evaluation text file or folder (default: Shakespeare's tragedies)")
    parser.add_argument("--nwindows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_any(args.model or default_model_path())
        ppl = perplexity(model, evaluation_windows(tokenizer, args.text, args.nwindows, args.seqlen))
    except (SpenseFormatError, ModelSourceError, CalibrationError) as error:
        print(f"spense-eval: error: {error}", file=sys.stderr)
        return 2
    print(f"perplexity {ppl:.3f} over {args.nwindows} x {args.seqlen} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
