"""Spense: 2:4 sparse + dense hybrid weights for vLLM. The format lives in ``vllm_spense.format``."""

__version__ = "0.1.0"
