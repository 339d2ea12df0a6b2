"""End-to-end decode and prefill speed of a Qwen3-8B-shaped decoder: dense (cuBLAS) vs Spense weights.

    python benchmarks/bench_decode.py --json bench_decode.json
    python benchmarks/bench_decode.py --device cpu --tiny --json /tmp/bd.json     # CPU smoke run

A gpt-fast style decoder in plain PyTorch (RMSNorm, Qwen3's q/k norm, RoPE, GQA attention on a static KV
cache, SwiGLU MLP) with random weights and vLLM's merged Linears (qkv_proj, o_proj, gate_up_proj,
down_proj). Variants: ``dense`` (``F.linear``, cuBLAS) and Spense at rho = 0, 0.125, 0.25, where every
Linear is magnitude-pruned outside a balanced dense region chosen by magnitude
(``offline.selection.balanced_top_groups``), packed (``format.pack``) and run exactly as the vLLM plugin
does: ``linear_kernel.process_weights_after_loading`` then ``linear_kernel.apply`` (one
``torch.ops.spense.linear`` call per Linear). FP8 variants (``--variants "dense fp8" "fp8 rho=0.25"``):
``dense fp8`` is vLLM's FP8 Linear on Hopper (FP8 weights with per-channel scales, activations quantized
per token, ``torch._scaled_mm``), ``fp8 rho=0.25`` the Spense checkpoint with FP8 values (W8A16 at decode).
Embeddings and lm_head stay dense in every variant.

Measured, per variant, in one run:
- decode: one step = one forward of [batch, 1] tokens at position ``--context`` (KV cache full up to it),
  replayed from a CUDA graph; tokens/s = batch / step time. The same graph with only the step's Linears
  (all layers, same shapes) gives the GEMM share of the step; the rest is attention, norms, RoPE,
  embedding and lm_head.
- prefill: batch 1, ``--prefill`` tokens, eager, causal; tokens/s = tokens / time.
- weight bytes: all Linear tensors (incl. 2:4 metadata, mask and channel map) and the whole model.
Every time is the median of ``--repeats`` runs of n calls (CUDA events), n sized to ``--budget``.
Before timing, one decode step of each Spense variant (batch 2 and 16: both decode kernels) is checked
against the same weights rebuilt dense by ``format.unpack``: every Linear's output on the step's own
activations (relative error < 2e-2) and the logits (< 5e-2: two correct bf16 runs of a deep model already
differ by about 1%); a failure stops the run.
On the CPU there are no CUDA graphs: calls are timed eagerly and the custom op runs its PyTorch reference
(in float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from report_decode import tables
from vllm_spense import linear_kernel
from vllm_spense.format import GROUP_SIZE, dense_groups_per_chunk, fp8_scales, fp8_values, pack, unpack
from vllm_spense.kernels.spense_gemm import quantize_rows_fp8
from vllm_spense.offline.selection import balanced_top_groups
from vllm_spense.offline.sparsegpt import magnitude_2_4

CHUNK_SIZE = 128
# name: (rho, FP8 values); rho None is the dense model.
VARIANTS = {"dense": (None, False), "rho=0": (0.0, False), "rho=0.125": (0.125, False), "rho=0.25": (0.25, False),
            "dense fp8": (None, True), "fp8 rho=0.25": (0.25, True)}
CHECK_BATCHES = (2, 16)  # batch 2: the MMA kernel, and the gemv on o_proj (gemv_two_rows_tiles); 16: the MMA kernel
# Each Linear against F.linear on the unpacked weight, same input: both accumulate in fp32 and round once.
LINEAR_TOLERANCE = 2e-2
# Logits after all layers: two correct bf16 runs of a 36-layer random model differ by about 1% already (a
# 36-layer, hidden-512 model on the CPU: 1.0%), since the first differing rounding decorrelates all later ones.
LOGITS_TOLERANCE = 5e-2
MIN_GRAPH_CALLS, MAX_CALLS = 10, 40  # per run: 50-200 replays over 5 runs


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    layers: int = 36
    hidden: int = 4096
    intermediate: int = 12288
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    rope_theta: float = 1e6
    eps: float = 1e-6


QWEN3_8B = ModelConfig()
TINY = ModelConfig(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, vocab=1000)


class DenseLinear(torch.nn.Module):
    """The baseline: ``F.linear``, i.e. cuBLAS on the GPU."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DenseFP8Linear(torch.nn.Module):
    """The FP8 baseline, as vLLM's FP8 Linear runs on Hopper: weights FP8 with per-output-channel scales,
    activations quantized per token (one fused launch: the Spense kernels' own quantizer, in x's order),
    ``torch._scaled_mm`` (cuBLASLt FP8). On the CPU, torch does the quantization."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scale = fp8_scales(weight)
        self.weight = torch.nn.Parameter(fp8_values(weight, scale), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.is_cuda:
            xq, x_scale = quantize_rows_fp8(x2, None, x2.shape[0])
        else:
            x_scale = fp8_scales(x2)
            xq = fp8_values(x2, x_scale)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale[:, None], scale_b=self.weight_scale[None, :],
                             out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], -1)


def magnitude_spense(weight: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, dense mask): the input groups of largest magnitude kept dense, balanced per chunk,
    magnitude 2:4 elsewhere. One mask for a merged weight, as vLLM's qkv / gate_up need."""
    score = weight.abs().float().sum(0).reshape(-1, GROUP_SIZE).sum(-1)  # magnitude of each input group
    mask = balanced_top_groups(score, CHUNK_SIZE, dense_groups_per_chunk(rho, CHUNK_SIZE))
    return magnitude_2_4(weight, mask), mask


