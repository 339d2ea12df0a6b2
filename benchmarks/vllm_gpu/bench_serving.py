"""Decode and prefill speed of real ``vllm serve`` on the GPU: dense vs Spense checkpoints, one call.

    python benchmarks/vllm_gpu/bench_serving.py --models /tmp/vm/dense /tmp/vm/spense --json out.json
    python benchmarks/vllm_gpu/bench_serving.py --models /tmp/vm/dense:fp8 --json out.json   # vLLM's own FP8
    python benchmarks/vllm_gpu/bench_serving.py --json out.json --models /tmp/vm/dense /tmp/vm/spense \
        /tmp/vm/spense@SPENSE_OVERLAP_REGIONS=1 /tmp/vm/spense   # an A/B in both orders, one call

A model is ``folder[:method][@VAR=VALUE[,VAR=VALUE...]]``: vLLM's own ``--quantization`` method and the
server's extra environment. A spec given twice is started and measured twice (filed as ``name#2``): batch
128 and prefill move by 10-20% between servers of the same code (on H200 machines, docs/PERFORMANCE.md), so
an A/B should run each side more than once, in both orders.

For each checkpoint: start vLLM's OpenAI server (CUDA graphs and torch.compile as vLLM does by default;
the plugin is found through its entry point, the Spense method through config.json), then with an
async OpenAI client: ``batch`` concurrent streamed completions of ``--prompt-tokens`` random token ids and
``--max-tokens`` generated tokens each (``ignore_eos``). Decode tokens/s = batch x the median per-request
rate (tokens after the first / time from first to last token, ``per_request_rate``); at large batches
some prompts still wait for prefill while others decode, so it mixes the two, and ``steady_tokens_per_s``
counts only the window in which every request decodes (``steady_decode_rate``; likely none at 128 x
1024-token prompts with 128 output tokens, where an H200 server's log showed prompts still waiting 10 s into
a run: longer outputs make one);
prefill tokens/s = prompt tokens / time to first token of a lone request, after one untimed request of that
length (a serving engine pays its first-use costs once: Spense builds a cuSPARSELt plan per row count).
Median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import pathlib
import random
import re
import statistics
import sys
import time

from vllm_spense.local_server import VllmServer, free_port


def server_command(model: str, port: int, max_seqs: int, quantization: str | None = None) -> list[str]:
    sizes = sorted({1, 2, 4, 8, 16, 32, max_seqs})
    extra = ["--quantization", quantization] if quantization else []
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
            "spense", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "4096",
            "--max-num-seqs", str(max_seqs), "--gpu-memory-utilization", "0.85", "--seed", "0",
            "--no-enable-prefix-caching", "--compilation-config", json.dumps({"cudagraph_capture_sizes": sizes}),
            *extra]


def model_spec(spec: str) -> tuple[str, str | None, dict[str, str], str]:
    """``folder[:method][@VAR=VALUE,...]`` (vLLM's own ``--quantization``, e.g. ``dense:fp8``; the server's
    extra environment, e.g. ``spense@SPENSE_OVERLAP_REGIONS=1``): (folder, method or None, environment, the
    name results are filed under)."""
    model, _, settings = spec.partition("@")
    folder, _, quantization = model.partition(":")
    env = {}
    for setting in filter(None, settings.split(",")):
        name, equals, value = setting.partition("=")
        if not equals or not name:
            raise ValueError(f"model {spec!r}: an environment setting must read VAR=VALUE, found {setting!r}")
        env[name] = value
    name = pathlib.Path(folder).name + (f"_{quantization}" if quantization else "") + (f"@{settings}" if env else "")
    return folder, quantization or None, env, name


def unique_name(name: str, taken) -> str:
    """``name``, or ``name#2``, ``name#3``... when a spec is measured again."""
    count = 1
    while (name if count == 1 else f"{name}#{count}") in taken:
        count += 1
    return name if count == 1 else f"{name}#{count}"


