"""Spense: 2:4 sparse + dense hybrid weights for vLLM. The format lives in ``vllm_spense.format``.

``register`` is vLLM's general-plugin entry point (``vllm.general_plugins`` in setup.py). vLLM calls it in
the API process and in every worker, possibly more than once: it only imports the config module, whose
decorator adds ``spense`` to vLLM's quantization methods. Nothing here touches CUDA or compiles Triton.
"""

__version__ = "0.1.0"


def register() -> None:
    import importlib

    importlib.import_module("vllm_spense.quant_config")  # its decorator registers "spense", once per process
