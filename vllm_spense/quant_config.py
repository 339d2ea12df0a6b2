"""``SpenseConfig``: vLLM's view of a Spense checkpoint (``quant_method: "spense"`` in config.json).

vLLM builds it from the checkpoint's ``quantization_config``, so a Spense checkpoint serves with or without
``--quantization spense``. Before any worker starts, ``maybe_update_config`` checks every safetensors header
of a local checkpoint (names, shapes, dtypes), so a broken checkpoint fails before the server accepts
requests, with the layer and tensor named. Layers in ``ignore`` load as vLLM's unquantized Linear.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_spense.format import QUANT_METHOD, SpenseFormatError, SpenseQuantConfig


@register_quantization_config(QUANT_METHOD)
class SpenseConfig(QuantizationConfig):
    def __init__(self, spense: SpenseQuantConfig):
        super().__init__()
        self.spense = spense

    def __repr__(self) -> str:
        return f"SpenseConfig({self.spense})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Triton MMAs on bf16 need Ampere or newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        # vLLM reads quantization_config from config.json itself; this file is only consulted when the user
        # passes --quantization spense on a checkpoint without one, and from_config then says so clearly.
        return [os.sep + "config.json"]  # vLLM matches by suffix: not generation_config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SpenseConfig":
        if "quant_method" not in config and "architectures" in config:  # the whole config.json: no Spense block
            raise SpenseFormatError(
                "--quantization spense: this checkpoint's config.json has no quantization_config with "
                "quant_method 'spense'; make a Spense checkpoint with spense-prune first, or drop the flag to "
                "serve the model densely")
        spense = SpenseQuantConfig.from_dict(config)
        return cls(spense)

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        if os.path.isdir(model_name):
            from vllm_spense.checkpoint import check_checkpoint_headers

            check_checkpoint_headers(model_name, self.spense)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead) and attention stay unquantized
        if self._is_ignored(prefix):
            return UnquantizedLinearMethod()
        from vllm_spense.linear_method import SpenseLinearMethod

        return SpenseLinearMethod(self, prefix)

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint layer names behind a vLLM module: q/k/v_proj behind qkv_proj, and so on."""
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(name)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]

    def _is_ignored(self, prefix: str) -> bool:
        ignored = {name: self.spense.is_ignored(name) for name in self.shard_names(prefix)}
        if len(set(ignored.values())) > 1:
            raise SpenseFormatError(
                f"layer {prefix}: vLLM merges {sorted(ignored)} into one layer, but quantization_config.ignore "
                f"skips only {sorted(n for n, skip in ignored.items() if skip)}; merged layers must be pruned "
                f"or skipped together")
        return all(ignored.values())
