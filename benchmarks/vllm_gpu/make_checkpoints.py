"""Write a Qwen3-8B-shaped checkpoint three times on the GPU machine, for vLLM: dense bf16, Spense (rho = 0.25)
and Spense with FP8 values (``spense_fp8``: the same pruned weights, per-output-channel scales).

    python benchmarks/vllm_gpu/make_checkpoints.py OUT_DIR TOKENIZER_DIR

Same random weights as benchmarks/bench_decode.py (``layer_weights``, seeded per layer) in Hugging Face
Qwen3 names; the Spense copy is magnitude-pruned outside a balanced magnitude-chosen dense region (one mask
per layer input: q/k/v share one, gate/up share one) and packed by ``format.pack``. One safetensors shard
per layer, written as the layer is made, so GPU memory holds one layer at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/: bench_decode
from bench_decode import CHUNK_SIZE, QWEN3_8B, layer_weights, magnitude_spense  # noqa: E402

from vllm_spense.format import SpenseQuantConfig, fp8_scales, pack  # noqa: E402

RHO = 0.25


def hf_config(cfg) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab, "max_position_embeddings": 4096, "rms_norm_eps": cfg.eps,
            "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "torch_dtype": "bfloat16", "dtype": "bfloat16", "bos_token_id": 0,
            "eos_token_id": 1}


def spense_tensors(prefix: str, weight: torch.Tensor, parts: list[tuple[str, int]]) -> dict[str, dict]:
    """One merged weight pruned with one shared mask, split back into its checkpoint layers: the tensors of
    the bf16 (``spense``) and the FP8 (``spense_fp8``) checkpoint."""
    pruned, mask = magnitude_spense(weight, RHO)
    tensors, start = {"spense": {}, "spense_fp8": {}}, 0
    for name, rows in parts:
        layer, part = f"{prefix}.{name}", pruned[start:start + rows]
        tensors["spense"].update(pack(part, mask, CHUNK_SIZE, layer).tensors(layer))
        tensors["spense_fp8"].update(pack(part, mask, CHUNK_SIZE, layer, weight_scale=fp8_scales(part)).tensors(layer))
        start += rows
    return tensors


def main(out: str, tokenizer: str, cfg=QWEN3_8B, device: str = "cuda") -> None:
    dtype = torch.bfloat16
    folders = {kind: pathlib.Path(out) / kind for kind in ("dense", "spense", "spense_fp8")}
    shards = cfg.layers + 1
    index = {kind: {} for kind in folders}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        generator = torch.Generator(device=device).manual_seed(i)
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i < cfg.layers:
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            common = {f"model.layers.{i}.input_layernorm.weight": torch.ones(cfg.hidden, dtype=dtype),
                      f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(cfg.hidden, dtype=dtype),
                      f"{attn}.q_norm.weight": torch.ones(cfg.head_dim, dtype=dtype),
                      f"{attn}.k_norm.weight": torch.ones(cfg.head_dim, dtype=dtype)}
            tensors = {kind: dict(common) for kind in folders}
            for name, weight, parts in layer_weights(cfg, generator, device, dtype):
                prefix = mlp if name in ("gate_up_proj", "down_proj") else attn
                start = 0
                for part, rows in parts:
                    tensors["dense"][f"{prefix}.{part}.weight"] = weight[start:start + rows].cpu().contiguous()
                    start += rows
                for kind, packed in spense_tensors(prefix, weight, parts).items():
                    tensors[kind].update({k: v.cpu().contiguous() for k, v in packed.items()})
        else:
            embed = torch.randn(cfg.vocab, cfg.hidden, generator=generator, device=device, dtype=dtype)
            lm_head = torch.randn(cfg.vocab, cfg.hidden, generator=generator, device=device, dtype=dtype)
            rest = {"model.embed_tokens.weight": embed.cpu(), "lm_head.weight": (lm_head / math.sqrt(cfg.hidden)).cpu(),
                    "model.norm.weight": torch.ones(cfg.hidden, dtype=dtype)}
            tensors = dict.fromkeys(folders, rest)
        for kind, folder in folders.items():
            save_file(tensors[kind], str(folder / shard))
            index[kind].update(dict.fromkeys(tensors[kind], shard))
    quant = SpenseQuantConfig(dense_fraction=RHO, chunk_size=CHUNK_SIZE,
                              pruning={"method": "magnitude", "selection": "magnitude", "note": "random weights"})
    for kind, folder in folders.items():
        config = hf_config(cfg)
        if kind != "dense":
            weight_dtype = "float8_e4m3fn" if kind == "spense_fp8" else None
            config["quantization_config"] = dataclasses.replace(quant, weight_dtype=weight_dtype).to_dict()
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index[kind]}))
        for file in pathlib.Path(tokenizer).iterdir():
            shutil.copy(file, folder / file.name)
        print(kind, folder, sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, "GiB", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
