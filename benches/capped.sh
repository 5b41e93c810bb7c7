#!/usr/bin/env bash
# Decode speed under a memory cap (issue 4): moerun's expert cache against llama.cpp streaming
# the same GGUF through mmap, each run in its own process inside a memory cgroup, with the page
# cache dropped before each. Needs root (cgroups, drop_caches). Results: bench-results/capped-*.json
#
#   benches/capped.sh MODEL [CAP=2G] [BUDGET=1800MiB] [POLICY=lru] [REPEATS=3]
#
# BUDGET may be `auto` (90% of the room the cgroup leaves); each run prints moerun's peak RSS
# against its bound and the cgroup's OOM kills during the run (issue 13: must be 0).
#
# Extra moerun flags go in MOERUN_ARGS (e.g. MOERUN_ARGS="--low q2_K --t1 0.6 --t2 0.9" for
# HOBBIT mixed precision after `moerun prepare MODEL --low q2_K`); ONLY=moerun skips llama.cpp.
#
# e.g. after `moerun synth --preset qwen3moe --layers 12 --type q4_0 -o scratch/qwen3moe-12L-q4_0.gguf`:
#   benches/capped.sh scratch/qwen3moe-12L-q4_0.gguf 2G 1800MiB lru
set -euo pipefail
model=${1:?usage: benches/capped.sh MODEL [CAP] [BUDGET] [POLICY] [REPEATS]}
cap=${2:-2G}
budget=${3:-1800MiB}
policy=${4:-lru}
repeats=${5:-3}
bin=${MOERUN:-target/release/moerun}
bytes=$(numfmt --from=iec "$cap")
if [ -d /sys/fs/cgroup/memory ]; then # cgroup v1
    cg=/sys/fs/cgroup/memory/moerun-cap
    mkdir -p "$cg"
    echo "$bytes" >"$cg/memory.limit_in_bytes"
    peak() { cat "$cg/memory.max_usage_in_bytes"; echo 0 >"$cg/memory.max_usage_in_bytes"; }
    ooms() { awk '$1 == "oom_kill" {print $2}' "$cg/memory.oom_control"; }
else # cgroup v2 (the parent must delegate +memory)
    cg=/sys/fs/cgroup/moerun-cap
    mkdir -p "$cg"
    echo "$bytes" >"$cg/memory.max"
    peak() { cat "$cg/memory.peak" 2>/dev/null || echo "?"; }
    ooms() { awk '$1 == "oom_kill" {print $2}' "$cg/memory.events"; }
fi
mkdir -p bench-results
run() {
    local name=$1
    shift
    sync
    echo 3 >/proc/sys/vm/drop_caches
    echo "== $name (cap $cap)"
    local before
    before=$(ooms)
    sh -c 'echo $$ >"$0/cgroup.procs"; exec "$@"' "$cg" "$bin" bench -m "$model" -t 2 -r "$repeats" -p 16 -n 32 \
        --json "bench-results/capped-$name.json" "$@" || echo "$name: exit $? (137 = killed by the cap)"
    echo "$name: cgroup peak $(peak) bytes (page cache included), OOM kills $(($(ooms) - ${before:-0}))"
}
# shellcheck disable=SC2086 # MOERUN_ARGS is a list of flags
run "moerun-$policy${MOERUN_ARGS:+-mixed}" --only moerun --memory-budget "$budget" --policy "$policy" ${MOERUN_ARGS:-}
if [ "${ONLY:-}" != moerun ]; then
    run llama-mmap --only llama --llama-repack false
    run llama-default --only llama
fi
