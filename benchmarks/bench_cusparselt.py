"""cuSPARSELt for the 2:4 region at prefill, in parts, on the bench_gemm shapes (rho = 0.25, bf16):

    python benchmarks/bench_cusparselt.py --json OUT.json [--algs | --layout | --host | --permute | --search]
        [--shapes ...] [--ms ...]

Per shape and M: cuBLAS on the whole weight; the Spense prefill path (``spense_gemm``) and its parts: x's
permutation, the dense region on cuBLAS, the 2:4 region on cuSPARSELt through ``kernels/cusparselt.py``
(the algorithm ``_alg_id`` picked), and the same columns dense on cuBLAS. Then the same cuSPARSELt call
on those columns copied contiguous (row stride Ks, not K), eagerly and under a CUDA graph, and torch's 2:4
``F.linear`` on them under a CUDA graph (which hides its per-call plan); host time per call of our
cuSPARSELt call and of torch's ``torch._cslt_sparse_mm``, which builds a plan every call. With ``--algs``:
every cuSPARSELt algorithm id on the 2:4 region instead; with ``--layout``, the path with y written
features-major and transposed back (``transposed_layout``); with ``--host``, the host time of the custom
op and of each step of the path (``host_parts``) and where the op's own Python spends it (``host_profile``,
cProfile's per-function time); with ``--permute``, the permutation kernel's configs (``permute_configs``);
with ``--search``, how far from the best the algorithm search lands, quiet and with every CPU core busy, as
it searches now and as it did before (``search_regret``).
Times are medians of ``triton.testing.do_bench`` (eager launches, L2 flushed between calls) unless under a
CUDA graph (``do_bench_cudagraph``); host times average 20 calls without synchronising.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton.testing

from bench_gemm import SHAPES
from benchmarks_common import spense_weight_for
from vllm_spense.format import GROUP_SIZE, sparse_region
from vllm_spense.kernels import cusparselt
from vllm_spense.kernels.spense_gemm import permute_columns, spense_gemm

MS = [512, 1024, 2048, 4096, 8192]


def gpu_us(call) -> float:
    return triton.testing.do_bench(call, warmup=5, rep=25, return_mode="median") * 1e3


def host_us(call, calls: int = 20) -> float:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / calls * 1e6


def algorithms(compressed, n: int, ks: int, x_sparse, y, y_transposed: bool = False,
               split_k: int | None = None, timer=gpu_us) -> dict[int, float]:
    """The time of every algorithm config cuSPARSELt reports for this problem (plan by plan; a config it
    refuses is skipped, as ``cusparselt._alg_id`` does); ``y_transposed``: y is ``[N, M]``, ``split_k``:
    cuSPARSELt's split-K factor (``Plan``); ``timer``: how a call is timed (``graph_us``: under a CUDA graph)."""
    def plan(alg=None):
        return cusparselt.Plan(cusparselt.library(), x_sparse.device, n, ks, x_sparse.shape[0], x_sparse.stride(0),
                               x_sparse.dtype, alg, y_transposed, split_k if alg is not None else None)

    times = {}
    for alg in range(plan().max_alg_id):
        try:
            alg_plan = plan(alg)
        except cusparselt.CusparseLtError:
            continue
        workspace = torch.empty(max(alg_plan.workspace_bytes, 1), dtype=torch.uint8, device=x_sparse.device)
        times[alg] = timer(lambda: cusparselt.run_plan(alg_plan, compressed, x_sparse, y, workspace))
    return times


def graph_us(call) -> float:
    return triton.testing.do_bench_cudagraph(call, rep=30, return_mode="median") * 1e3