@dataclasses.dataclass
class Stream:
    """One streamed completion: when it was sent, when each chunk of text arrived, how many tokens it had."""
    start: float
    arrivals: list[float]
    tokens: int

    @property
    def first(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def last(self) -> float | None:
        return self.arrivals[-1] if self.arrivals else None


async def stream_one(client, prompt: list[int], max_tokens: int) -> Stream:
    start = time.perf_counter()
    arrivals, tokens = [], 0
    stream = await client.completions.create(model="spense", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            arrivals.append(now)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Stream(start, arrivals, tokens)


def per_request_rate(runs: list[Stream]) -> float:
    """The batch times the median request's own rate (tokens after its first over first-to-last time). While
    some prompts of a large batch still wait for prefill, others decode, so this mixes prefill into decode."""
    rates = [(run.tokens - 1) / (run.last - run.first) for run in runs
             if run.tokens > 1 and run.last > run.first]
    return len(runs) * statistics.median(rates)


def steady_decode_rate(runs: list[Stream]) -> float | None:
    """Tokens/s of the whole batch over the window in which every request decodes (from the last first token
    to the first last token), so no prompt's prefill falls inside it; None where there is no such window (the
    first requests finished before the last started: longer outputs make one). A request's tokens are
    spread evenly over its chunks (one token a chunk, as vLLM streams by default)."""
    if not runs or any(len(run.arrivals) < 2 for run in runs):
        return None
    begin, end = max(run.first for run in runs), min(run.last for run in runs)
    if end <= begin:
        return None
    tokens = sum(run.tokens / len(run.arrivals) * sum(begin < t <= end for t in run.arrivals) for run in runs)
    return tokens / (end - begin)


async def measure(url: str, vocab: int, args) -> dict:
    import openai

    # Closed inside the event loop: left to the garbage collector, its connections raised "Event loop is
    # closed" after asyncio.run returned (at 128-256 concurrent requests). Two retries: at 256 concurrent
    # streams a connection was dropped (httpx ReadError) in two runs on an H200 machine. The client retries
    # a request whose response has not started (a drop mid-stream still ends the run); a retried request's
    # rate is timed on its own tokens, so it only joins its batch late.
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=600) as client:
        return await measure_with(client, vocab, args)


async def measure_with(client, vocab: int, args) -> dict:
    """Decode tokens/s at each batch of concurrent requests, then time to first token at each prefill length."""
    rng = random.Random(0)

    def prompt(length):
        return [rng.randrange(2, vocab) for _ in range(length)]

    await asyncio.gather(*(stream_one(client, prompt(64), 8) for _ in range(4)))  # warm up
    result = {"decode": {}, "prefill": {}}
    for batch in args.batches:
        rates, steady = [], []
        for _ in range(args.repeats):
            runs = await asyncio.gather(*(stream_one(client, prompt(args.prompt_tokens), args.max_tokens)
                                          for _ in range(batch)))
            rates.append(per_request_rate(runs))
            steady.append(steady_decode_rate(runs))
        windows = [rate for rate in steady if rate is not None]
        result["decode"][str(batch)] = {"tokens_per_s": statistics.median(rates), "runs": rates,
                                        "steady_tokens_per_s": statistics.median(windows) if windows else None,
                                        "steady_runs": steady}
        print(f"  decode batch {batch}: {statistics.median(rates):.1f} tokens/s"
              + (f" (all decoding: {statistics.median(windows):.1f})" if windows else ""), flush=True)
    for length in args.prefill:
        times = []
        await stream_one(client, prompt(length), 1)  # untimed: first-use costs at this size (cuSPARSELt's plan)
        for _ in range(args.repeats):
            run = await stream_one(client, prompt(length), 1)
            times.append(run.first - run.start)
        result["prefill"][str(length)] = {"tokens_per_s": length / statistics.median(times), "ttft_s": times}
        print(f"  prefill {length}: {length / statistics.median(times):.0f} tokens/s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", default="/tmp")
    args = parser.parse_args(argv)
    import torch
    import vllm

    results = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "logs")}, "models": {}}
    for spec in args.models:
        model, quantization, env, name = model_spec(spec)
        name = unique_name(name, results["models"])
        vocab = json.loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]
        log = pathlib.Path(args.logs) / f"vllm_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"  # plain file names
        port = free_port()
        start = time.perf_counter()
        print(f"{name}: starting vLLM", flush=True)
        try:
            command = server_command(model, port, max(args.batches), quantization)
            with VllmServer(None, log=log, command=command, port=port,
                            env={"VLLM_USE_FLASHINFER_SAMPLER": "0", **env}) as _:
                startup = time.perf_counter() - start
                print(f"{name}: healthy after {startup:.0f} s", flush=True)
                measured = asyncio.run(measure(f"http://127.0.0.1:{port}", vocab, args))
        except RuntimeError as error:
            print(f"{name}: FAILED\n{error}", flush=True)
            results["models"][name] = {"error": str(error)[-4000:]}
            continue
        results["models"][name] = {"startup_s": startup, **measured}
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    base = results["models"].get("dense", {})
    for name, data in results["models"].items():
        if "decode" in data and "decode" in base:
            data["decode_speedup"] = {b: data["decode"][b]["tokens_per_s"] / base["decode"][b]["tokens_per_s"]
                                      for b in data["decode"]}
            data["prefill_speedup"] = {n: data["prefill"][n]["tokens_per_s"] / base["prefill"][n]["tokens_per_s"]
                                       for n in data["prefill"]}
            data["steady_decode_speedup"] = {
                b: data["decode"][b]["steady_tokens_per_s"] / base["decode"][b]["steady_tokens_per_s"]
                for b in data["decode"] if data["decode"][b]["steady_tokens_per_s"]
                and base["decode"][b]["steady_tokens_per_s"]}
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps({n: {k: v for k, v in d.items() if k.endswith("speedup")} for n, d in results["models"].items()}))
    return 0 if all("error" not in d for d in results["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
