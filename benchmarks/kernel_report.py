"""Why the Spense kernels are slow: the compiler's resource report and the time of each piece.

    python benchmarks/kernel_report.py

For the Qwen3-8B qkv shape at rho = 0.25: registers, spills and shared memory of every compiled variant
of the fused GEMM and the 2:4 expand kernel, and CUDA-graph timings of the expand kernel alone, the fused
kernel at M = 1, and the same kernel on a weight with no 2:4 groups' work (rho = 0.5) for comparison.
"""

from __future__ import annotations

import torch
import triton.testing

from benchmarks_common import spense_weight_for
from vllm_spense.kernels import spense_gemm as sg


def compiled_variants(kernel):
    for caches in getattr(kernel, "device_caches", {}).values():
        for compiled in caches[0].values():
            yield compiled


def main() -> None:
    print(torch.cuda.get_device_name())
    n, k = 6144, 4096
    base = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for rho in (0.0, 0.25, 0.5):
        w = spense_weight_for(base, rho)
        t_gemm = triton.testing.do_bench_cudagraph(lambda: sg.spense_gemm(x1, w), return_mode="median")
        t_perm = triton.testing.do_bench_cudagraph(lambda: x1.index_select(1, w.channel_perm), return_mode="median")
        t_unpack = triton.testing.do_bench_cudagraph(lambda: sg.expand_2_4(w), return_mode="median")
        print(f"rho={rho}: fused M=1 {t_gemm * 1e3:.1f} us (x permute alone {t_perm * 1e3:.1f} us), "
              f"2:4 expand alone {t_unpack * 1e3:.1f} us")
    t_copy = triton.testing.do_bench_cudagraph(lambda: base.clone(), return_mode="median")
    print(f"clone of the dense weight (read + write {2 * base.numel() * 2 / 2**20:.0f} MiB): {t_copy * 1e3:.1f} us")
    for name, kernel in (("fused", sg._spense_gemm_kernel), ("expand", sg._spense_expand_kernel)):
        for compiled in compiled_variants(kernel):
            meta = compiled.metadata
            print(f"{name}: regs={compiled.n_regs} spills={compiled.n_spills} shared={meta.shared} "
                  f"warps={meta.num_warps} stages={meta.num_stages}")


if __name__ == "__main__":
    main()
