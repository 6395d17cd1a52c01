"""Bounded load test of `nanomoe serve` on loopback: C concurrent clients each stream one
completion of N tokens (temperature 0, --ignore-eos equivalent: min tokens by max_tokens and
a model that rarely emits eos) for C in 1, 4, 16, 64. Prints aggregate tokens/s, time to
first token and inter-token latency (p50 / p99), errors, and the issue's two targets.

usage: python bench/serve_load.py MODEL [--tokens 128] [--clients 1,4,16,64] [--max-batch 16] [--json]
                                 [--client events|threads] [--llama-server PATH] [--sampling JSON] [--rounds N] [--engine]
MODEL: a model directory or a .gguf file. With --llama-server (llama.cpp's binary) and a .gguf
MODEL, the same load runs against llama-server too (--max-batch slots, continuous batching,
ignore_eos), one server after the other.
(bench/bench.py --only serve runs it on the nano-MoE and GPT-2 124M-shaped models.)"""
import argparse
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = os.environ.get("NANOMOE_BIN", str(ROOT / "target" / "release" / "nanomoe"))


def pct(v, q):
    v = sorted(v)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


class Stream:
    """One client's streaming request on a non-blocking socket: HTTP/1.1, chunked body, SSE events."""

    def __init__(self, host, port, body):
        self.sock = socket.create_connection((host, port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = json.dumps(body).encode()
        self.request = (b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), port, len(data))) + data
        self.raw = b""        # bytes received and not yet decoded
        self.body = b""       # decoded body not yet split into events
        self.chunked = None   # None until the header block is in, then whether the body is chunked
        self.stamps, self.tokens, self.error, self.done = [], 0, None, False

    def feed(self, data, now):
        """Takes bytes the socket returned at `now`; every token event in them is stamped `now`."""
        self.raw += data
        if self.chunked is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.raw = self.raw[:end].decode("latin-1"), self.raw[end + 4:]
            status = head.split("\r\n")[0].split(" ")
            self.chunked = "transfer-encoding: chunked" in head.lower()
            if len(status) < 2 or status[1] != "200":
                self.error, self.done = "HTTP %s" % (status[1] if len(status) > 1 else "?"), True
                return
        if self.chunked:
            while True:
                eol = self.raw.find(b"\r\n")
                if eol < 0:
                    break
                size = int(self.raw[:eol].split(b";")[0], 16)
                if len(self.raw) < eol + 2 + size + 2:
                    break
                self.body += self.raw[eol + 2:eol + 2 + size]
                self.raw = self.raw[eol + 2 + size + 2:]
                if size == 0:
                    self.done = True
                    break
        else:
            self.body, self.raw = self.body + self.raw, b""
        while not self.error:
            end = self.body.find(b"\n\n")
            if end < 0:
                break
            event, self.body = self.body[:end], self.body[end + 2:]
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    self.done = True
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    self.error, self.done = ev["error"]["message"], True
                elif ev["choices"] and ev["choices"][0].get("finish_reason") is None:
                    self.stamps.append(now)
                    self.tokens += 1


def run_clients(host, port, bodies):
    """Streams every body at once from one thread: a selector wakes on whichever socket has
    bytes and stamps each token event with the time its bytes arrived. (The earlier
    generator ran one http.client thread per client, 64 threads at 64 clients, stamping
    after the GIL let a thread run; alternated with this one on the same servers it gave
    the same throughput and p99 within the run-to-run spread, so either measures the
    server, but this one's stamps do not depend on Python's thread switching.)"""
    sel = selectors.DefaultSelector()
    out, streams = [], []
    t0 = time.perf_counter()
    for body in bodies:
        try:
            st = Stream(host, port, body)
            st.start = time.perf_counter()
            st.sock.sendall(st.request)
            st.sock.setblocking(False)
            sel.register(st.sock, selectors.EVENT_READ, st)
            streams.append(st)
        except OSError as e:
            out.append({"error": repr(e)})
    deadline = t0 + 600
    while sel.get_map():
        if time.perf_counter() > deadline:
            for key in list(sel.get_map().values()):
                key.data.error = "no answer within 600 s"
                sel.unregister(key.fileobj)
            break
        for key, _ in sel.select(timeout=1.0):
            st, now = key.data, time.perf_counter()
            try:
                data = st.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError as e:
                st.error, data = repr(e), b""
            if data:
                try:
                    st.feed(data, now)
                except (ValueError, KeyError, IndexError) as e:
                    st.error, st.done = "unreadable stream: %r" % e, True
            if not data or st.done:
                if not data and not st.done and not st.error:
                    st.error = "connection closed before [DONE]"
                sel.unregister(st.sock)
                st.sock.close()
    for st in streams:
        out.append({"error": st.error} if st.error else {"start": st.start, "stamps": st.stamps, "tokens": st.tokens})
    return out


