#!/usr/bin/env python3
"""Broker RSS per retained item (issue 10 target: <= 1.5x compact JSON + 64 B).

usage: benches/state_memory.py TIDINGS_BINARY ITEMS on|off
Starts `tidings serve` (history and idempotency off, so only the state grows), posts creates of
~204 B items 2,000 per request, and prints RSS before/after per item as JSON."""
import json, subprocess, sys, time, urllib.request, re, os
binary = sys.argv[1]; n = int(sys.argv[2]); state = sys.argv[3] == "on"
args = [binary, "serve", "--listen", "127.0.0.1:0", "--history-bytes", "0", "--history-size", "0", "--idempotency-window", "0", "--state-max-items", "2000000", "--state-max-bytes", "4000000000"]
if state: args += ["--state", "orders"]
p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
line = p.stdout.readline()
addr = re.search(r"http://([0-9.:]+)", line).group(1)
def rss():
    with open(f"/proc/{p.pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS"): return int(l.split()[1]) * 1024
def post(body):
    req = urllib.request.Request(f"http://{addr}/v1/publish", data=body, headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()
pad = "x" * 120
json_bytes = 0
# warm up allocator paths
post(json.dumps({"collection": "orders", "event": "create", "data": [{"id": -1, "tenant": 0, "status": "open", "pad": pad}]}).encode())
time.sleep(0.5)
base = rss()
t0 = time.time()
batch = 2000
for start in range(0, n, batch):
    items = [{"id": i, "tenant": i % 100, "status": "open", "total": i * 3 % 1000, "note": f"order {i}", "pad": pad} for i in range(start, min(n, start + batch))]
    json_bytes += sum(len(json.dumps(it, separators=(",", ":"))) for it in items)
    post(json.dumps({"collection": "orders", "event": "create", "data": items}, separators=(",", ":")).encode())
elapsed = time.time() - t0
time.sleep(1)
after = rss()
m = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
sb = re.search(r'^tidings_state_bytes\{collection="orders"\} (\S+)', m, re.M)
si = re.search(r'^tidings_state_items\{collection="orders"\} (\S+)', m, re.M)
print(json.dumps({"state": state, "items": n, "avg_json": json_bytes / n, "rss_base": base, "rss_after": after,
  "rss_per_item": (after - base) / n, "target_per_item": 1.5 * json_bytes / n + 64,
  "state_bytes_metric": sb and float(sb.group(1)), "state_items": si and float(si.group(1)), "publish_seconds": round(elapsed, 1)}))
p.terminate(); p.wait()
