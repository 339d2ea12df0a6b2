#!/usr/bin/env bash
# On the GPU machine (see prepare.sh): receive a part, install vLLM + the plugin, run the serving benchmark, or
# profile a lone prefill (profile).
set -uo pipefail
store=/tmp/vllm_ship
case $1 in
  receive) mkdir -p "$store" && cp ".vllm_ship/$2" "$store/" && du -sh "$store" ;;
  install)
    [ -n "${2:-}" ] && cp ".vllm_ship/$2" "$store/"
    cat "$store"/part_* | tar -x -C "$store" || exit 1
    # Every shipped wheel whose distribution the image lacks, without dependency resolution: mistral-common
    # pins numpy < 2.4 and the image's numpy 2.5 (which torch was built with) must stay.
    python3 - "$store/payload/wheels" <<'PY' || exit 1
import glob, importlib.metadata as md, re, subprocess, sys
missing = []
for wheel in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    try:
        md.version(re.split(r"-\d", wheel.rsplit("/", 1)[1])[0])
    except md.PackageNotFoundError:
        missing.append(wheel)
print(len(missing), "wheels to install")
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *missing]).returncode)
PY
    python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
    src=$PWD && cd /tmp
    python3 -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)" 2>&1 | tail -5
    python3 "$src/benchmarks/vllm_gpu/make_checkpoints.py" /tmp/vm "$store/payload/tokenizer" ;;
  bench)
    out=${2:-/tmp/out}
    cd /tmp && src=$OLDPWD
    [ -d /tmp/vm/spense_fp8 ] || python3 "$src/benchmarks/vllm_gpu/make_checkpoints.py" /tmp/vm "$store/payload/tokenizer" || exit 1
    # e.g. MODELS="dense spense_fp8", or an A/B of a switch in both orders (bench_serving.py's docstring):
    # MODELS="dense spense spense@SPENSE_OVERLAP_REGIONS=1 spense"
    models=(${MODELS:-dense spense})
    batches=(${BATCHES:-1 8 32})  # concurrent requests, e.g. BATCHES="1 2 8"
    # MAX_TOKENS: tokens each request generates; e.g. 1024 at batch 128, for a window in which all decode
    python3 "$src/benchmarks/vllm_gpu/bench_serving.py" --models "${models[@]/#//tmp/vm/}" --batches "${batches[@]}" \
      --max-tokens "${MAX_TOKENS:-128}" --json "$out/vllm_serving.json" --logs "$out"
    status=$?
    for f in "$out"/vllm_*.log; do tail -c 200000 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
    exit $status ;;
  profile)  # a lone prefill under vLLM with its engine in process, dense then Spense (profile_prefill.py),
            # e.g. LENGTHS="2048 4064" (make_checkpoints.py's models declare 4096 positions)
    out=${2:-/tmp/out}
    cd /tmp && src=$OLDPWD
    for model in ${MODELS:-dense spense}; do
      python3 "$src/benchmarks/vllm_gpu/profile_prefill.py" "/tmp/vm/$model" --length ${LENGTHS:-2048} \
        --json "$out/vllm_prefill_profile_$model.json" \
        > "$out/vllm_prefill_profile_$model.log" 2>&1 || exit 1
      echo "$model:" && grep -A14 "prefill .* tokens median" "$out/vllm_prefill_profile_$model.log" | cut -c1-160
    done ;;
esac
