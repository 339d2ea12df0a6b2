#!/usr/bin/env bash
# Here, with a package index: the wheels vLLM 0.25.0 needs beyond the GPU image, and a tokenizer, as one tar
# split into parts of 50 MiB that travel one per device call (.vllm_ship/ is git-ignored; a part and the
# working tree must stay under the 64 MiB a call carries). Then, on the device, in consecutive calls (each
# within 30 s of the last, while the machine stays warm):
#   bash benchmarks/vllm_gpu/device.sh receive part_00     (carry .vllm_ship/part_00)   ... one per part
#   bash benchmarks/vllm_gpu/device.sh install             (carry the last part too, and install)
#   bash benchmarks/vllm_gpu/device.sh bench $OUT          (checkpoints + dense and Spense vllm serve)
set -euo pipefail
ship=.vllm_ship
rm -rf "$ship" && mkdir -p "$ship/payload/wheels"
where=(--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform any -d "$ship/payload/wheels")
pip download -q --no-deps vllm==0.25.0 "${where[@]}"
# compressed-tensors and xgrammar pin torch, which the GPU image has: fetched without their dependencies.
grep -v "^compressed-tensors\|^xgrammar" benchmarks/vllm_gpu/requirements.txt > "$ship/resolvable.txt"
pip download -q -r "$ship/resolvable.txt" loguru frozendict "${where[@]}"
pip download -q --no-deps "compressed-tensors==0.17.0" "xgrammar>=0.2.1,<1.0.0" "${where[@]}"
# Found missing on the device one import at a time: cachetools; llguidance (the mirror has 1.6.1, vLLM asks
# >= 1.7; 1.6.1 imports and is used only for llguidance-guided decoding); apache-tvm-ffi newer than vLLM's
# 0.1.9 pin, which is for flashinfer (not shipped) while xgrammar 0.2.8 needs a newer one.
pip download -q --no-deps cachetools "llguidance==1.6.1" apache-tvm-ffi "${where[@]}"
rm -f "$ship"/payload/wheels/numpy-*.whl  # the image's numpy is newer; replacing it could break torch
python -c "from tests.conftest import train_tokenizer; train_tokenizer().save_pretrained('$ship/payload/tokenizer')"
tar -C "$ship" -cf "$ship/payload.tar" payload
split -b 50m -d "$ship/payload.tar" "$ship/part_"
rm -rf "$ship/payload" "$ship/payload.tar"
ls -la "$ship"
