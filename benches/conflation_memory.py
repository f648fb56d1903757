#!/usr/bin/env python3
"""Broker memory of conflated subscriptions (issue 16: bounded by keys, not by events).

usage: benches/conflation_memory.py TIDINGS_BINARY KEYS SUBSCRIBERS [POLICY]

Starts `tidings serve --state prices --slow-consumer-policy POLICY` (default conflate), seeds
KEYS items of ~200 B, opens SUBSCRIBERS WebSocket subscribers that read their `init` and then
stop reading (4 KiB receive buffers), and publishes rounds of updates (10 per key per round,
500 events per request) while they stall. After each round it prints the broker's VmRSS
growth since the subscribers stalled, per subscriber and per (subscriber, key), and
`tidings_conflated_total`: with conflation the growth stops once every key pends, whatever
the number of events; with `close` the stalled subscribers' outboxes overflow and are dropped
(`tidings_outbox_dropped_total`; each connection is closed with 4008 once its stuck write ends,
here after the hour-long write timeout)."""
import base64, json, os, re, socket, struct, subprocess, sys, time, urllib.request

binary = sys.argv[1]
keys = int(sys.argv[2])
subscribers = int(sys.argv[3])
policy = sys.argv[4] if len(sys.argv) > 4 else "conflate"
args = [binary, "serve", "--listen", "127.0.0.1:0", "--state", "prices",
        "--slow-consumer-policy", policy, "--conflation-max-keys", str(max(keys * 2, 10000)),
        # The stalled readers block their sessions' writes for the whole run: a write
        # timeout would close them (conflation spares the outbox, not a write that hangs).
        "--write-timeout", "3600", "--heartbeat-period", "0",
        "--history-size", "0", "--history-bytes", "0", "--idempotency-window", "0",
        "--max-connections", str(subscribers + 100)]
p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = re.search(r"http://([0-9.:]+)", p.stdout.readline()).group(1)
host, port = addr.rsplit(":", 1)


def rss():
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024


def post(events):
    body = json.dumps(events, separators=(",", ":")).encode()
    req = urllib.request.Request(f"http://{addr}/v1/publish", data=body,
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()


def metric(name):
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return buf


def read_frame(s):
    b0, b1 = read_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", read_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read_exact(s, 8))[0]
    return b0 & 0x0F, read_exact(s, n)


def send_text(s, text):
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126
                            else bytes([0x80 | 126]) + struct.pack(">H", len(data)))
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def stalled_subscriber():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /websocket HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    send_text(s, json.dumps({"type": "subscribe", "collection": "prices", "uid": "p",
                             "query": {"limit": -1}, "checkpoints": True}))
    _, init = read_frame(s)
    assert json.loads(init)["event"] == "init", init[:200]
    return s


pad = "x" * 150
seed = [{"collection": "prices", "event": "create",
         "data": [{"id": k, "price": 0, "pad": pad} for k in range(start, min(keys, start + 1000))]}
        for start in range(0, keys, 1000)]
for event in seed:
    post([event])
socks = [stalled_subscriber() for _ in range(subscribers)]
time.sleep(1)
base = rss()
seq = 0
for rnd in range(1, 5):
    t0 = time.time()
    events = []
    for _ in range(10):
        for k in range(keys):
            seq += 1
            events.append({"collection": "prices", "event": "update",
                           "data": {"id": k, "price": seq, "pad": pad}})
            if len(events) == 500:
                post(events)
                events = []
    if events:
        post(events)
    time.sleep(1)
    grown = rss() - base
    print(json.dumps({"policy": policy, "keys": keys, "subscribers": subscribers, "round": rnd,
                      "updates": seq, "rss_growth": grown,
                      "per_subscriber": round(grown / subscribers),
                      "per_subscriber_key": round(grown / subscribers / keys, 1),
                      "conflated_total": metric("tidings_conflated_total"),
                      "resets": metric("tidings_conflation_resets_total"),
                      "outbox_dropped": metric("tidings_outbox_dropped_total"),
                      "publish_seconds": round(time.time() - t0, 1)}), flush=True)
for s in socks:
    s.close()
p.terminate()
p.wait()
