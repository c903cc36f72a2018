"""The machinery behind `python bench.py serve`: serve.py as a subprocess, streaming clients in worker processes,
latency statistics. Standard library only (no torch): the client processes start fast and stay light.

    python bench.py serve                                    # 1, 16, 64, 256 clients, all requests at once
    python bench.py serve --request-rate 20 --max-concurrency 64 --clients 256

Clients run in up to 8 worker processes (threads inside each), so parsing thousands of server-sent events a
second never competes with itself for one interpreter lock. Each request is sent at its arrival time (Poisson
arrivals at --request-rate, or all at once) while fewer than --max-concurrency are in flight. Times are
time.monotonic(), which every process on the machine shares.
"""
import dataclasses
import http.client
import json
import math
import multiprocessing
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def stream_completion(port: int, body: dict, timeout: float = 900) -> dict:
    """One streaming /v1/completions request: when it was sent, when each SSE chunk arrived (monotonic
    seconds), and the completion tokens its usage reports."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent, stamps, usage = time.monotonic(), [], None
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}", "sent": sent, "stamps": [], "tokens": 0}
        for line in resp:                        # SSE: 'data: {...}' lines, 'data: [DONE]' at the end
            data = line.strip().removeprefix(b"data:").strip()
            if not line.startswith(b"data:") or data == b"[DONE]":
                continue
            msg = json.loads(data)
            usage = msg.get("usage") or usage
            if msg.get("choices"):
                stamps.append(time.monotonic())
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}", "sent": sent, "stamps": stamps, "tokens": 0}
    finally:
        conn.close()
    # a chunk may carry several tokens, or none be sent for tokens that add no text: usage is the count
    return {"sent": sent, "stamps": stamps, "tokens": usage["completion_tokens"] if usage else 0,
            "error": None if usage else "no usage"}


def _client_worker(port: int, jobs: list[tuple], t0: float, limit: int) -> list[tuple]:
    """In a worker process: send each (index, arrival, body) at t0 + arrival, at most `limit` in flight."""
    gate, results = threading.Semaphore(limit), []

    def one(i, arrival, body):
        time.sleep(max(0.0, t0 + arrival - time.monotonic()))
        with gate:
            results.append((i, stream_completion(port, body)))
    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class ClientPool:
    """Worker processes that run the clients of one level at a time."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        self.pool.map(time.sleep, [0.1] * workers)   # every worker started (imports done) before a level is timed

    def run(self, port: int, bodies: list[dict], arrivals: list[float], concurrency: int) -> tuple[list, float]:
        """Returns (per-request results in order, the monotonic time the level started)."""
        w = min(self.workers, len(bodies))
        t0 = time.monotonic() + 0.5                  # every worker is up and waiting by then
        shares = [[(i, arrivals[i], bodies[i]) for i in range(k, len(bodies), w)] for k in range(w)]
        limits = [max(1, concurrency // w + (k < concurrency % w)) for k in range(w)]
        out = [None] * len(bodies)
        for part in self.pool.starmap(_client_worker, [(port, s, t0, lim) for s, lim in zip(shares, limits)]):
            for i, r in part:
                out[i] = r
        return out, t0

    def close(self):
        self.pool.terminate()


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times: all at 0 for rate inf, else a Poisson process (exponential gaps) of the given rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(results: list[dict], want_tokens: list[int], t0: float) -> dict:
    """Output tok/s over the level's wall time, and TTFT, time per output token and inter-token latency
    (between consecutive events of a stream) at p50/p90/p99, in ms."""
    end = max((r["stamps"][-1] for r in results if r["stamps"]), default=t0)
    wall = end - min((r["sent"] for r in results), default=t0)   # from the first request actually sent
    ttft = [r["stamps"][0] - r["sent"] for r in results if r["stamps"]]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["stamps"]]
    itl = [y - x for r in results for x, y in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    out = {"output_tok_s": tokens / wall if wall > 0 else 0.0, "seconds": wall, "output_tokens": tokens,
           "events": sum(len(r["stamps"]) for r in results),
           "complete": sum(r["error"] is None and r["tokens"] == n for r, n in zip(results, want_tokens)),
           "errors": [r["error"] for r in results if r["error"]][:3]}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = 1e3 * pct(xs, q / 100)
    return out


def note(lv: dict, n: int) -> str:
    """The table's note for one level of n clients (summarize's dict, with the offline run and GPU idle added)."""
    return (f"{lv['of_offline']:.0%} of offline ({lv['offline_tok_s']:,.0f}); TTFT p50/p90/p99 "
            f"{lv['ttft_p50_ms']:.0f}/{lv['ttft_p90_ms']:.0f}/{lv['ttft_p99_ms']:.0f} ms; TPOT p50 "
            f"{lv['tpot_p50_ms']:.1f} ms; ITL p50/p90/p99 {lv['itl_p50_ms']:.1f}/{lv['itl_p90_ms']:.1f}/"
            f"{lv['itl_p99_ms']:.1f} ms (offline step p50 {lv['offline_step_p50_ms']:.1f} ms); GPU idle "
            f"{lv['gpu_idle']:.1%}; complete {lv['complete']}/{n}, {lv['events']:,} events"
            + (f"; error: {lv['errors'][0]}" if lv["errors"] else ""))


def server_flags(eargs) -> list[str]:
    """serve.py flags that rebuild these engine arguments (a dataclass): the model, then every field not at its
    default (booleans as --flag / --no-flag)."""
    flags = ["--model", eargs.model]
    for f in dataclasses.fields(eargs):
        v, flag = getattr(eargs, f.name), "--" + f.name.replace("_", "-")
        if f.name != "model" and v != f.default and v is not None:
            flags += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return flags


def metric(port: int, name: str) -> float:
    """One value from GET /metrics (0.0 when it is missing)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_server(flags: list[str]) -> tuple[subprocess.Popen, int]:
    """serve.py with these flags on a free port, once GET /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(Path(__file__).parent / "serve.py"), "--port", str(port), *flags]
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    print("starting", " ".join(cmd), f"(log: {log.name})", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("serve.py did not answer GET /health in 900 s")


def stop_server(proc: subprocess.Popen):
    proc.terminate()                             # SIGTERM: it drains (nothing is in flight by now) and exits
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
