#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) for a set time each and prints how many
# inputs each executed. Not part of `cargo test`: the fuzz crate is its own workspace.
#
#   benches/fuzz.sh TARGET|all SECONDS [libFuzzer options…]
#
# Targets: gguf (the GGUF reader and the model's checks on arbitrary bytes), lowprec (sidecar
# loading against a tiny synthetic model), chat_template (hostile templates and messages),
# server_request (chat and completion request bodies, parsed and checked as the handlers do).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Builds and runs at
# nice 19 with one job (the machine is shared with timing benchmarks). Each target starts from
# fuzz/corpus/TARGET (the committed seed-* files plus what earlier runs found, which stays local);
# a crash lands in fuzz/artifacts/TARGET/ and stops the run with a non-zero status.
set -euo pipefail

ALL=(gguf lowprec chat_template server_request)
target=${1:?usage: benches/fuzz.sh TARGET|all SECONDS [libFuzzer options...]}
seconds=${2:?usage: benches/fuzz.sh TARGET|all SECONDS [libFuzzer options...]}
shift 2
if [[ $target == all ]]; then targets=("${ALL[@]}"); else targets=("$target"); fi

cd "$(dirname "$0")/../fuzz"
export CARGO_BUILD_JOBS=1 CMAKE_BUILD_PARALLEL_LEVEL=1
nice -n 19 cargo +nightly fuzz build -O >&2

total=0
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    set +e
    # -timeout: one input may run 10 s at most (a bounded template render takes milliseconds);
    # -rss_limit_mb: minijinja may build one 100 MB string per operation.
    nice -n 19 cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 "$@" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    execs=${execs:-0}
    total=$((total + execs))
    printf '%-16s %12d execs in %ss  (exit %d)\n' "$t" "$execs" "$seconds" "$rc"
    if [[ $rc -ne 0 ]]; then
        status=$rc
        grep -E 'ERROR|panicked|SUMMARY|Test unit written|artifact_prefix' "$log" | head -20 >&2
    fi
    rm -f "$log"
done
printf '%-16s %12d execs\n' total "$total"
exit "$status"
