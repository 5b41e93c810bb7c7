#!/usr/bin/env bash
# What a lent GPU machine runs (issue 12), in two halves, since that machine has no Rust toolchain
# and no network:
#
#   benches/device-check.sh prepare   # here: the --features cuda binary (gzipped) and the fixture
#                                     # models that fit beside the working tree into devcheck/
#                                     # (git-ignored; the tree and the carry share 64 MiB)
#   benches/device-check.sh run       # there (carry devcheck): results in $OUT (or devcheck/out)
#
# With the device tool: run(command="benches/device-check.sh run", carry=["devcheck"], timeout_s=590).
#
# `run`, in order, each step under its own time limit so the table comes back whatever stalls:
#   1. the device and every kernel compiled by NVRTC (then again from the on-disk cache);
#   2. `moerun device --self-test`: every kernel against the host, then whole synthetic models of
#      every family through the CUDA backend against the CPU and plain backends, all resident and
#      with --gpu-budget 50%, --unified, --cpu-moe, --n-cpu-moe 1 and --cpu-misses always;
#   3. `moerun device --oracle`: llama.cpp's reference cases on the GPU, for every fixture carried;
#   4. the bundled model's greedy answer on the CPU and on the GPU under every memory setting
#      (logits bit for bit across GPU settings; tokens against the CPU's, from which a near-tie
#      may part them: this model amplifies rounding, and step 3 holds the GPU to llama.cpp's own
#      greedy continuations);
#   5. speed: Qwen3-30B-A3B- and Mixtral-8x7B-shaped synthetic models written there (`moerun
#      synth`), decode and prefill all resident, with --gpu-budget 25% fed from RAM (the file
#      mapping through the staging ring, with and without the predictor's copies ahead of need;
#      and an expert cache holding every expert in page-locked RAM) and from disk (an expert
#      cache of 10% in RAM, misses read with io_uring and O_DIRECT), the misses split between
#      the link and the CPU (--cpu-misses auto), --unified, experts on the CPU (--cpu-moe, and
#      --n-cpu-moe for three quarters of the layers), and the CPU alone; one table with each figure's fraction of its
#      physical bound (bytes per token over 4.3 TB/s HBM all resident, over 55 GB/s PCIe for the
#      bytes copied per token).
set -euo pipefail
cd "$(dirname "$0")/.."
# The fixtures carried (the rest run under the emulated driver in CI): one or two files per
# family, within the carry limit. rustdoc-moe travels as models/ (the bundled model).
FIXTURES=(
    fixtures/mixtral-tiny/mixtral-tiny-Q4_0
    fixtures/mixtral-tiny/mixtral-tiny-Q4_K_M
    fixtures/qwen3moe-tiny/qwen3moe-tiny-Q4_K_M
    fixtures/qwen3moe-tiny/qwen3moe-tiny-Q8_0
    fixtures-next/deepseek2-tiny/deepseek2-tiny-Q4_K_M
    fixtures-next/gptoss-tiny/gptoss-tiny-MXFP4_MOE
    fixtures-next/llama-dense-tiny/llama-dense-tiny-Q4_1
    fixtures-next/qwen2moe-tiny/qwen2moe-tiny-Q4_K_M
)
case "${1:-}" in
prepare)
    cargo build --release --locked --features cuda
    rm -rf devcheck
    mkdir -p devcheck/fixtures/rustdoc-moe
    strip -o devcheck/moerun target/release/moerun
    gzip -9 devcheck/moerun
    for f in "${FIXTURES[@]}"; do
        mkdir -p "devcheck/$(dirname "$f")"
        cp "../shared/$f.gguf" "../shared/$f.ref.json" "devcheck/$(dirname "$f")/"
    done
    cp ../shared/fixtures/rustdoc-moe/rustdoc-moe-Q8_0.ref.json devcheck/fixtures/rustdoc-moe/
    du -sh devcheck
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    carry=$(du -sb devcheck | cut -f1)
    echo "working tree $((tree >> 20)) MiB + devcheck $((carry >> 20)) MiB (limit 64 MiB)"
    [ $((tree + carry)) -lt $((64 << 20)) ] || { echo "over the carry limit"; exit 1; }
    ;;
