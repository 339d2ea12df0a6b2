"""Serving-test helpers: a server start that must fail, and the dense reference the server is compared with."""

from __future__ import annotations

import pathlib
import subprocess

import torch

from vllm_spense.local_server import STARTUP_SECONDS, free_port, server_command, server_env


def failed_start_output(model: pathlib.Path, *extra: str, log: pathlib.Path, timeout: int = STARTUP_SECONDS) -> str:
    """Run the server on a checkpoint that must not load; return its output after it exits by itself."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.run(server_command(model, port, *extra), env=server_env(), stdout=out,
                                 stderr=subprocess.STDOUT, timeout=timeout)
    assert process.returncode != 0, "the server started on a broken checkpoint"
    return log.read_text(errors="replace")


def greedy_reference(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding in transformers by full recomputation (no KV cache): the plainest reference."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
    return ids[0, len(prompt_ids):].tolist()
