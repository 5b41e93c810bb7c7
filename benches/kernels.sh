#!/usr/bin/env bash
# The CUDA kernels without a GPU (issue 12): NVRTC and ptxas from NVIDIA's PyPI wheels (installed
# into target/nvidia once), every kernel in kernels/ compiled to PTX for Jetson Orin (sm_87),
# RTX 40 (sm_89) and H100/H200 (sm_90) by `moerun device`, then assembled by ptxas with each
# entry's registers and spills printed. Fails on a compile error or a spill.
#
#   benches/kernels.sh [ARCHS=sm_87,sm_89,sm_90]
#
# Needs a `--features cuda` build (it makes one if target/release/moerun lacks the feature).
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-sm_87,sm_89,sm_90}
nv=target/nvidia
if [ ! -x "$nv/nvidia/cuda_nvcc/bin/ptxas" ] || ! ls "$nv"/nvidia/cuda_nvrtc/lib/libnvrtc.so.* >/dev/null 2>&1; then
    python3 -m pip install -q --disable-pip-version-check --target "$nv" \
        nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86
fi
export LD_LIBRARY_PATH="$PWD/$nv/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo build --release --locked --features cuda
out=target/ptx
rm -rf "$out"
target/release/moerun device --arch "$archs" --kernel-cache off --ptx-out "$out"
spills=0
for ptx in "$out"/*.ptx; do
    arch=${ptx%.ptx}
    arch=${arch##*.}
    log=$("$nv/nvidia/cuda_nvcc/bin/ptxas" -arch="$arch" -v "$ptx" -o /dev/null 2>&1)
    # One line per entry: name, registers, spill stores and loads.
    echo "$log" | awk -v arch="$arch" '
        /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
        /spill stores/ { split($0, a, ","); st = a[2]; ld = a[3]; gsub(/[^0-9]/, "", st); gsub(/[^0-9]/, "", ld) }
        /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
            printf "  %s %-16s %3s registers, spills %s/%s bytes\n", arch, name, r, st, ld }'
    if echo "$log" | grep -Eq '[1-9][0-9]* bytes spill (stores|loads)'; then
        spills=1
    fi
done
[ "$spills" = 0 ] || { echo "kernels: an entry spills registers"; exit 1; }
echo "kernels: every entry compiled and assembled for $archs, no spills"
