#!/usr/bin/env bash
# Does `moerun sim --device` predict what a real run measures? Runs `moerun generate` under an
# expert budget RUNS times (prediction and routing profiles off, a routing trace written), then
# replays the trace through the cost model of DEVICE with the same number of cache slots, and
# prints measured vs predicted decode tok/s and stall per token (issue 11).
#
#   benches/sim_validate.sh MODEL "BUDGET FLAGS" [DEVICE=devices/vm-2core.toml] [RUNS=3]
#
# e.g. benches/sim_validate.sh models/rustdoc-moe-Q8_0.gguf "--expert-budget 25%"
#      CAP=2G benches/sim_validate.sh scratch/qwen3moe-12L-q4_0.gguf "--memory-budget 1800MiB"
# With CAP (root, cgroup v1 or v2), each run is inside a memory cgroup of that size, page cache
# dropped first, as benches/capped.sh runs it. Extra generate flags go in ARGS.
set -euo pipefail
model=${1:?usage: benches/sim_validate.sh MODEL "BUDGET FLAGS" [DEVICE] [RUNS]}
budget=$2
device=${3:-devices/vm-2core.toml}
runs=${4:-3}
bin=${MOERUN:-target/release/moerun}
args=${ARGS:---prompt-tokens 16 -n 128}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
enter_cap() { :; }
if [ -n "${CAP:-}" ]; then
    bytes=$(numfmt --from=iec "$CAP")
    if [ -d /sys/fs/cgroup/memory ]; then
        cg=/sys/fs/cgroup/memory/moerun-cap
        mkdir -p "$cg"
        echo "$bytes" >"$cg/memory.limit_in_bytes"
    else
        cg=/sys/fs/cgroup/moerun-cap
        mkdir -p "$cg"
        echo "$bytes" >"$cg/memory.max"
    fi
fi
for ((i = 0; i < runs; i++)); do
    if [ -n "${CAP:-}" ]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
        # shellcheck disable=SC2086 # flag lists
        sh -c 'echo $$ >"$0/cgroup.procs"; exec "$@"' "$cg" "$bin" generate -m "$model" $args --temp 0 --ignore-eos \
            $budget --predict off --profile off --trace "$tmp/trace.jsonl" --json 2>/dev/null >>"$tmp/runs.jsonl"
    else
        # shellcheck disable=SC2086
        "$bin" generate -m "$model" $args --temp 0 --ignore-eos $budget --predict off --profile off \
            --trace "$tmp/trace.jsonl" --json 2>/dev/null >>"$tmp/runs.jsonl"
    fi
done
read -r slots tok stall < <(python3 - "$tmp/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
c = runs[-1]["expert_cache"]
print(c["slots_high"], statistics.median(r["decode_tok_s"] for r in runs),
      statistics.median(r["expert_cache"]["stall_ms_per_token"] for r in runs))
PY
)
expert=$(head -1 "$tmp/trace.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["expert_bytes_high"])')
"$bin" sim "$tmp/trace.jsonl" -m "$model" --budgets "$((slots * expert))" --policies lru --device "$device" --json \
    >"$tmp/sim.json"
python3 - "$tmp/sim.json" "$tok" "$stall" "$slots" <<'PY'
import json, sys
est = json.load(open(sys.argv[1]))[0]["decode_estimate"]
tok, stall, slots = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
p = est["decode_tok_s"]
print(f"{slots} slots: measured {tok:.1f} tok/s, stall {stall:.2f} ms/token; "
      f"sim {p:.1f} tok/s, stall {est['stall_ms_per_token']:.2f} ms/token; error {100 * (p / tok - 1):+.1f}%")
PY
