#!/usr/bin/env bash
# Paired runs of `moerun generate` under an expert budget, alternating configurations run by run
# (this host's speed drifts), reporting each one's median decode tok/s, stall per decoded token,
# hit rate, bytes read per token and the predictor's recall by distance (issue 11).
#
#   benches/predict_ab.sh MODEL BUDGET PAIRS "CONFIG A" "CONFIG B" ...
#
# e.g. benches/predict_ab.sh models/rustdoc-moe-Q8_0.gguf 25% 5 "--predict off" "--predict 1"
# Extra flags for every run go in ARGS (default: 300 tokens after a fixed 16-token prompt); a
# text prompt in PROMPT.
set -euo pipefail
model=${1:?usage: benches/predict_ab.sh MODEL BUDGET PAIRS CONFIG...}
budget=$2
pairs=$3
shift 3
bin=${MOERUN:-target/release/moerun}
args=${ARGS:-${PROMPT:+-n 300}}
args=${args:---prompt-tokens 16 -n 300}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for ((i = 0; i < pairs; i++)); do
    for ((c = 1; c <= $#; c++)); do
        # shellcheck disable=SC2086 # configs and ARGS are flag lists
        "$bin" generate -m "$model" ${PROMPT:+-p "$PROMPT"} $args --temp 0 --ignore-eos --expert-budget "$budget" ${!c} --json \
            2>/dev/null >>"$tmp/$c.jsonl"
    done
done
for ((c = 1; c <= $#; c++)); do
    python3 - "$tmp/$c.jsonl" "${!c}" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: statistics.median(xs)
c = [r["expert_cache"] for r in runs]
toks = [r["prompt_tokens"] + r["generated_tokens"] for r in runs]
p = c[-1].get("predictor")
recall = ", ".join(f"d{d['distance']} {d['recall']:.3f}" for d in p["per_distance"]) if p else "-"
print(f"{sys.argv[2]:<28} decode {med([r['decode_tok_s'] for r in runs]):7.1f} tok/s "
      f"[{min(r['decode_tok_s'] for r in runs):.1f}-{max(r['decode_tok_s'] for r in runs):.1f}]  "
      f"stall {med([x['stall_ms_per_token'] for x in c]):6.2f} ms/tok  hit {med([x['hit_rate'] for x in c]):.3f}  "
      f"read {med([(x['bytes_read_high'] + x['bytes_read_low']) / t for x, t in zip(c, toks)]) / 1048576:6.2f} MiB/tok  "
      f"recall {recall}" + (f"  prefetched {p['prefetched']} used {p['prefetched_used']}" if p else ""))
PY
done
