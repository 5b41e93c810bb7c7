#!/usr/bin/env bash
# What a lent GPU machine runs (issue 12), in two halves, since that machine has no Rust toolchain
# and no network:
#
#   benches/device-check.sh prepare   # here: the --features cuda binary, stripped, and the models
#                                     # into devcheck/ (git-ignored; under the 64 MiB carry limit)
#   benches/device-check.sh run       # there (carry devcheck): the device, every kernel against
#                                     # the CPU, results in $OUT (or devcheck/out)
#
# With the device tool: run(command="benches/device-check.sh run", carry=["devcheck"]).
# NVRTC comes from the machine's CUDA install (libnvrtc on the loader's path).
# The CUDA Backend (decode and prefill on the GPU, --gpu-budget, --unified) is not built yet; its
# rows are printed as such, so the table shows what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    cargo build --release --locked --features cuda
    rm -rf devcheck
    mkdir -p devcheck
    strip -o devcheck/moerun target/release/moerun
    cp models/rustdoc-moe-Q8_0.gguf devcheck/
    du -sh devcheck
    ;;
run)
    out=${OUT:-devcheck/out}
    mkdir -p "$out"
    bin=devcheck/moerun
    # Libraries NVIDIA installs outside the default path.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/lib/x86_64-linux-gnu; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.txt" || true
    "$bin" device | tee "$out/device.txt"
    "$bin" device --kernel-cache "$out/kernels" | tee -a "$out/device.txt"
    # Once more: every file from the on-disk cache.
    "$bin" device --kernel-cache "$out/kernels" | tee -a "$out/device.txt"
    "$bin" device --self-test --kernel-cache "$out/kernels" --json "$out/selftest.json" | tee "$out/selftest.txt"
    # The CPU on this machine, for the table's other column.
    "$bin" bench -m devcheck/rustdoc-moe-Q8_0.gguf -p 64 -n 64 -r 3 --json "$out/bench-cpu.json" | tee "$out/bench-cpu.txt"
    echo "CUDA backend (fidelity on the fixtures, decode/prefill, --gpu-budget, --unified): not built yet"
    ;;
*)
    echo "usage: benches/device-check.sh prepare|run" >&2
    exit 2
    ;;
esac
