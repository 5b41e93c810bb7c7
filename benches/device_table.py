#!/usr/bin/env python3
"""The table of benches/device-check.sh: every bench run of a folder side by side, each decode
figure against its physical bound, and the fidelity checks' verdicts. Standard library only.

    python3 benches/device_table.py OUT_DIR

Bounds (the H200 machine's, measured there: ../shared/fixtures/README.md):
- all resident on the GPU: HBM at 4.3 TB/s over the weight bytes one token reads (dense weights
  plus its experts), so tok/s <= 4.3e12 / active_bytes_per_token;
- experts copied on use: PCIe at 55 GB/s over the bytes actually copied per decoded token, so
  tok/s <= 55e9 / bytes_copied_per_token (compute and HBM time come on top).
"""
import glob
import json
import os
import sys

HBM = 4.3e12
PCIE = 55e9


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(out):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
        r = load(path)
        if not r or not r.get("moerun"):
            continue
        name = os.path.basename(path)[len("bench-"):-len(".json")]
        model, _, mode = name.partition("-")
        dec = r["moerun"]["decode_tok_s"]["median"]
        pf = r["moerun"]["prefill_tok_s"]["median"]
        g = r.get("gpu_decode") or {}
        copied = g.get("bytes_copied_per_token") or 0.0
        active = r["moe"]["active_bytes_per_token"]
        if r["device"] == "cpu" or mode.startswith("cpu-moe") or mode.startswith("n-cpu-moe"):
            bound, what = None, "-"
        elif copied > 0:
            bound, what = PCIE / copied, "PCIe"
        else:
            bound, what = HBM / active, "HBM"
        # The fraction of the bound is taken on the decode-alone run the copies were counted on.
        alone = g.get("decode_tok_s") or dec
        rows.append((model, mode, r["device"], pf, dec, g, copied, bound, what, alone))
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    print("| model | mode | device | prefill tok/s | decode tok/s | GPU hit rate | MiB copied / token | ahead of need (used) | direct copies | launches / token | bound tok/s | decode alone / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, mode, dev, pf, dec, g, copied, bound, what, alone in rows:
        launches = g.get("launches_per_token")
        launch_s = "-" if launches is None else f"{launches:.0f}"
        ahead = g.get("prefetch_copies_per_token")
        ahead_s = "-" if not ahead else f"{ahead:.1f} ({pct(g.get('prefetch_used'))})"
        bound_s = "-" if bound is None else f"{bound:.1f} ({what})"
        frac = "-" if bound is None else f"{alone / bound:.2f}"
        print(f"| {m} | {mode} | {dev} | {pf:.1f} | {dec:.1f} | {pct(g.get('hit_rate'))} | {copied / 1048576:.2f} | "
              f"{ahead_s} | {pct(g.get('direct_copies'))} | {launch_s} | {bound_s} | {frac} |")
    # Fidelity: the bundled model's greedy answer under every memory setting.
    gens = {os.path.basename(p)[4:-5]: load(p) for p in glob.glob(os.path.join(out, "gen-*.json"))}
    cpu, cuda = gens.get("cpu"), gens.get("cuda")
    print()
    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))

    def tokens(a, b):
        d = first_diff(a["ids"], b["ids"])
        return "identical" if d is None else f"differ from step {d}"

    if cpu and cuda:
        # rustdoc-moe amplifies rounding (the plain backend's exact sums move its logits by up to
        # 0.2, src/oracle.rs): at a near-tie the GPU's f32 attention accumulators may pick the
        # other token than llama.cpp's f16 ones. The oracle step holds the GPU to llama.cpp's own
        # greedy continuations.
        print(f"greedy tokens, cuda vs cpu: {tokens(cuda, cpu)}")
        for name, g in sorted(gens.items()):
            if name in ("cpu", "cuda") or not g:
                continue
            same_logits = g["top_logits"] == cuda["top_logits"]
            print(f"  {name}: tokens vs cuda {tokens(g, cuda)}, vs cpu {tokens(g, cpu)}; logits vs all-resident cuda "
                  f"{'bit for bit' if same_logits else 'differ'}")
    for name in ("selftest", "oracle"):
        try:
            with open(os.path.join(out, f"{name}.txt")) as f:
                last = [l for l in f.read().splitlines() if l.strip()][-1:]
        except OSError:
            last = ["(not run)"]
        print(f"{name}: {last[0] if last else '(empty)'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "devcheck/out")
