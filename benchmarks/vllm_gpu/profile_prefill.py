"""Where a lone prefill's time goes under vLLM: the offline ``vllm.LLM`` with its engine in this process,
a checkpoint folder, prompts of ``--length`` random tokens (one or more lengths, each one chunk: vLLM's
token budget and context are raised to the longest) and one output token each.

    python3 profile_prefill.py /tmp/vm/spense --length 2048 4064 --json OUT.json

Per length: the wall time of ``--repeats`` prefills (after two), then, for one more under ``torch.profiler``,
the summed time of the GPU kernels (how much of the wall time the GPU was busy) and the table of the ops and
kernels with the most GPU time. The JSON holds one result per length (``results``).
``SPENSE_SPARSE_CORES=0`` in the environment takes the expansion path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--length", type=int, nargs="+", default=[2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, for the profiler
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # the device image has no flashinfer
    from vllm import LLM, SamplingParams

    longest = max(args.length)
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=max(4096, longest + 1),
              max_num_batched_tokens=max(8192, longest), gpu_memory_utilization=0.5, max_num_seqs=8,
              enable_prefix_caching=False, seed=0, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def prefill(length: int) -> float:
        prompt = {"prompt_token_ids": [rng.randrange(2, 100000) for _ in range(length)]}
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    results = [measure(prefill, length, args.repeats) for length in args.length]
    with open(args.json, "w") as handle:
        json.dump({"model": args.model, "sparse_cores_env": os.environ.get("SPENSE_SPARSE_CORES", "1"),
                   "results": results}, handle, indent=1)


def measure(prefill, length: int, repeats: int) -> dict:
    """``repeats`` timed prefills of ``length`` tokens after two, then one under ``torch.profiler``."""
    prefill(length), prefill(length)
    times = [prefill(length) for _ in range(repeats)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        profiled = prefill(length)
    averages = profile.key_averages()
    kernels_s = sum(e.self_device_time_total for e in averages
                    if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    table = averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    result = {"length": length, "wall_s": times, "median_s": statistics.median(times),
              "tokens_per_s": length / statistics.median(times), "profiled_wall_s": profiled,
              "profiled_kernels_s": kernels_s, "table": table}
    print(f"prefill {length} tokens median {result['median_s'] * 1e3:.1f} ms ({result['tokens_per_s']:.0f} "
          f"tokens/s), runs {[round(t * 1e3, 1) for t in times]}; profiled {profiled * 1e3:.1f} ms wall, "
          f"kernels {kernels_s * 1e3:.1f} ms")
    print(table)
    return result


if __name__ == "__main__":
    main()
