#!/usr/bin/env bash
# Every GPU check and benchmark in one call on the device machine (the CUDA image: torch, triton, transformers).
# Usage: bash benchmarks/run_gpu.sh OUTDIR [check|plugin|memcheck|report|ncu|ab|sweep|sweep_fp8|sweep_mma|sweep_batch|crossover|cusparselt|host|gemm|prune|decode|decode_fp8 ...]   (default: check plugin gemm prune)
set -uo pipefail
out=${1:-/tmp/spense-gpu}; shift || true
steps=${*:-check plugin gemm prune}
mkdir -p "$out"
python3 -m pip install --no-deps --no-build-isolation --no-index -q . >/dev/null 2>&1 || echo "pip install failed"
cd /tmp  # import the installed package, not the source folders
export PYTHONUNBUFFERED=1
src=$OLDPWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
status=0
for step in $steps; do
  case $step in
    check) python3 "$src/benchmarks/check_kernels_gpu.py" 2>&1 | tee "$out/check_kernels.txt" || status=1 ;;
    plugin) python3 "$src/benchmarks/check_plugin_gpu.py" 2>&1 | tee "$out/check_plugin.txt" || status=1 ;;
    memcheck) sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
              [ -n "$sanitizer" ] || { echo "compute-sanitizer not found" | tee "$out/memcheck.txt"; status=1; continue; }
              "$sanitizer" --tool memcheck --leak-check no python3 "$src/benchmarks/check_kernels_gpu.py" --quick 2>&1 \
                | tail -n 60 | tee "$out/memcheck.txt"; [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    report) python3 "$src/benchmarks/kernel_report.py" --json "$out/kernel_report.json" 2>&1 | tee "$out/kernel_report.txt" || status=1 ;;
    ncu) ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
         [ -n "$ncu_bin" ] || { echo "ncu not found" | tee "$out/ncu_summary.txt"; status=1; continue; }
         "$ncu_bin" --clock-control none --profile-from-start off --csv --page raw --section SpeedOfLight \
           --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats \
           --section InstructionStats --metrics dram__bytes_read.sum,smsp__inst_executed.sum \
           python3 "$src/benchmarks/profile_kernels.py" --manifest "$out/ncu_manifest.json" > "$out/ncu.csv" 2> "$out/ncu.err" || status=1
         python3 "$src/benchmarks/profile_kernels.py" --summarize "$out/ncu.csv" "$out/ncu_manifest.json" \
           2>&1 | tee "$out/ncu_summary.txt" || status=1 ;;
    ab) python3 "$src/benchmarks/ab_previous.py" --json "$out/ab_previous.json" 2>&1 | grep -v Warning || status=1 ;;
    sweep_fp8) python3 "$src/benchmarks/bench_gemm.py" --fp8 --sweep "$out/sweep_fp8.json" --sweep-ms 1 8 2>&1 | grep -E "sweep|Error|error:" || status=1 ;;
    sweep_mma) python3 "$src/benchmarks/bench_gemm.py" --sweep "$out/sweep_mma.json" --sweep-ms 8 --shapes 2>&1 | grep -E "sweep|Error|error:" || status=1
               python3 "$src/benchmarks/bench_gemm.py" --fp8 --sweep "$out/sweep_mma_fp8.json" --sweep-ms 8 2>&1 | grep -E "sweep|Error|error:" || status=1 ;;
    sweep_batch) python3 "$src/benchmarks/bench_gemm.py" --sweep "$out/sweep_batch.json" --sweep-ms 2 4 8 16 --sweep-kernels mma gemv --shapes 2>&1 | grep -E "sweep|Error|error:" || status=1 ;;
    sweep) python3 "$src/benchmarks/bench_gemm.py" --sweep "$out/sweep.json" --shapes 2>&1 | grep -E "sweep|Error|error:" || status=1 ;;
    gemm)  python3 "$src/benchmarks/bench_gemm.py" --fp8 --json "$out/bench_gemm.json" 2>&1 | tail -n 200 > "$out/bench_gemm.log" || status=1 ;;
    prune) python3 "$src/benchmarks/bench_prune.py" --json "$out/bench_prune.json" 2>&1 | grep -v "pruning:" | tee "$out/bench_prune.log" || status=1 ;;
    cusparselt) python3 "$src/benchmarks/bench_cusparselt.py" --json "$out/bench_cusparselt.json" 2>&1 | grep -v Warn | tail -n 45 || status=1
                python3 "$src/benchmarks/bench_cusparselt.py" --algs --json "$out/cusparselt_algs.json" 2>&1 | grep -c '"shape"' || status=1 ;;
    host) python3 "$src/benchmarks/bench_cusparselt.py" --host --shapes "8B o" "8B qkv" --ms 2048 --json "$out/bench_cusparselt_host.json" 2>&1 \
            | grep -v Warn || status=1 ;;
    crossover) python3 "$src/benchmarks/bench_gemm.py" --crossover "$out/crossover.json" 2>&1 | grep crossover || status=1 ;;
    decode) python3 "$src/benchmarks/bench_decode.py" --json "$out/bench_decode.json" 2>&1 | tee "$out/bench_decode.log" || status=1 ;;
    decode_fp8) python3 "$src/benchmarks/bench_decode.py" --variants dense "rho=0.25" "dense fp8" "fp8 rho=0.25" \
                  --json "$out/bench_decode_fp8.json" 2>&1 | tee "$out/bench_decode_fp8.log" || status=1 ;;
  esac
done
exit $status