def parts(w, base: torch.Tensor, x: torch.Tensor, x_perm: torch.Tensor, y: torch.Tensor) -> dict:
    """The path, its parts and the comparisons of the module docstring, for one weight and x."""
    n, k, kd = w.n, w.k, w.dense_channels.numel()
    x_sparse = x_perm[:, kd:]
    x_contiguous = x_sparse.contiguous()
    y_alone = torch.zeros_like(y)  # for the contiguous columns: another plan (row stride Ks)
    region = torch.sparse.to_sparse_semi_structured(sparse_region(w.sparse_weight, w.sparse_meta).view(n, -1))

    def ours():
        cusparselt.add_sparse_product(w.sparse_compressed, x_sparse, y)

    def ours_contiguous():
        cusparselt.add_sparse_product(w.sparse_compressed, x_contiguous, y_alone)

    def torch_op():
        torch._cslt_sparse_mm(w.sparse_compressed.view(n, -1), x_contiguous.t(), transpose_result=True)

    return dict(
        cublas_us=gpu_us(lambda: F.linear(x, base)), spense_us=gpu_us(lambda: spense_gemm(x, w)),
        permute_us=gpu_us(lambda: permute_columns(x, w.channel_perm, x.shape[0])),
        dense_region_us=gpu_us(lambda: torch.mm(x_perm[:, :kd], w.dense_weight.t())),
        cusparselt_us=gpu_us(ours), cusparselt_host_us=host_us(ours),
        algorithm=cusparselt.chosen_algorithm(n, k - kd, x.shape[0], k, x.dtype, x.device),
        cusparselt_contiguous_us=gpu_us(ours_contiguous), cusparselt_contiguous_graph_us=graph_us(ours_contiguous),
        torch_2_4_graph_us=graph_us(lambda: F.linear(x_contiguous, region)),
        torch_cslt_host_us=host_us(torch_op), torch_cslt_us=gpu_us(torch_op))


def transposed_layout(w, x: torch.Tensor) -> dict:
    """The path with y written ``[N, M]`` row-major (features-major, as torch's 2:4 ``F.linear`` writes it):
    the dense region's cuBLAS GEMM and cuSPARSELt (every algorithm config timed at this M, the best kept)
    into one ``[N, M]`` buffer, then transposed into ``y [M, N]``; against the shipped path, same x."""
    m, n, kd = x.shape[0], w.n, w.dense_channels.numel()
    x_perm = permute_columns(x, w.channel_perm, m)
    x_sparse = x_perm[:, kd:]
    y_t = torch.empty(n, m, device=x.device, dtype=x.dtype)
    times = algorithms(w.sparse_compressed, n, x_sparse.shape[1], x_sparse, y_t, y_transposed=True)
    best = min(times, key=times.get)
    plan = cusparselt.Plan(cusparselt.library(), x.device, n, x_sparse.shape[1], m, x_sparse.stride(0), x.dtype, best,
                           y_transposed=True)
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=x.device)

    def features_major():
        x_p = permute_columns(x, w.channel_perm, m)
        torch.mm(w.dense_weight, x_p[:, :kd].t(), out=y_t)
        cusparselt.run_plan(plan, w.sparse_compressed, x_p[:, kd:], y_t, workspace)
        return y_t.t().contiguous()

    reference = spense_gemm(x, w).float()
    error = ((features_major().float() - reference).norm() / reference.norm()).item()
    return dict(spense_us=gpu_us(lambda: spense_gemm(x, w)), features_major_us=gpu_us(features_major),
                features_major_vs_spense_error=error, cusparselt_features_major_us=times[best],
                features_major_algorithm=best, cusparselt_features_major_default_us=times.get(0),
                transpose_us=gpu_us(lambda: y_t.t().contiguous()),
                cusparselt_us=gpu_us(lambda: cusparselt.add_sparse_product(
                    w.sparse_compressed, x_sparse, torch.empty(m, n, device=x.device, dtype=x.dtype))))