class SpenseLinear(torch.nn.Module):
    """A Linear as the vLLM plugin leaves it: the four packed tensors plus ``channel_perm``.

    For the correctness guard: with ``reference`` set, the forward multiplies by the dense weight that
    ``format.unpack`` rebuilds (independent of the kernels); with ``errors`` a list, it runs the kernel and
    appends the output's relative error against that reference on the same input.
    """

    def __init__(self, weight: torch.Tensor, rho: float, parts: list[tuple[str, int]], fp8: bool = False):
        super().__init__()
        pruned, mask = magnitude_spense(weight, rho)
        packed = pack(pruned, mask, CHUNK_SIZE, parts[0][0], weight_scale=fp8_scales(pruned) if fp8 else None)
        linear_kernel.register_packed(self, packed)
        linear_kernel.process_weights_after_loading(self, parts, chunk_size=CHUNK_SIZE,
                                                    value_dtype=torch.float8_e4m3fn if fp8 else None,
                                                    activation_dtype=weight.dtype)  # as vLLM's params_dtype
        self.reference, self.errors = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return F.linear(x, unpack(linear_kernel.packed_weight(self)).to(x.dtype))
        y = linear_kernel.apply(self, x)
        if self.errors is not None:
            self.errors.append(rel_err(y, F.linear(x, unpack(linear_kernel.packed_weight(self)).to(x.dtype))))
        return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by the [T, D] tables (rotate-half convention, as Qwen3)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[None, :, None] + torch.cat((-x2, x1), dim=-1) * sin[None, :, None]


