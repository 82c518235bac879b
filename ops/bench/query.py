"""Query latency over the HTTP API: p50/p95/p99 for cache misses (distinct
questions) and cache hits (a repeated question), with N concurrent clients.

    python3 ops/bench/query.py URL TOKEN [--n 300] [--clients 1] [--only hit|miss]

Standard library only. Run it against a daemon whose index holds the corpus
to measure (ops/bench/query.sh builds a 10k-chunk one).
"""
import json
import statistics
import sys
import threading
import time
import urllib.request

TOPICS = ["meeting room", "parental leave", "travel budget", "expense receipt", "on-call rotation",
          "build cache", "office hours", "salary review", "incident channel", "team booking"]


def ask(url, token, question):
    req = urllib.request.Request(url + "/v1/query", data=json.dumps({"question": question, "top_k": 5}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.load(r)
    return time.perf_counter() - t, body


def run(url, token, questions, clients):
    lat, cached, depths, server = [], 0, [], []
    lock = threading.Lock()
    it = iter(questions)

    def worker():
        nonlocal cached
        while True:
            with lock:
                q = next(it, None)
            if q is None:
                return
            dt, body = ask(url, token, q)
            with lock:
                lat.append(dt * 1000)
                cached += body["cached"]
                server.append(body["timings_ms"]["total"])
                if not body["cached"] and "rerank_depth" in body["timings_ms"]:
                    depths.append(body["timings_ms"]["rerank_depth"])

    ts = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))]
    out = {"n": len(lat), "cached": cached, "p50_ms": round(pct(50), 2), "p95_ms": round(pct(95), 2),
           "p99_ms": round(pct(99), 2), "mean_ms": round(statistics.mean(lat), 2), "qps": round(len(lat) / wall, 1)}
    server.sort()
    # The server's own timings_ms.total: the query path without HTTP.
    out["server_p95_ms"] = round(server[min(len(server) - 1, int(0.95 * len(server)))], 2)
    if depths:
        depths.sort()
        # How many candidates the reranker scored (timings_ms.rerank_depth).
        out["rerank_depth"] = {"min": depths[0], "p50": depths[len(depths) // 2], "max": depths[-1],
                               "mean": round(statistics.mean(depths), 1)}
    return out


def main():
    url, token = sys.argv[1], sys.argv[2]
    n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 300
    clients = int(sys.argv[sys.argv.index("--clients") + 1]) if "--clients" in sys.argv else 1
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    # Distinct per run too: a second run must not hit the first run's entries.
    misses = [f"who handles the {TOPICS[i % len(TOPICS)]} for request {i + 100_000 * clients}?" for i in range(n)]
    ask(url, token, "warm up")
    if only != "hit":
        print(json.dumps({"case": f"miss/{clients}c", **run(url, token, misses, clients)}))
    if only != "miss":
        ask(url, token, "which team booked the meeting room?")
        time.sleep(0.5)  # the store is asynchronous
        hits = ["which team booked the meeting room?"] * n
        print(json.dumps({"case": f"hit/{clients}c", **run(url, token, hits, clients)}))


if __name__ == "__main__":
    main()
