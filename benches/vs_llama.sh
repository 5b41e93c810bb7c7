#!/usr/bin/env bash
# Paired speed runs against the native llama.cpp a user builds (../shared/tools/setup-llamacpp.sh:
# GGML_NATIVE, minus AMX), measured as a script sees them: `moerun generate --json`'s
# decode_tok_s / prefill_tok_s against llama-bench's t/s, one run of each per pair, the order
# flipping every pair (this host's speed drifts by ±20% within a minute, so only paired ratios
# are stable). Prints every pair, the medians with min–max, moerun's run-to-run spread, and the
# median of the paired ratios.
#
# usage: benches/vs_llama.sh MODEL [decode|prefill] [TOKENS] [PAIRS]
#   decode:  TOKENS generated after a short prompt (llama-bench -p 0 -n TOKENS), default 128
#   prefill: a TOKENS-token pseudo-random prompt (llama-bench -p TOKENS -n 0), default 64
# env: THREADS (default 2), MOERUN (default target/release/moerun), LLAMA_BENCH (default: the
#      setup script's build), MOERUN_ARGS (extra flags for moerun generate)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: benches/vs_llama.sh MODEL [decode|prefill] [TOKENS] [PAIRS]}
mode=${2:-decode}
case "$mode" in
    decode) n=${3:-128} ;;
    prefill) n=${3:-64} ;;
    *) echo "mode must be decode or prefill" >&2; exit 2 ;;
esac
pairs=${4:-5}
threads=${THREADS:-2}
moerun=${MOERUN:-target/release/moerun}
if [ -z "${LLAMA_BENCH:-}" ]; then
    bin=$(bash ../shared/tools/setup-llamacpp.sh | tail -n 1) || {
        echo "setup-llamacpp.sh failed; build llama-bench and set LLAMA_BENCH" >&2
        exit 1
    }
    LLAMA_BENCH=$bin/llama-bench
fi
[ -x "$moerun" ] || { echo "$moerun not found: cargo build --release" >&2; exit 1; }

ours() {
    if [ "$mode" = decode ]; then
        # shellcheck disable=SC2086
        "$moerun" generate -m "$model" -p "The borrow checker" -n "$n" --temp 0 -t "$threads" --json ${MOERUN_ARGS:-} \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tok_s"])'
    else
        # shellcheck disable=SC2086
        "$moerun" generate -m "$model" --prompt-tokens "$n" -n 1 --temp 0 -t "$threads" --json ${MOERUN_ARGS:-} \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["prefill_tok_s"])'
    fi
}

theirs() {
    local p=0 g=$n
    [ "$mode" = prefill ] && { p=$n; g=0; }
    "$LLAMA_BENCH" -m "$model" -t "$threads" -p "$p" -n "$g" -r 1 -o json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}

echo "$(basename "$model"), $mode $n tokens, $threads threads, $pairs pairs"
results=()
for i in $(seq 1 "$pairs"); do
    if [ $((i % 2)) -eq 1 ]; then
        a=$(ours); b=$(theirs)
    else
        b=$(theirs); a=$(ours)
    fi
    printf 'pair %d: moerun %.1f tok/s, llama.cpp %.1f tok/s\n' "$i" "$a" "$b"
    results+=("$a,$b")
done
python3 - "${results[@]}" <<'EOF'
import statistics as st, sys
pairs = [tuple(map(float, a.split(","))) for a in sys.argv[1:]]
ours, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
ratios = [a / b for a, b in pairs]
med = st.median(ours)
print(f"moerun    median {med:.1f} tok/s [{min(ours):.1f}–{max(ours):.1f}], spread ±{50 * (max(ours) - min(ours)) / med:.0f}%")
print(f"llama.cpp median {st.median(theirs):.1f} tok/s [{min(theirs):.1f}–{max(theirs):.1f}]")
print(f"paired ratio moerun/llama.cpp: median {st.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]")
EOF
