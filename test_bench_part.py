"""bench.py on the CPU: the floor arithmetic against BENCH.md's numbers, a shrunk run of a few modes with the
tiny model (JSON keys and positive numbers, no speed asserted), and the SSE client against a stand-in server.

    python -m pytest -q test_bench_part.py
"""
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ["QWEN3_KERNELS"] = "torch"

import pytest
import torch

import bench
from engine import EngineArgs
from model import preset


def bn_bench(model: str) -> bench.Bench:
    """A Bench with BENCH.md's H100 ceilings (2.99 TB/s, 777 TFLOP/s), bf16, nothing measured."""
    return bench.Bench(EngineArgs(model=model), bench.Workloads(), preset(model), torch.device("cpu"), torch.bfloat16,
                       2.99e12, 777e12, 0.0, None, {})


@pytest.mark.parametrize("model,offline,decode_ms,prefill", [
    ("qwen3-0.6b", 25_200, 0.40, 545_000), ("qwen3-1.7b", 20_800, 1.15, 211_000),
    ("qwen3-4b", 13_300, 2.7, None), ("qwen3-8b", 9_900, 5.1, 49_000)])
def test_bn_floors_match_bench_md(model, offline, decode_ms, prefill):
    b = bn_bench(model)
    prompts, outs = bench.offline_requests(256, 100, 1024, vocab=1000)
    fl = bench.floor(b, list(map(len, prompts)), outs)
    ms = 1e3 * bench.weight_params(b.cfg) * 2 / b.bandwidth
    print(f"{model}: offline floor {fl['tok_s']:,.0f} tok/s (BENCH.md {offline:,}), decode {ms:.3f} ms (BENCH.md {decode_ms})")
    assert fl["tok_s"] == pytest.approx(offline, rel=0.01)
    assert ms == pytest.approx(decode_ms, rel=0.02)
    if prefill:
        tok_s = 2048 / (bench.prompt_flops(b.cfg, 0, 2048) / b.matmul)
        print(f"{model}: prefill floor {tok_s:,.0f} tok/s (BENCH.md {prefill:,})")
        assert tok_s == pytest.approx(prefill, rel=0.01)
    if model == "qwen3-0.6b":       # BENCH.md's breakdown: 15.2 TB of KV, 1.2 TB of weights, 145k prompt tokens
        assert fl["kv_bytes"] / 1e12 == pytest.approx(15.2, abs=0.05)
        assert fl["weight_bytes"] / 1e12 == pytest.approx(1.2, abs=0.05)
        assert sum(map(len, prompts)) == pytest.approx(145_000, rel=0.01)


def test_bn_tiny_run_writes_json(tmp_path):
    out = tmp_path / "results.json"
    ret = bench.main(["decode-1", "offline", "prefix", "--model", "tiny", "--num-seqs", "4", "--min-len", "8",
                      "--max-len", "16", "--out", str(out)])
    r = json.loads(out.read_text())
    assert ret["rows"] and len(r["rows"]) == len(ret["rows"])
    for key in ("date", "device", "model", "shape", "engine_args", "workloads", "ceilings", "rows", "details"):
        assert key in r, key
    assert r["model"] == "tiny" and r["engine_args"]["random_weights"]
    assert r["ceilings"]["copy_bytes_per_s"] > 0 and r["ceilings"]["matmul_flop_per_s"] > 0
    rows = {row["workload"]: row for row in r["rows"]}
    print({k: (round(v["tok_s"], 1), round(v["floor_tok_s"])) for k, v in rows.items()})
    assert set(rows) == {"offline (4 reqs)", "decode-1", "prefix, cache on", "prefix, cache off"}
    for row in rows.values():
        assert row["tok_s"] > 0 and row["floor_tok_s"] > 0
    off = r["details"]["offline"]
    _, outs = bench.offline_requests(4, 8, 16, vocab=512)
    assert off["output_tokens"] == sum(outs) and off["blocks_total"] > 0 and off["preemptions"] == 0
    assert off["max_batch_seqs"] == 4, "all 4 requests should run in one batch"
    assert r["details"]["decode-1"]["ms_per_token"] > 0
    pre = r["details"]["prefix"]
    w = bench.CPU_WORKLOADS
    assert pre["off"]["prefill_tokens_computed"] == w.prefix_seqs * (w.prefix_len + w.suffix_len)
    assert 0 < pre["on"]["prefill_tokens_computed"] <= pre["off"]["prefill_tokens_computed"]


def test_bn_stream_client_counts_chunks_and_usage():
    """stream_completion against a stand-in for serve.py: 3 text chunks, then usage, then [DONE]."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ("a", "b", "c"):
                self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n".encode())
            usage = {"completion_tokens": body["max_tokens"]}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = bench.stream_completion(server.server_address[1], {"prompt": [1, 2], "max_tokens": 5, "stream": True})
    finally:
        server.shutdown()
    assert r["error"] is None and r["tokens"] == 5 and len(r["stamps"]) == 3
    assert r["stamps"] == sorted(r["stamps"]) and r["stamps"][0] > 0
