#!/usr/bin/env bash
# Container entrypoint (docker/Dockerfile, docker/Dockerfile.cpu).
#   serve [vllm args...]          (default) vLLM's OpenAI server on $SPENSE_MODEL with the Spense plugin
#   prune <model> --out <dir> ... spense-prune inside the image (a HF folder or .gguf -> Spense checkpoint)
#   <any other command>           run it (a shell, python, ...)
# Settings, all overridable: SPENSE_MODEL (/models/model), SPENSE_SERVED_NAME (spense), HOST (0.0.0.0),
# PORT (8000), SPENSE_DTYPE (auto; float32 in the CPU image), SPENSE_EXTRA_ARGS (more vLLM flags);
# arguments after "serve" go to vLLM last, so they win.
set -euo pipefail

mode="${1:-serve}"
if [ "$#" -gt 0 ]; then shift; fi

case "$mode" in
  serve)
    model="${SPENSE_MODEL:-/models/model}"
    if [ ! -f "$model/config.json" ]; then
      echo "spense-entrypoint: no model at $model (no config.json). Mount a Spense checkpoint folder there," \
           "e.g. -v /path/to/model-spense:/models/model:ro, or set SPENSE_MODEL." >&2
      exit 2
    fi
    # shellcheck disable=SC2086  # SPENSE_EXTRA_ARGS is a list of flags, split on purpose
    exec python3 -m vllm.entrypoints.openai.api_server \
      --model "$model" --served-model-name "${SPENSE_SERVED_NAME:-spense}" \
      --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" --dtype "${SPENSE_DTYPE:-auto}" \
      --quantization spense ${SPENSE_EXTRA_ARGS:-} "$@"
    ;;
  prune)
    exec spense-prune "$@"
    ;;
  *)
    exec "$mode" "$@"
    ;;
esac