run)
    start=$SECONDS
    out=${OUT:-devcheck/out}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    bin=/tmp/moerun
    gunzip -c devcheck/moerun.gz >"$bin"
    chmod +x "$bin"
    ln -sf "$PWD/models/rustdoc-moe-Q8_0.gguf" devcheck/fixtures/rustdoc-moe/rustdoc-moe-Q8_0.gguf
    # Libraries NVIDIA installs outside the default path.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    # cudarc looks for libnvrtc.so, .so.12, .so.11 …: a CUDA 13 install may have only
    # libnvrtc.so.13, so link the newest one found under that name.
    if ! ldconfig -p | grep -q 'libnvrtc\.so '; then
        mkdir -p /tmp/nvlib
        nv=$(ls /usr/local/cuda*/lib64/libnvrtc.so.* /usr/local/cuda*/targets/*/lib/libnvrtc.so.* \
            /usr/lib/x86_64-linux-gnu/libnvrtc.so.* 2>/dev/null | grep -v builtins | sort -V | tail -1 || true)
        if [ -n "$nv" ]; then
            ln -sf "$nv" /tmp/nvlib/libnvrtc.so
            export LD_LIBRARY_PATH="/tmp/nvlib:$(dirname "$nv")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    fi
    step() { # name, seconds, command...: output into $out/<name>.txt, never stops the script
        local name=$1 secs=$2
        shift 2
        echo "== $name"
        timeout "$secs" "$@" >"$out/$name.txt" 2>&1 || echo "   ($name ended with status $?)" | tee -a "$out/$name.txt"
        tail -n 4 "$out/$name.txt"
    }
    kc=/tmp/kernels
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.txt" 2>&1 || true
    step device 60 sh -c "$bin device --kernel-cache $kc && $bin device --kernel-cache $kc"
    step selftest 150 "$bin" device --self-test --kernel-cache "$kc" --json "$out/selftest.json"
    step oracle 120 "$bin" device --kernel-cache "$kc" --oracle devcheck/fixtures --oracle devcheck/fixtures-next
    # The bundled model under every memory setting (greedy, 32 tokens).
    gen() { # name, flags...
        local name=$1
        shift
        timeout 60 "$bin" generate -p "/// Returns the number of" -n 32 --temp 0 --json "$@" >"$out/gen-$name.json" 2>>"$out/gen.txt" ||
            echo "generate $name failed" | tee -a "$out/gen.txt"
    }
    echo "== generate (bundled model, every memory setting)"
    gen cpu --device cpu
    gen cuda --device cuda
    gen budget --device cuda --gpu-budget 25%
    gen cache --device cuda --gpu-budget 25% --memory-budget 1GiB
    gen unified --device cuda --unified --memory-budget 1GiB
    gen cpumoe --device cuda --cpu-moe
    gen cpumiss --device cuda --gpu-budget 25% --cpu-misses always
    # Speed on models at real layer shapes, written here.
    mkdir -p /tmp/synth
    step synth 240 sh -c "$bin synth --preset qwen3moe --layers 8 -o /tmp/synth/qwen3moe.gguf && $bin synth --preset mixtral --layers 4 -o /tmp/synth/mixtral.gguf"
    bench() { # model, name, generated tokens, repeats, flags...
        local m=$1 name=$2 n=$3 r=$4
        shift 4
        # Leave time for the table inside the device tool's 590 s.
        if ((SECONDS - start > 520)); then
            echo "bench $m $name skipped: $((SECONDS - start)) s gone" | tee -a "$out/bench.txt"
            return
        fi
        echo "-- $m $name" >>"$out/bench.txt"
        timeout 100 "$bin" bench -m "/tmp/synth/$m.gguf" -p 512 -n "$n" -r "$r" --profile off --json "$out/bench-$m-$name.json" "$@" \
            >>"$out/bench.txt" 2>&1 || echo "bench $m $name failed ($?)" | tee -a "$out/bench.txt"
    }
    echo "== bench"
    for m in qwen3moe mixtral; do
        [ -f "/tmp/synth/$m.gguf" ] || continue
        bench "$m" resident 64 3 --device cuda
        bench "$m" gpu25-ram 64 3 --device cuda --gpu-budget 25%
        if [ "$m" = qwen3moe ]; then
            # The same without the predictor's copies ahead of need, and with the predictor that
            # reads the state entering each layer (one more read per layer; the default here is
            # `fate`, from the router input); and fed from an expert cache holding every expert
            # in page-locked RAM (copies straight to the device, no staging).
            bench "$m" gpu25-ram-nopredict 64 3 --device cuda --gpu-budget 25% --predict off
            bench "$m" gpu25-ram-predict1 64 3 --device cuda --gpu-budget 25% --predict 1
            bench "$m" gpu25-pinned 64 3 --device cuda --gpu-budget 25% --expert-budget 100%
            # The planner: each layer's misses split between the link and the CPU by measured rate.
            bench "$m" gpu25-cpumiss 64 3 --device cuda --gpu-budget 25% --cpu-misses auto
        fi
        # Misses from disk (1.6 GB/s there): a Mixtral-shaped token may read 2 GB, so fewer tokens.
        bench "$m" gpu25-disk 16 1 --device cuda --gpu-budget 25% --expert-budget 10%
        bench "$m" unified 32 1 --device cuda --unified --expert-budget 25%
        bench "$m" cpu-moe 32 1 --device cuda --cpu-moe
        # The same 25% of the experts on the GPU as gpu25-*, but a fixed quarter of the layers
        # resident and the rest computed on the CPU (llama.cpp's --n-cpu-moe), side by side.
        case $m in
        qwen3moe) bench "$m" n-cpu-moe-75 32 1 --device cuda --n-cpu-moe 6 ;;
        mixtral) bench "$m" n-cpu-moe-75 32 1 --device cuda --n-cpu-moe 3 ;;
        esac
        bench "$m" cpu 32 1 --device cpu -t 16
    done
    if command -v python3 >/dev/null; then
        python3 benches/device_table.py "$out" | tee "$out/table.md"
    else
        grep -h "" "$out"/bench.txt
    fi
    ;;
*)
    echo "usage: benches/device-check.sh prepare|run" >&2
    exit 2
    ;;
esac