class Block(torch.nn.Module):
    """One Qwen3 decoder layer: pre-norm attention (q/k norm, RoPE, GQA) and a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, linears: dict[str, torch.nn.Module], device, dtype):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj, self.o_proj = linears["qkv_proj"], linears["o_proj"]
        self.gate_up_proj, self.down_proj = linears["gate_up_proj"], linears["down_proj"]
        for name, size in (("attn_norm", cfg.hidden), ("mlp_norm", cfg.hidden), ("q_norm", cfg.head_dim),
                           ("k_norm", cfg.head_dim)):
            self.register_parameter(name, torch.nn.Parameter(torch.ones(size, device=device, dtype=dtype),
                                                             requires_grad=False))

    def forward(self, x, cos, sin, start: int, k_cache, v_cache):
        """x [B, T, hidden]; writes this step's K/V at positions [start, start + T) of the caches."""
        c = self.cfg
        b, t, _ = x.shape
        qkv = self.qkv_proj(F.rms_norm(x, (c.hidden,), self.attn_norm, c.eps))
        q, k, v = qkv.split([c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], dim=-1)
        q = rope(F.rms_norm(q.view(b, t, c.heads, c.head_dim), (c.head_dim,), self.q_norm, c.eps), cos, sin)
        k = rope(F.rms_norm(k.view(b, t, c.kv_heads, c.head_dim), (c.head_dim,), self.k_norm, c.eps), cos, sin)
        k_cache[:, :, start:start + t] = k.transpose(1, 2)
        v_cache[:, :, start:start + t] = v.view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        group = c.heads // c.kv_heads
        if t == 1:  # decode: the query heads sharing a KV head are rows against it (exact, no cache copy)
            out = F.scaled_dot_product_attention(q.view(b, c.kv_heads, group, c.head_dim),
                                                 k_cache[:, :, :start + 1], v_cache[:, :, :start + 1])
        else:  # prefill from position 0, causal; repeating the KV heads is a small copy at batch 1
            if start:
                raise ValueError("prefill runs from position 0")
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_cache[:, :, :t].repeat_interleave(group, 1),
                v_cache[:, :, :t].repeat_interleave(group, 1), is_causal=True).transpose(1, 2)
        x = x + self.o_proj(out.reshape(b, t, c.heads * c.head_dim))
        gate, up = self.gate_up_proj(F.rms_norm(x, (c.hidden,), self.mlp_norm, c.eps)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class Decoder(torch.nn.Module):
    """Embedding, the layers, final norm and a dense lm_head; RoPE tables for ``max_positions``."""

    def __init__(self, cfg: ModelConfig, blocks: list[Block], embed, lm_head, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.blocks = torch.nn.ModuleList(blocks)
        self.embed = torch.nn.Parameter(embed, requires_grad=False)
        self.lm_head = torch.nn.Parameter(lm_head, requires_grad=False)
        self.norm = torch.nn.Parameter(torch.ones(cfg.hidden, device=embed.device, dtype=embed.dtype),
                                       requires_grad=False)
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=embed.device) / cfg.head_dim)
        angles = torch.arange(max_positions, device=embed.device)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().to(embed.dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(embed.dtype), persistent=False)

    def forward(self, tokens: torch.Tensor, start: int, cache: list[tuple[torch.Tensor, torch.Tensor]]):
        """tokens [B, T] at positions [start, start + T) -> logits [B, vocab] of the last position."""
        t = tokens.shape[1]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        for block, (k_cache, v_cache) in zip(self.blocks, cache):
            x = block(x, cos, sin, start, k_cache, v_cache)
        return F.linear(F.rms_norm(x[:, -1], (self.cfg.hidden,), self.norm, self.cfg.eps), self.lm_head)


def layer_weights(cfg: ModelConfig, generator: torch.Generator, device, dtype):
    """One layer's random weights: name, weight, parts (as the plugin lists a merged layer's checkpoint layers).

    Scaled 1/sqrt(fan_in), and the two that write the residual stream (o_proj, down_proj) by a further
    1/sqrt(2 layers) as GPT-2 does, so a deep random model stays well-conditioned.
    """
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    residual = math.sqrt(2 * cfg.layers)
    shapes = {"qkv_proj": ([("q_proj", q), ("k_proj", kv), ("v_proj", kv)], cfg.hidden, 1.0),
              "o_proj": ([("o_proj", cfg.hidden)], q, residual),
              "gate_up_proj": ([("gate_proj", cfg.intermediate), ("up_proj", cfg.intermediate)], cfg.hidden, 1.0),
              "down_proj": ([("down_proj", cfg.hidden)], cfg.intermediate, residual)}
    for name, (parts, k, extra) in shapes.items():
        rows = sum(r for _, r in parts)
        weight = torch.randn(rows, k, generator=generator, device=device, dtype=dtype) / (math.sqrt(k) * extra)
        yield name, weight, parts


def build_model(cfg: ModelConfig, rho: float | None, device, dtype, max_positions: int, seed: int = 0,
                fp8: bool = False) -> Decoder:
    """The same random weights for every variant (seeded per layer), pruned and packed when ``rho`` is set,
    FP8 values with ``fp8``; built one layer at a time so only one layer's dense weights exist besides the
    model."""
    def linear(i, w, parts):
        if rho is None:
            return DenseFP8Linear(w) if fp8 else DenseLinear(w)
        return SpenseLinear(w, rho, [(f"layers.{i}.{p}", r) for p, r in parts], fp8)

    blocks = []
    for i in range(cfg.layers):
        generator = torch.Generator(device=device).manual_seed(seed * 1000 + i)
        linears = {name: linear(i, w, parts) for name, w, parts in layer_weights(cfg, generator, device, dtype)}
        blocks.append(Block(cfg, linears, device, dtype))
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + cfg.layers)
    embed = torch.randn(cfg.vocab, cfg.hidden, generator=generator, device=device, dtype=dtype)
    lm_head = torch.randn(cfg.vocab, cfg.hidden, generator=generator, device=device, dtype=dtype)
    return Decoder(cfg, blocks, embed, lm_head / math.sqrt(cfg.hidden), max_positions)


