#!/usr/bin/env python3
"""Reconcile time and peak memory (issue 10 target: 100,000 items with 1% changed in <= 1 s,
with bounded memory).

usage: benches/reconcile.py TIDINGS_BINARY [ITEMS] [CHANGED_PERCENT] [post|put]
Starts `tidings serve --state orders` (history and idempotency off, so only the state grows),
seeds ITEMS (default 100,000) items of ~200 B (`post`, the default: creates through
`POST /v1/publish`, 2,000 per request, so the peak before the heal is the state's own; `put`: one
reconcile, whose batch of 100,000 creates sets the peak), then reconciles the same set
with CHANGED_PERCENT (default 1) of the items changed, as NDJSON, streamed from a generator in
64 KiB chunks. Prints one JSON line: the time of each reconcile as the client sees it (request
sent to answer read), its answer's counts, and the broker's RSS and peak RSS (VmHWM) before
and after each step. A peak that grows far less than the body's size shows the body is not
buffered."""
import http.client, json, re, subprocess, sys, time, urllib.request

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
percent = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
seed_by = sys.argv[4] if len(sys.argv) > 4 else "post"
args = [binary, "serve", "--listen", "127.0.0.1:0", "--state", "orders",
        "--history-bytes", "0", "--history-size", "0", "--idempotency-window", "0",
        "--state-max-items", "2000000", "--state-max-bytes", "4000000000"]
p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = re.search(r"http://([0-9.:]+)", p.stdout.readline()).group(1)
host, port = addr.rsplit(":", 1)


def status():
    out = {}
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


pad = "x" * 120


def item(i, version):
    return {"id": i, "tenant": i % 100, "status": "open", "total": i * 3 % 1000,
            "note": f"order {i} v{version}", "pad": pad}


def body(changed_every):
    """The NDJSON body, one chunk of ~64 KiB at a time (never whole in memory)."""
    chunk = []
    size = 0
    for i in range(n):
        version = 1 if changed_every and i % changed_every == 0 else 0
        line = json.dumps(item(i, version), separators=(",", ":")) + "\n"
        chunk.append(line)
        size += len(line)
        if size >= 65536:
            yield "".join(chunk).encode()
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk).encode()


def broker_seconds():
    """`tidings_reconcile_duration_seconds_sum`: the broker's own time over all reconciles."""
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    m = re.search(r"^tidings_reconcile_duration_seconds_sum (\S+)", text, re.M)
    return float(m.group(1)) if m else 0.0


def reconcile(changed_every):
    # Built before the clock starts (in the client's memory, not the broker's): the time is
    # the broker's and the socket's, not Python's JSON encoder's.
    chunks = list(body(changed_every))
    sent = sum(len(c) for c in chunks)
    before = broker_seconds()
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    t0 = time.perf_counter()
    conn.request("PUT", "/v1/collections/orders/items", body=iter(chunks),
                 headers={"content-type": "application/x-ndjson", "transfer-encoding": "chunked"},
                 encode_chunked=True)
    answer = json.loads(conn.getresponse().read())
    elapsed = time.perf_counter() - t0
    conn.close()
    counts = {k: answer.get(k) for k in ("created", "updated", "deleted", "unchanged")}
    return {"seconds": round(elapsed, 3), "broker_seconds": round(broker_seconds() - before, 3),
            "body_bytes": sent, "events": len(answer.get("events", [])),
            **counts}


def post_seed():
    t0 = time.perf_counter()
    for start in range(0, n, 2000):
        items = [item(i, 0) for i in range(start, min(n, start + 2000))]
        data = json.dumps({"collection": "orders", "event": "create", "data": items},
                          separators=(",", ":")).encode()
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/publish", body=data, headers={"content-type": "application/json"})
        conn.getresponse().read()
        conn.close()
    return {"seconds": round(time.perf_counter() - t0, 3), "by": "POST /v1/publish"}


time.sleep(0.3)
start = status()
seed = reconcile(0) if seed_by == "put" else post_seed()
time.sleep(0.5)
seeded = status()
changed_every = max(1, round(100 / percent)) if percent > 0 else 0
heal = reconcile(changed_every)
time.sleep(0.5)
healed = status()
again = reconcile(changed_every)
print(json.dumps({"items": n, "changed_percent": percent,
                  "seed": seed, "heal": heal, "unchanged_again": again,
                  "rss": {"start": start["VmRSS"], "seeded": seeded["VmRSS"], "healed": healed["VmRSS"]},
                  "peak": {"start": start["VmHWM"], "seeded": seeded["VmHWM"], "healed": healed["VmHWM"]},
                  "peak_growth_during_heal": healed["VmHWM"] - seeded["VmHWM"]}))
p.terminate()
p.wait()