def host_parts(w, x: torch.Tensor) -> dict:
    """Host time per call (no synchronisation, so the GPU work queues up behind) of the whole custom op
    ``torch.ops.spense.linear``, ``spense_gemm`` and each step of the prefill path, against cuBLAS's
    ``F.linear`` on the dense weight: what a prefill pays where the host, not the GPU, sets the pace."""
    from vllm_spense.kernels import spense_gemm as gemm
    from vllm_spense.ops import spense_linear

    m, n, k, kd = x.shape[0], w.n, w.k, w.dense_channels.numel()
    dense = torch.randn(n, k, device=x.device, dtype=x.dtype)
    mask = torch.ones(k // GROUP_SIZE, dtype=torch.bool, device=x.device)  # the op reads only its size
    x_perm = permute_columns(x, w.channel_perm, m)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    reference = spense_gemm(x, w).float()
    index_select = quads_by_index_select(w, x, torch.empty_like(x))

    def op():
        return spense_linear(x, w.dense_weight, w.sparse_weight, w.sparse_meta, mask, w.channel_perm, None, None,
                             w.sparse_compressed)
    op_error = ((op().float() - reference).norm() / reference.norm()).item()
    return dict(
        op_vs_spense_gemm_error=op_error,
        cublas_host_us=host_us(lambda: F.linear(x, dense)),
        op_host_us=host_us(op),
        spense_gemm_host_us=host_us(lambda: spense_gemm(x, w)),
        prefill_on_sparse_cores_host_us=host_us(
            lambda: gemm._on_sparse_cores(x, w, None, gemm._sparse_cores_rows(m))),
        from_channel_perm_host_us=host_us(lambda: gemm.SpenseGemmWeight.from_channel_perm(
            w.dense_weight, w.sparse_weight, w.sparse_meta, w.channel_perm, None, w.sparse_compressed)),
        check_inputs_host_us=host_us(lambda: gemm.check_inputs(x, w, None)),
        choose_config_host_us=host_us(lambda: gemm.choose_config(m, n, k, x.device, False, True)),
        capturing_host_us=host_us(lambda: torch.cuda.is_current_stream_capturing()),
        permute_host_us=host_us(lambda: permute_columns(x, w.channel_perm, m)),
        permute_us=gpu_us(lambda: permute_columns(x, w.channel_perm, m)),
        index_select_quads_host_us=host_us(index_select),
        index_select_quads_us=gpu_us(index_select),
        empty_host_us=host_us(lambda: torch.empty(m, n, device=x.device, dtype=x.dtype)),
        dense_mm_host_us=host_us(lambda: torch.mm(x_perm[:, :kd], w.dense_weight.t(), out=y)),
        cusparselt_host_us=host_us(lambda: cusparselt.add_sparse_product(w.sparse_compressed, x_perm[:, kd:], y)),
        check_operands_host_us=host_us(lambda: cusparselt.check_operands(w.sparse_compressed, x_perm[:, kd:], y)),
        host_profile=host_profile(op))


def quads_by_index_select(w, x: torch.Tensor, out: torch.Tensor):
    """The permutation as torch's ``index_select`` of whole quads (one int64 per quad of 16-bit values) into
    ``out`` (x's shape), the alternative to our kernel: the call, once checked against ``permute_columns``."""
    source, target = x.view(torch.int64), out.view(torch.int64)
    quad_index = (w.channel_perm[0::GROUP_SIZE] // GROUP_SIZE).long()

    def call():
        torch.index_select(source, 1, quad_index, out=target)
    call()
    assert torch.equal(out, permute_columns(x, w.channel_perm, x.shape[0]))
    return call


def permute_configs(w, x: torch.Tensor) -> dict:
    """GPU time of the permutation kernel (``_permute_quads_kernel``) over num_warps and quads per program,
    against a plain copy of x (the same bytes moved, no gather) and torch's ``index_select`` of quads; each
    config's output checked against the prefill path's own call (``PREFILL_PERMUTE_WARPS``)."""
    from vllm_spense.kernels import spense_gemm as gemm

    m, k = x.shape
    quads = k // GROUP_SIZE
    shipped = permute_columns(x, w.channel_perm, m, num_warps=gemm.PREFILL_PERMUTE_WARPS)
    source, out = gemm.quad_words(x), torch.empty_like(gemm.quad_words(x))
    times = {}
    for warps in (2, 4, 8, 16):
        for block in (128, 256, 512, 1024):
            if block > gemm._next_power_of_2(quads):
                continue

            def launch(warps=warps, block=block):
                gemm._permute_quads_kernel[(m, gemm._cdiv(quads, block))](
                    source, w.channel_perm, out, quads, source.stride(0), out.stride(0), WORDS=source.shape[1] // quads,
                    BLOCK_Q=block, num_warps=warps)
            launch()
            assert torch.equal(out.view(x.dtype), shipped)
            times[f"warps={warps} block_q={block}"] = gpu_us(launch)
    one_word = source.shape[1] == quads  # 16-bit values: a quad is one int64, what index_select moves
    return dict(permute_prefill_us=gpu_us(lambda: permute_columns(x, w.channel_perm, m,
                                                                  num_warps=gemm.PREFILL_PERMUTE_WARPS)),
                permute_configs_us=times, copy_us=gpu_us(lambda: out.copy_(source)),
                index_select_quads_us=gpu_us(quads_by_index_select(w, x, torch.empty_like(x))) if one_word else None)


# The search before, near enough: one call between two events, no spin (``cusparselt.time_algorithms``'
# parameters; the previous code also waited for each call before queueing the next).
SEARCHES = {"one call a sample (before)": dict(calls=1, spin_cycles=0), "queued calls (now)": {}}


def search_regret(compressed, n: int, x_sparse, trials: int = 4) -> dict:
    """Every algorithm's time under a CUDA graph (the reference: GPU time only), then ``trials`` searches per
    way of searching (``SEARCHES``), with the CPU quiet and with one busy process per core beside it (as
    when a server's other processes compile): the algorithm each picked and its time over the best one's."""
    y = torch.zeros(x_sparse.shape[0], n, device=x_sparse.device, dtype=x_sparse.dtype)
    reference = algorithms(compressed, n, x_sparse.shape[1], x_sparse, y, timer=graph_us)
    best = min(reference.values())
    row = {"algorithms_graph_us": reference}
    for busy in (False, True):
        hog = [sys.executable, "-c", "while True: pass"]
        hogs = [subprocess.Popen(hog) for _ in range(os.cpu_count() if busy else 0)]
        try:
            time.sleep(1.0 if busy else 0.0)
            for name, options in SEARCHES.items():
                picks = []
                for _ in range(trials):
                    times = cusparselt.time_algorithms(compressed, n, x_sparse, **options)
                    picks.append(min(times, key=times.get))
                row[f"{name}, {'CPU busy' if busy else 'quiet'}"] = {
                    "picked": picks, "over_best": [round(reference[alg] / best, 3) for alg in picks]}
        finally:
            for hog in hogs:
                hog.kill()
    return row


def host_profile(call, calls: int = 200, top: int = 25) -> list[str]:
    """The ``top`` functions by own time under cProfile over ``calls`` calls (us per call, own and
    cumulative; cProfile's overhead inflates functions that make many small calls)."""
    call()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [f"{own / calls * 1e6:7.1f} us own {cumulative / calls * 1e6:7.1f} us cum {count / calls:4.1f}x "
            f"{function[2]} ({function[0].rsplit('/', 2)[-1]}:{function[1]})"
            for function, (_, count, own, cumulative, _) in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--algs", action="store_true")
    parser.add_argument("--split-k", nargs="*", type=int, default=[None],
                        help="with --algs: cuSPARSELt split-K factors to time each algorithm with (1 or none: no "
                             "split; a factor cuSPARSELt refuses for every algorithm gives an empty entry)")
    parser.add_argument("--layout", action="store_true", help="y features-major + a transpose (transposed_layout)")
    parser.add_argument("--host", action="store_true", help="host time of the op and its parts (host_parts)")
    parser.add_argument("--permute", action="store_true", help="the permutation kernel's configs (permute_configs)")
    parser.add_argument("--search", action="store_true", help="the algorithm search's picks against the best "
                                                               "(search_regret)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--ms", nargs="*", type=int, default=MS)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        base = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w = spense_weight_for(base, 0.25)
        if w.sparse_compressed is None:
            print(f"{name}: not on cuSPARSELt")
            continue
        kd = w.dense_channels.numel()
        sparse_dense = torch.randn(n, k - kd, device="cuda", dtype=torch.bfloat16)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x_perm = permute_columns(x, w.channel_perm, m)
            x_sparse = x_perm[:, kd:]
            y = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m,
                   "cublas_sparse_columns_dense_us": gpu_us(lambda: torch.mm(x_sparse, sparse_dense.t()))}
            if args.algs:
                row["cublas_us"] = gpu_us(lambda: F.linear(x, base))
                row["cublas_dense_region_us"] = gpu_us(lambda: torch.mm(x_perm[:, :kd], w.dense_weight.t()))
                for split_k in args.split_k or [None]:
                    key = "cusparselt_algorithms_us" + ("" if split_k is None else f" split_k={split_k}")
                    row[key] = algorithms(w.sparse_compressed, n, k - kd, x_sparse, y, split_k=split_k)
            elif args.layout:
                row.update(transposed_layout(w, x))
            elif args.host:
                row.update(host_parts(w, x))
            elif args.permute:
                row.update(permute_configs(w, x))
            elif args.search:
                row.update(search_regret(w.sparse_compressed, n, x_sparse))
            else:
                row.update(parts(w, base, x, x_perm, y))
            rows.append(row)
            print(json.dumps({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()
                              if key != "host_profile"}), flush=True)
            if "host_profile" in row:
                print("\n".join(row["host_profile"]), flush=True)
        with open(args.json, "w") as handle:
            json.dump({"device": device, "cusparselt_version": torch.backends.cusparselt.version(), "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
