"""Writing a Spense checkpoint so that it is never half-written and a crashed run resumes.

Everything goes to ``<out>.partial/``: one safetensors shard per finished decoder layer (written to a
temporary name, then renamed), the activations entering the next layer, and ``run.json`` holding the
command's settings. A rerun with the same settings resumes after the last finished layer. Only when
every layer is done are the remaining tensors, config.json, the tokenizer and the shard index
written, and the folder renamed to ``<out>`` in one step.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RUN_FILE = "run.json"
INPUTS_FILE = "next_layer_inputs.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OutputError(ValueError):
    """The output folder cannot be written as asked; the message says what to do."""


def _atomic_save(tensors: dict[str, torch.Tensor], path: pathlib.Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # readable by a serving user other than the pruner's
    os.replace(tmp, path)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_safetensors(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


class CheckpointWriter:
    def __init__(self, out: str | pathlib.Path, run: dict, num_layers: int, overwrite: bool = False):
        self.out = pathlib.Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.num_layers = num_layers
        self.run = run
        if self.out.exists() and not overwrite:
            raise OutputError(f"output folder {self.out} already exists; choose another --out or pass --overwrite")

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.num_layers + 1:05d}.safetensors"

    def open(self) -> None:
        """Create the partial folder, or check that the one there is from the same command."""
        run_file = self.partial / RUN_FILE
        if self.partial.exists():
            try:
                previous = json.loads(run_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                previous = None
            if previous != self.run:
                raise OutputError(
                    f"{self.partial} holds an unfinished run with other settings; rerun that exact command to "
                    f"resume it, or delete {self.partial} to start over")
            return
        self.partial.mkdir(parents=True)
        _atomic_write_text(run_file, json.dumps(self.run, indent=2, sort_keys=True))

    def resume_point(self) -> tuple[int, torch.Tensor | None]:
        path = self.partial / INPUTS_FILE
        if not path.exists():
            return 0, None
        tensors, metadata = _read_safetensors(path)
        done = int(metadata["finished_layer"]) + 1
        missing = [i for i in range(done) if not (self.partial / self.shard_name(i)).exists()]
        if missing:
            raise OutputError(f"{self.partial} is inconsistent (layers {missing} missing); delete it to start over")
        return done, tensors["hidden_states"]

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return _read_safetensors(self.partial / self.shard_name(index))[0]

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], next_inputs: torch.Tensor) -> None:
        # The shard first, then the activations that mark it finished: a crash between the two redoes it.
        _atomic_save(tensors, self.partial / self.shard_name(index))
        _atomic_save({"hidden_states": next_inputs.detach().cpu().contiguous()}, self.partial / INPUTS_FILE,
                     metadata={"finished_layer": str(index)})

    def finish(self, rest: dict[str, torch.Tensor], config: dict, tokenizer=None) -> pathlib.Path:
        """Write what is not in a layer shard, the index and config, then publish the folder."""
        rest_name = self.shard_name(self.num_layers)
        _atomic_save(rest, self.partial / rest_name)
        weight_map = {}
        for index in range(self.num_layers + 1):
            name = self.shard_name(index)
            with safe_open(str(self.partial / name), framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), name))
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_text(self.partial / INDEX_FILE, json.dumps(index, indent=2))
        _atomic_write_text(self.partial / "config.json", json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.partial))
        (self.partial / INPUTS_FILE).unlink(missing_ok=True)
        (self.partial / RUN_FILE).unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.partial, self.out)
        return self.out
