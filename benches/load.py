#!/usr/bin/env python3
"""`moerun serve` under load and abuse (issue 13, item 3), loopback only, bounded, stops by itself.

Starts the server (`--port 0`, an API key), takes a greedy answer on the fresh server, then sends
REQUESTS requests from CLIENTS concurrent clients, mixing normal and streaming requests, streams
cancelled mid-way, oversize bodies, bad JSON, wrong keys, bad parameter types and `max_tokens`
beyond the context. Checks that every request gets an answer (200; 503 with Retry-After when the
queue is full; 4xx with an OpenAI-style error body), that the same greedy request after the storm
gives the same answer as on the fresh server (no leaked engine state), and that SIGTERM stops the
server cleanly; reports status counts, p50/p99 latency, time to first token and the server's RSS
over the run. Standard library only.

    python3 benches/load.py [--clients 64] [--requests 1000] [--queue 64] [--bin target/release/moerun] [MODEL]

Exit status 1 if any check fails. Results also go to bench-results/load-<time>.json.
"""

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

KEY = "load-test-key"


def start_server(binary, model, extra):
    cmd = [binary, "serve", "--port", "0", "--api-key", KEY] + (["-m", model] if model else []) + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"load: the server did not start: {line!r}")
    hostport = line.split("http://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return proc, host, int(port)


def request(host, port, path, body, key=KEY, stream=False, cancel_after_first=False, raw=None):
    """One request; returns (status, latency_s, ttft_s, body_text, headers)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers=headers)
    resp = conn.getresponse()
    ttft = None
    text = b""
    if stream and resp.status == 200:
        while True:
            chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1024)
            if not chunk:
                break
            if ttft is None and b"data:" in chunk:
                ttft = time.monotonic() - t0
            text += chunk
            if cancel_after_first:
                break
    else:
        text = resp.read()
    status, hdrs = resp.status, dict(resp.getheaders())
    conn.close()
    return status, time.monotonic() - t0, ttft, text.decode("utf-8", "replace"), hdrs


def spec(i):
    """The i-th request of the storm: (kind, path, kwargs)."""
    msgs = [{"role": "user", "content": f"Question {i}: what is a trait?"}]
    k = i % 20
    if k < 7:
        return "normal", "/v1/chat/completions", dict(body={"messages": msgs, "max_tokens": 8, "temperature": 0})
    if k < 9:
        return "completion", "/v1/completions", dict(body={"prompt": f"Iterator {i}", "max_tokens": 8})
    if k < 12:
        return "stream", "/v1/chat/completions", dict(
            body={"messages": msgs, "max_tokens": 12, "stream": True}, stream=True)
    if k < 14:
        return "cancelled", "/v1/completions", dict(
            body={"prompt": "The borrow checker", "max_tokens": 64, "stream": True, "ignore_eos": True},
            stream=True, cancel_after_first=True)
    if k == 14:
        return "oversize", "/v1/chat/completions", dict(body=None, raw=b'{"messages": "' + b"x" * (2 << 20) + b'"}')
    if k == 15:
        return "bad_json", "/v1/chat/completions", dict(body=None, raw=b'{"messages": [ {"role": "user",')
    if k == 16:
        return "wrong_key", "/v1/chat/completions", dict(body={"messages": msgs}, key="not-the-key")
    if k == 17:
        return "bad_types", "/v1/chat/completions", dict(body={"messages": msgs, "max_tokens": "eight"})
    if k == 18:
        return "unknown_route", "/v1/nothing", dict(body={"messages": msgs})
    return "over_context", "/v1/completions", dict(body={"prompt": "Ownership", "max_tokens": 1_000_000})


EXPECTED = {
    "normal": {200, 503},
    "completion": {200, 503},
    "stream": {200, 503},
    "cancelled": {200, 503},
    "oversize": {413},
    "bad_json": {400},
    "wrong_key": {401},
    "bad_types": {400},
    "unknown_route": {404},
    "over_context": {200, 503},
}


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--bin", default="target/release/moerun")
    ap.add_argument("--queue", type=int, default=64, help="the server's queue (fewer than --clients: some 503s)")
    ap.add_argument("--json", default=None, help="where to write the results (default bench-results/load-<time>.json)")
    a = ap.parse_args()

    proc, host, port = start_server(a.bin, a.model, ["-t", "2", "--queue", str(a.queue)])
    failures = []
    try:
        probe = {"prompt": "Ownership is", "max_tokens": 16, "temperature": 0}
        st, _, _, fresh, _ = request(host, port, "/v1/completions", probe)
        if st != 200:
            failures.append(f"the probe on a fresh server answered {st}")
        fresh_text = json.loads(fresh)["choices"][0]["text"] if st == 200 else None

        rss = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                r = rss_kib(proc.pid)
                if r:
                    rss.append(r)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results = []
        t0 = time.monotonic()

        def one(i):
            kind, path, kw = spec(i)
            try:
                st, lat, ttft, body, hdrs = request(host, port, path, **kw)
                return kind, st, lat, ttft, body, hdrs, None
            except Exception as e:  # a request that got no answer at all
                return kind, None, None, None, "", {}, repr(e)

        with cf.ThreadPoolExecutor(max_workers=a.clients) as ex:
            for r in ex.map(one, range(a.requests)):
                results.append(r)
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()

        by_status, by_kind = {}, {}
        for kind, st, lat, ttft, body, hdrs, err in results:
            by_status[str(st)] = by_status.get(str(st), 0) + 1
            by_kind.setdefault(kind, {}).setdefault(str(st), 0)
            by_kind[kind][str(st)] += 1
            if err:
                failures.append(f"{kind}: no answer ({err})")
                continue
            if st not in EXPECTED[kind]:
                failures.append(f"{kind}: status {st}: {body[:200]}")
            if st == 503 and "retry-after" not in {k.lower() for k in hdrs}:
                failures.append(f"{kind}: 503 without Retry-After")
            if st is not None and st >= 400:
                try:
                    e = json.loads(body)["error"]
                    assert isinstance(e["message"], str) and "type" in e
                except Exception:
                    failures.append(f"{kind}: {st} without an OpenAI-style error body: {body[:200]}")

        st, _, _, after, _ = request(host, port, "/v1/completions", probe)
        after_text = json.loads(after)["choices"][0]["text"] if st == 200 else None
        if after_text != fresh_text:
            failures.append(f"after the storm the probe says {after_text!r}, a fresh server {fresh_text!r}")

        ok = [r for r in results if r[1] == 200]
        lat = sorted(r[2] for r in ok)
        ttfts = sorted(r[3] for r in ok if r[3] is not None)
        pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
        report = {
            "clients": a.clients,
            "requests": a.requests,
            "wall_s": wall,
            "by_status": by_status,
            "by_kind": by_kind,
            "latency_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)},
            "ttft_s": {"p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)},
            "rss_mib": {
                "start": rss[0] / 1024 if rss else None,
                "max": max(rss) / 1024 if rss else None,
                "end": rss[-1] / 1024 if rss else None,
            },
            "same_answer_after": after_text == fresh_text,
        }
    finally:
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    if code != 0:
        failures.append(f"SIGTERM: the server exited with {code}")
    report["sigterm_exit"] = code
    report["sigterm_s"] = time.monotonic() - t_term
    report["failures"] = failures

    print(f"load: {a.requests} requests from {a.clients} clients in {report['wall_s']:.1f} s")
    print("  by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["by_status"].items())))
    for kind, sts in sorted(report["by_kind"].items()):
        print(f"  {kind:<14} " + ", ".join(f"{k}: {v}" for k, v in sorted(sts.items())))
    fmt = lambda v: "n/a" if v is None else f"{1000 * v:.0f} ms"
    print(f"  latency of 200s p50 {fmt(report['latency_s']['p50'])}, p99 {fmt(report['latency_s']['p99'])}; "
          f"time to first streamed chunk p50 {fmt(report['ttft_s']['p50'])}, p99 {fmt(report['ttft_s']['p99'])}")
    r = report["rss_mib"]
    if r["start"]:
        print(f"  server RSS {r['start']:.0f} MiB at start, {r['max']:.0f} MiB max, {r['end']:.0f} MiB at the end")
    print(f"  same greedy answer after the storm: {report['same_answer_after']}; "
          f"SIGTERM: exit {report['sigterm_exit']} in {report['sigterm_s']:.1f} s")
    out = a.json or f"bench-results/load-{int(time.time())}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for f in failures[:20]:
        print("  FAIL " + f)
    print(f"load: {a.requests - len(failures)} passed, {len(failures)} failed" if failures else
          f"load: {a.requests} passed, 0 failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
