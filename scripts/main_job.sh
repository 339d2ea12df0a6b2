#!/usr/bin/env bash
# The main job on the embedded default model: prune, evaluate, serve with vLLM and ask a question,
# then print the quality table (dense vs SparseGPT 2:4 vs SpenseGPT perplexity).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/smollm2-135m-spense-0.25
spense-prune --out "$out" --overwrite                 # SpenseGPT, rho = 0.25, 64 x 512 calibration tokens
spense-eval "$out"                                    # the checkpoint as written (bf16), rebuilt densely
python3 scripts/serve_and_ask.py "$out"               # vllm serve (CPU, float32) + the OpenAI client
python3 -m vllm_spense.offline.quality                # dense vs SparseGPT 2:4 vs SpenseGPT, float32