def make_cache(cfg: ModelConfig, batch: int, length: int, device, dtype, generator=None):
    """Static KV cache, [batch, kv_heads, length, head_dim] per layer and K/V, filled with random values."""
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    return [tuple(torch.empty(shape, device=device, dtype=dtype).normal_(generator=generator) for _ in range(2))
            for _ in range(cfg.layers)]


def set_check_mode(model: torch.nn.Module, reference: bool = False, errors: list | None = None) -> None:
    for module in model.modules():
        if isinstance(module, SpenseLinear):
            module.reference, module.errors = reference, errors


def tensor_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (``sparse_weight`` is a view into
    ``sparse_compressed`` where the 2:4 region went to cuSPARSELt)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def weight_bytes(model: Decoder) -> dict[str, int]:
    linears = [m for m in model.modules() if isinstance(m, (DenseLinear, DenseFP8Linear, SpenseLinear))]
    return {"linear_bytes": tensor_bytes(p for m in linears for p in m.parameters()),
            "model_bytes": tensor_bytes(model.parameters())}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check_step(model: Decoder, batch: int, context: int, seed: int) -> dict[str, float]:
    """One decode step against the same weights rebuilt dense by ``format.unpack``: the relative error of
    every Linear's output on the step's own activations (the worst one), and of the logits."""
    device, dtype = model.embed.device, model.embed.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = make_cache(model.cfg, batch, context + 1, device, dtype, generator)
    tokens = torch.randint(model.cfg.vocab, (batch, 1), generator=generator, device=device)
    errors = []
    try:
        set_check_mode(model, errors=errors)
        logits = model(tokens, context, cache)
        set_check_mode(model, reference=True)
        ref = model(tokens, context, cache)
    finally:
        set_check_mode(model)
    return {"worst_linear": max(errors), "logits": rel_err(logits, ref)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_graph(fn) -> torch.cuda.CUDAGraph:
    """Capture ``fn``; it runs twice on a side stream first so Triton compiles outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def run_ms(fn, calls: int, device: torch.device) -> float:
    """Mean milliseconds per call over ``calls`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) * 1e3 / calls


def time_ms(fn, device: torch.device, budget_s: float, repeats: int, graph: bool) -> float:
    """Median over ``repeats`` runs of the mean time per call; on CUDA with ``graph``, of graph replays."""
    if device.type == "cuda" and graph:
        fn = cuda_graph(fn).replay
    fn()  # warm-up (compiles Triton kernels on the eager path)
    sync(device)
    calls = round(budget_s * 1e3 / repeats / run_ms(fn, 1, device))
    calls = min(MAX_CALLS, max(MIN_GRAPH_CALLS if device.type == "cuda" and graph else 1, calls))
    return statistics.median(run_ms(fn, calls, device) for _ in range(repeats))


def linears_only(model: Decoder, batch: int):
    """A function running just the Linears of one decode step of ``batch`` tokens (random inputs)."""
    c, device, dtype = model.cfg, model.embed.device, model.embed.dtype
    x_hidden, x_attn, x_mlp = (torch.randn(batch, k, device=device, dtype=dtype)
                               for k in (c.hidden, c.heads * c.head_dim, c.intermediate))

    def run():
        for block in model.blocks:
            block.qkv_proj(x_hidden)
            block.o_proj(x_attn)
            block.gate_up_proj(x_hidden)
            block.down_proj(x_mlp)
    return run


def decode_step_ms(model: Decoder, batch: int, context: int, timer: dict) -> float:
    """One decode step of ``batch`` sequences at position ``context``, the KV cache full up to it."""
    cfg, device, dtype = model.cfg, model.embed.device, model.embed.dtype
    cache = make_cache(cfg, batch, context + 1, device, dtype)
    tokens = torch.randint(cfg.vocab, (batch, 1), device=device)
    return time_ms(lambda: model(tokens, context, cache), graph=True, **timer)


def prefill_ms(model: Decoder, length: int, timer: dict) -> float:
    """A causal forward of ``length`` prompt tokens, batch 1, eager."""
    cfg, device, dtype = model.cfg, model.embed.device, model.embed.dtype
    cache = make_cache(cfg, 1, length, device, dtype)
    tokens = torch.randint(cfg.vocab, (1, length), device=device)
    return time_ms(lambda: model(tokens, 0, cache), graph=False, **timer)


def bench_variant(model: Decoder, args, device: torch.device) -> dict:
    timer = dict(device=device, budget_s=args.budget, repeats=args.repeats)
    decode = {}
    for batch in args.batches:
        step_ms = decode_step_ms(model, batch, args.context, timer)
        free_memory(device)
        linear_ms = time_ms(linears_only(model, batch), graph=True, **timer)
        decode[str(batch)] = {"step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3, "linear_ms": linear_ms,
                              "gemm_share": linear_ms / step_ms}
        print(f"  decode batch {batch}: {step_ms:.3f} ms/step, {batch / step_ms * 1e3:.1f} tokens/s, "
              f"Linears {linear_ms:.3f} ms ({linear_ms / step_ms:.0%})", flush=True)
    prefill = {}
    for length in args.prefill:
        ms = prefill_ms(model, length, timer)
        free_memory(device)
        prefill[str(length)] = {"ms": ms, "tokens_per_s": length / ms * 1e3}
        print(f"  prefill {length} tokens: {ms:.2f} ms, {length / ms * 1e3:.0f} tokens/s", flush=True)
    return {"decode": decode, "prefill": prefill}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speedups(variants: dict) -> None:
    """Speedup of every variant over ``dense`` (dense time / variant time), and of the FP8 variants over
    ``dense fp8`` (``speedup_fp8``), where the baseline was measured."""
    for baseline, key_out, which in (("dense", "speedup", lambda r: True), ("dense fp8", "speedup_fp8",
                                                                             lambda r: r.get("fp8"))):
        base = variants.get(baseline)
        if base is None:
            continue
        for result in filter(which, variants.values()):
            for kind, key in (("decode", "step_ms"), ("prefill", "ms")):
                for size, entry in result[kind].items():
                    entry[key_out] = base[kind][size][key] / entry[key]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-256 model (CPU smoke run)")
    for field in dataclasses.fields(ModelConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default))
    parser.add_argument("--variants", nargs="*", default=[name for name, (_, fp8) in VARIANTS.items() if not fp8],
                        choices=list(VARIANTS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache at decode")
    parser.add_argument("--prefill", nargs="*", type=int, default=[2048, 8192])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds aimed at per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the CPU reference path: fp32
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)
                 if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(TINY if args.tiny else QWEN3_8B, **overrides)
    max_positions = max([args.context + 1, *args.prefill])
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": _triton_version(), "dtype": str(dtype)[6:],
        "config": {**dataclasses.asdict(cfg), "context": args.context, "batches": args.batches,
                   "prefill": args.prefill, "chunk_size": CHUNK_SIZE, "repeats": args.repeats,
                   "budget_s": args.budget, "cuda_graphs": device.type == "cuda",
                   "notes": "embeddings and lm_head dense in every variant; KV cache not in the weight bytes"},
        "variants": {},
    }
    print(f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['dtype']}: "
          f"{cfg}", flush=True)
    begin = time.perf_counter()
    for name in args.variants:
        rho, fp8 = VARIANTS[name]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        built = time.perf_counter()
        model = build_model(cfg, rho, device, dtype, max_positions, args.seed, fp8)
        result = {"rho": rho, "fp8": fp8, **weight_bytes(model)}
        print(f"{name}: built in {time.perf_counter() - built:.1f} s, Linear weights "
              f"{result['linear_bytes'] / 2**30:.3f} GiB, model {result['model_bytes'] / 2**30:.3f} GiB", flush=True)
        if rho is not None:
            checks = {str(b): check_step(model, b, args.context, args.seed) for b in CHECK_BATCHES}
            result["check_rel_err"] = checks
            print(f"  vs unpacked dense weights, relative error by batch: {checks}", flush=True)
            if not all(c["worst_linear"] < LINEAR_TOLERANCE and c["logits"] < LOGITS_TOLERANCE
                       for c in checks.values()):
                raise RuntimeError(f"{name}: Spense outputs differ from the unpacked dense weights' by {checks} "
                                   f"(tolerance {LINEAR_TOLERANCE} per Linear, {LOGITS_TOLERANCE} on the logits); "
                                   f"not timing a wrong model")
        result.update(bench_variant(model, args, device))
        if device.type == "cuda":
            result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        results["variants"][name] = result
        del model
        free_memory(device)
        add_speedups(results["variants"])
        results["wall_s"] = time.perf_counter() - begin
        if args.json:  # after every variant, so a cut-off run keeps what it measured
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1)
    print(tables(results))
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    sys.exit(main())
