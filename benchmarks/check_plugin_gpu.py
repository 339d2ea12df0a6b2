"""The plugin's layer path on the GPU, without vLLM (the device has none): what ``SpenseLinearMethod`` runs.

    python benchmarks/check_plugin_gpu.py

First the load-time warm-up (``spense_gemm.warm_up``, which the plugin runs with the model's dtype): after
it, no M from 1 to 300 may make Triton compile anything more (each output checked too). Then a layer
holding the four Spense tensors (five with FP8 values), as vLLM's loaders leave it, goes through
``linear_kernel.process_weights_after_loading`` (validation, channel map) and ``linear_kernel.apply``
(one ``torch.ops.spense.linear`` call; bf16 layers with their 2:4 region on cuSPARSELt for prefill):
eagerly, under ``torch.compile(fullgraph=True)``, replayed from a CUDA graph with fresh inputs copied in,
and through ``torch.library.opcheck``. Every output is compared
with fp64 math on the reconstructed weight. Exits 1 on any failure.
"""

from __future__ import annotations

import sys
import time

import torch
import triton

from benchmarks_common import compiled_variants
from vllm_spense import linear_kernel
from vllm_spense.format import fp8_scales, pack, unpack
from vllm_spense.kernels import cusparselt, spense_gemm
from vllm_spense.offline.sparsegpt import magnitude_2_4

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
LAYERS = {"qwen3-8b qkv_proj": (6144, 4096, 8), "ragged": (1000, 640, 4)}
MS = [1, 8, 100, 2048]
GRAPH_MS = [1, 8]
# Batch sizes vLLM captures in CUDA graphs that run on cuSPARSELt for bf16 layers (from SPARSE_CORES_MIN_M
# rows; past MMA_MAX_M for the others); 16-bit values only, since FP8 ones take W8A8 past MMA_MAX_M.
SPARSE_CORES_GRAPH_MS = [100, 384]


def spense_layer(n: int, k: int, dense_per_chunk: int, dtype: torch.dtype, fp8: bool = False,
                 bias: bool = False, warm_up: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """A layer as vLLM's loaders leave it (FP8 values + weight_scale with ``fp8``, a ``bias`` parameter with
    ``bias``), processed with the load-time warm-up with ``warm_up``, and its weight in fp64."""
    mask = torch.zeros(k // 128, 32, dtype=torch.bool, device="cuda")
    for chunk in mask:
        chunk[torch.randperm(32, device="cuda")[:dense_per_chunk]] = True
    mask = mask.reshape(-1)
    pruned = magnitude_2_4(torch.randn(n, k, device="cuda", dtype=dtype), mask)
    packed = pack(pruned, mask, 128, weight_scale=fp8_scales(pruned) if fp8 else None)
    layer = torch.nn.Module()
    linear_kernel.register_packed(layer, packed)
    if bias:
        layer.register_parameter("bias", torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dtype),
                                                            requires_grad=False))
    linear_kernel.process_weights_after_loading(layer, [("layer", n)], chunk_size=128,
                                                value_dtype=torch.float8_e4m3fn if fp8 else None,
                                                activation_dtype=dtype if warm_up else None)
    return layer, unpack(packed).double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).norm() / ref.norm()).item()


def layer_name(label: str, layer: torch.nn.Module, fp8: bool) -> str:
    """The label, FP8 values, and whether prefill runs on cuSPARSELt (``with_sparse_cores``)."""
    return f"{label}{' fp8' if fp8 else ''}{' cuSPARSELt' if hasattr(layer, 'sparse_compressed') else ''}"


def plans_from_warm_up(layer: torch.nn.Module, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether the load-time warm-up built the cuSPARSELt plans for every size of ``SPARSE_CORES_GRAPH_MS``
    (checked before the layer's first call: vLLM captures these sizes, and no plan is built in a capture)."""
    ks, device = k - layer.dense_weight.shape[1], layer.dense_weight.device
    return all(cusparselt.has_plan(n, ks, spense_gemm._sparse_cores_rows(m), k, dtype, device)
               for m in SPARSE_CORES_GRAPH_MS)


def captured_on_sparse_cores(capture) -> bool:
    """Runs ``capture`` and says whether it recorded a cuSPARSELt call (not a fallback to another path)."""
    calls, run_plan = [], cusparselt.run_plan

    def counted(*args):
        calls.append(1)
        return run_plan(*args)
    cusparselt.run_plan = counted
    try:
        capture()
    finally:
        cusparselt.run_plan = run_plan
    return bool(calls)


def compiled_count() -> int:
    """How many kernel variants Triton has compiled so far, over every Triton kernel of spense_gemm."""
    kernels = [value for value in vars(spense_gemm).values() if isinstance(value, triton.runtime.JITFunction)]
    return sum(len(compiled_variants(kernel)) for kernel in kernels)


def check_warm_up() -> tuple[list[str], int]:
    """After the load-time warm-up, no M from 1 to 300 compiles anything; every output is still checked
    (FP8 up to MMA_MAX_M rows: W8A8 beyond, see main). Table rows and the number of failures."""
    rows, failures = [], 0
    for dtype, fp8 in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)):
        for label, (n, k, dense) in LAYERS.items():
            before, start = compiled_count(), time.perf_counter()
            layer, weight = spense_layer(n, k, dense, dtype, fp8, bias=True, warm_up=True)
            name = layer_name(label, layer, fp8)
            seconds, warmed, worst = time.perf_counter() - start, compiled_count(), 0.0
            for m in range(1, 301):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                y = linear_kernel.apply(layer, x, layer.bias)
                if not fp8 or m <= spense_gemm.MMA_MAX_M:
                    worst = max(worst, rel_err(y, x.double() @ weight.T + layer.bias.double()))
            late = compiled_count() - warmed
            ok = late == 0 and worst < TOLERANCE[dtype]
            failures += not ok
            rows.append(f"| {str(dtype)[6:]} | {name} | warm-up ({warmed - before} variants compiled, {seconds:.1f} "
                        f"s), then every M; {late} compiled after it | 1-300 | {worst:.2e} | "
                        f"{'ok' if ok else 'FAIL'} |")
    return rows, failures