def one_client_thread(host, port, body, out):
    """The old load generator's client (one thread each, http.client): kept to measure what
    it added (--client threads)."""
    t0 = time.perf_counter()
    stamps = []
    try:
        c = http.client.HTTPConnection(host, port, timeout=600)
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            out.append({"error": "HTTP %d" % r.status})
            return
        n = 0
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                out.append({"error": ev["error"]["message"]})
                return
            if ev["choices"] and ev["choices"][0].get("finish_reason") is None:
                stamps.append(time.perf_counter())
                n += 1
        c.close()
        out.append({"start": t0, "stamps": stamps, "tokens": n})
    except Exception as e:  # noqa: BLE001 - every failure counts as an error of the run
        out.append({"error": repr(e)})


def load(host, port, clients, tokens, extra=None, client="events"):
    bodies = [{"prompt": "Client %d says: once upon a time" % i, "max_tokens": tokens, "temperature": 0, "stream": True, **(extra or {})}
              for i in range(clients)]
    t0 = time.perf_counter()
    if client == "threads":
        out = []
        threads = [threading.Thread(target=one_client_thread, args=(host, port, b, out)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        out = run_clients(host, port, bodies)
    wall = time.perf_counter() - t0
    ok = [o for o in out if "error" not in o]
    ttft = [o["stamps"][0] - o["start"] for o in ok if o["stamps"]]
    itl = [b - a for o in ok for a, b in zip(o["stamps"], o["stamps"][1:])]
    toks = sum(o["tokens"] for o in ok)
    return {"clients": clients, "wall_s": wall, "tokens": toks, "tokens_per_s": toks / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99),
            "errors": len(out) - len(ok), "error_examples": [o["error"] for o in out if "error" in o][:3]}


def in_rounds(run, clients, rounds):
    """Runs the loads `rounds` times over, the client counts in turn within each round (1, 4,
    16, 64, 1, 4, ...), so that a slow spell of a shared host falls on neighbouring loads
    rather than on one client count. Returns one row per client count: each statistic the
    median of its rounds, with the rounds' rows under "rounds"."""
    per = [[run(c) for c in clients] for _ in range(max(1, rounds))]
    rows = []
    for i, c in enumerate(clients):
        rs = [r[i] for r in per]
        row = {k: (median([r[k] for r in rs]) if isinstance(rs[0][k], float) else rs[0][k]) for k in rs[0]}
        row["errors"] = sum(r["errors"] for r in rs)
        row["error_examples"] = [e for r in rs for e in r["error_examples"]][:3]
        row["rounds"] = rs
        rows.append(row)
    return rows


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def run_model(model, tokens, clients, max_batch, threads, client="events", extra=None, rounds=1):
    p = subprocess.Popen([BIN, "--threads", str(threads), "serve", model, "--port", "0", "--max-batch", str(max_batch),
                          "--max-queue", "256"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    addr = line.split("http://")[1].split("/")[0]
    host, port = addr.split(":")
    try:
        load(host, int(port), 1, 8, extra, client=client)  # warm-up
        return in_rounds(lambda c: load(host, int(port), c, tokens, extra, client=client), clients, rounds)
    finally:
        p.terminate()
        p.wait(timeout=120)


def run_llama_server(binary, model, tokens, clients, max_batch, threads, client="events", sampling=None, rounds=1):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = subprocess.Popen([binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                          "-np", str(max_batch), "-c", str(max_batch * 256), "--no-warmup"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or p.poll() is not None:
                raise SystemExit("llama-server did not start")
            time.sleep(0.2)
        extra = {"ignore_eos": True, **(sampling or {})}
        load("127.0.0.1", port, 1, 8, extra, client)  # warm-up
        return in_rounds(lambda c: load("127.0.0.1", port, c, tokens, extra, client), clients, rounds)
    finally:
        p.terminate()
        p.wait(timeout=120)


def engine_rows(model, tokens, threads, batches=(1, 16), rounds=1):
    """The decoding steps of 1 and 16 clients without the HTTP side and the clients: `nanomoe
    bench decode --packed` (serve's engine in process: one KV cache per sequence, packed
    passes, greedy picks, one-token prompts) for each batch in turn, `rounds` times over, one
    run of `tokens` steps each. Returns one row per batch: the step p50 / p99 in ms (medians of
    the rounds) with the rounds' rows under "rounds"."""
    per = []
    for _ in range(max(1, rounds)):
        row = []
        for b in batches:
            p = subprocess.run([BIN, "--threads", str(threads), "bench", "decode", model, "--packed", "--batch", str(b),
                                "--new-tokens", str(tokens), "--repeats", "1"], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit("bench decode failed: %s" % p.stderr[-2000:])
            steps = json.loads(p.stdout.strip().splitlines()[-1])["step_ms"]
            row.append({"batch": b, "p50_ms": steps["p50"], "p99_ms": steps["p99"]})
        per.append(row)
    return [{"batch": b, "p50_ms": median([r[i]["p50_ms"] for r in per]), "p99_ms": median([r[i]["p99_ms"] for r in per]),
             "rounds": [r[i] for r in per]} for i, b in enumerate(batches)]


def engine_report(label, rows):
    """Prints the engine rows and the serve p99 target computed on them: each round's 16-row
    step p99 over the same round's 1-row step median."""
    print("\n%s: the engine alone (bench decode --packed, no HTTP), medians of %d rounds" % (label, len(rows[0]["rounds"])))
    print("| sequences | step p50 ms | step p99 ms |")
    print("|---|---|---|")
    for r in rows:
        print("| %d | %.2f | %.2f |" % (r["batch"], r["p50_ms"], r["p99_ms"]))
    one = next((r for r in rows if r["batch"] == 1), None)
    many = next((r for r in rows if r["batch"] == 16), None)
    if one and many:
        v = [m["p99_ms"] / o["p50_ms"] for o, m in zip(one["rounds"], many["rounds"])]
        w = [m["p50_ms"] / o["p50_ms"] for o, m in zip(one["rounds"], many["rounds"])]
        print("16-row step p99 = %.2fx (rounds %s) the 1-row step median; 16-row median = %.2fx (rounds %s)" % (
            median(v), ", ".join("%.2f" % x for x in v), median(w), ", ".join("%.2f" % x for x in w)))


def targets(rows):
    """The issue's two targets, each round's loads against the same round's single client:
    [(16 clients' tokens/s over one client's, 16 clients' p99 inter-token latency over one
    client's median)] per round; None without 1 and 16 clients."""
    base = rows[0]
    r16 = next((r for r in rows if r["clients"] == 16), None)
    if not r16 or base["clients"] != 1:
        return None
    return [(b["tokens_per_s"] and s["tokens_per_s"] / b["tokens_per_s"], s["itl_p99"] / b["itl_p50"])
            for b, s in zip(base.get("rounds", [base]), r16.get("rounds", [r16]))]


def report(label, rows):
    n = len(rows[0].get("rounds", [0]))
    print("\n%s%s" % (label, ", medians of %d rounds" % n if n > 1 else ""))
    print("| clients | tokens/s (aggregate) | x one client | TTFT p50 / p99 ms | inter-token p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        print("| %d | %.1f | %.2fx | %.0f / %.0f | %.1f / %.1f | %d |" % (
            r["clients"], r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"], 1e3 * r["ttft_p50"], 1e3 * r["ttft_p99"],
            1e3 * r["itl_p50"], 1e3 * r["itl_p99"], r["errors"]))
    t = targets(rows)
    if t:
        spread = lambda v: "%.2fx" % median(v) + (" (rounds %s)" % ", ".join("%.2f" % x for x in v) if len(v) > 1 else "")
        print("targets: 16 clients %s one client's tokens/s (target >= 4x); p99 inter-token at 16 = %s the single-client median (target <= 3x)" % (
            spread([x[0] for x in t]), spread([x[1] for x in t])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", choices=["events", "threads"], default="events",
                    help="events: all clients on one thread, stamped as bytes arrive (default); threads: one http.client thread each (the old generator)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: run the same load against it (GGUF MODEL)")
    ap.add_argument("--rounds", type=int, default=1, help="run the client counts this many times in turn; each statistic is the median of the rounds")
    ap.add_argument("--engine", action="store_true", help="also time the same steps without the HTTP side (bench decode --packed, 1 and 16 sequences)")
    ap.add_argument("--sampling", help='request fields replacing greedy decoding, as JSON, e.g. \'{"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 1}\'')
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    extra = json.loads(a.sampling) if a.sampling else None
    rows = run_model(a.model, a.tokens, clients, a.max_batch, a.threads, a.client, extra, a.rounds)
    theirs = None
    if a.llama_server and a.model.endswith(".gguf"):
        theirs = run_llama_server(a.llama_server, a.model, a.tokens, clients, a.max_batch, a.threads, a.client, extra, a.rounds)
    engine = engine_rows(a.model, a.tokens, a.threads, rounds=a.rounds) if a.engine else None
    if a.json:
        print(json.dumps({"nanomoe": rows, "llama_server": theirs, "engine": engine}))
        return
    report("nanomoe serve %s, %d tokens per client, --max-batch %d, %d threads" % (a.model, a.tokens, a.max_batch, a.threads), rows)
    if theirs:
        report("llama-server %s, %d tokens per client, -np %d, %d threads" % (a.model, a.tokens, a.max_batch, a.threads), theirs)
        for o, t in zip(rows, theirs):
            print("%d clients: nanomoe / llama-server aggregate tokens/s %.2fx" % (o["clients"], o["tokens_per_s"] / t["tokens_per_s"]))
    if engine:
        engine_report("nanomoe %s" % a.model, engine)


if __name__ == "__main__":
    sys.exit(main())