def main() -> int:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows, failures = check_warm_up()  # first, so that it counts what the warm-up itself compiles

    def record(dtype, name, mode, m, err):
        nonlocal failures
        ok = err < TOLERANCE[dtype]
        failures += not ok
        rows.append(f"| {str(dtype)[6:]} | {name} | {mode} | {m} | {err:.2e} | {'ok' if ok else 'FAIL'} |")

    # FP8 checkpoints at prefill quantize x per token (W8A8): their reference there is not exact, so they
    # are checked at the decode sizes only (check_kernels_gpu.py checks W8A8 against a rounded x).
    for dtype, fp8 in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)):
        for label, (n, k, dense) in LAYERS.items():
            layer, weight = spense_layer(n, k, dense, dtype, fp8, warm_up=True)
            name = layer_name(label, layer, fp8)
            sparse_cores = hasattr(layer, "sparse_compressed")
            if sparse_cores:
                record(dtype, name, "cuSPARSELt plans built by the warm-up (0: yes)", SPARSE_CORES_GRAPH_MS,
                       0.0 if plans_from_warm_up(layer, n, k, dtype) else float("inf"))
            bias = torch.randn(n, device="cuda", dtype=dtype)
            torch._dynamo.reset()  # one compiled function per layer; M becomes a dynamic size as in vLLM
            compiled = torch.compile(lambda x, b: linear_kernel.apply(layer, x, b), fullgraph=True)
            for m in MS if not fp8 else GRAPH_MS:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.double() @ weight.T + bias.double()
                record(dtype, name, "eager", m, rel_err(linear_kernel.apply(layer, x, bias), ref))
                record(dtype, name, "torch.compile fullgraph", m, rel_err(compiled(x, bias), ref))
            for m in GRAPH_MS if fp8 else GRAPH_MS + SPARSE_CORES_GRAPH_MS:
                static_x = torch.randn(m, k, device="cuda", dtype=dtype)
                linear_kernel.apply(layer, static_x, bias)  # warm up (compiles the kernel) outside the capture
                torch.cuda.synchronize()
                graph, static_y = torch.cuda.CUDAGraph(), None

                def capture():
                    nonlocal static_y
                    with torch.cuda.graph(graph):
                        static_y = linear_kernel.apply(layer, static_x, bias)
                if sparse_cores and m in SPARSE_CORES_GRAPH_MS:
                    record(dtype, name, "CUDA graph captured on cuSPARSELt (0: yes)", m,
                           0.0 if captured_on_sparse_cores(capture) else float("inf"))
                else:
                    capture()
                for _ in range(3):
                    static_x.copy_(torch.randn(m, k, device="cuda", dtype=dtype))
                    static_y.fill_(float("nan"))
                    graph.replay()
                    ref = static_x.double() @ weight.T + bias.double()
                    record(dtype, name, "CUDA graph replay", m, rel_err(static_y, ref))
    layer, _ = spense_layer(256, 256, 8, torch.bfloat16, warm_up=True)
    for m in (1, 300):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        args = (x, layer.dense_weight, layer.sparse_weight, layer.sparse_meta, layer.dense_mask, layer.channel_perm,
                None, None, getattr(layer, "sparse_compressed", None))
        torch.library.opcheck(torch.ops.spense.linear.default, args)
        rows.append(f"| bfloat16 | opcheck 256x256{' cuSPARSELt' if args[-1] is not None else ''} | "
                    f"torch.library.opcheck | {m} | - | ok |")
    print("| dtype | layer | mode | M | relative error vs fp64 | result |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    print("\n".join(rows))
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
