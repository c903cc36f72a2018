"""Benchmarks: the standard workloads of BENCH.md, each against its physical floor on this machine.

    python bench.py                                   # offline, decode-1, prefill, prefix on qwen3-0.6b (random weights)
    python bench.py offline decode-1 --peer hf        # ... and HF transformers on the same workloads, same process
    python bench.py prefix serve kernels --model qwen3-1.7b
    python bench.py --model tiny                      # on a CPU: the same workloads shrunk, to try it anywhere

Modes: offline (256 requests at once; Qwen3's sampling, greedy, with top-5 logprobs, with presence penalty 1.5),
decode-1 (one request, ms/token, and 8 at once, ms/step; sampled, greedy),
prefill (8 x 2048 tokens, one forward), prefix (64 requests sharing a 2,000-token prefix, prefix cache on vs off,
each after an untimed pass with another prefix), serve (serve.py on loopback, N streaming clients), timeline (a
decode step of --timeline-batches requests, default 1 and 8, sampled and greedy, under the profiler: each kernel's
time per step, the GPU's busy time and the gaps, against the step's floor; QWEN3_PDL=0 shows each kernel's own
time), kernels (the timeline, then bench_kernels.py's table), allreduce (with --tensor-parallel-size: all-reduce
time and bus bandwidth at decode and prefill sizes), spec (speculative decoding at chosen acceptance rates),
accuracy (top-1 agreement and logit error against transformers in fp32, for our engine, with FP8 weights, with an
FP8 KV cache, and transformers in the run's dtype and on the same FP8 weights beside them).
It prints a table (result, floor, result/floor, peer, ours/peer), a one-line summary, and writes everything to
--out (results.json).

Every floor comes from the two ceilings it measures first (memory bandwidth, bf16 matmul rate) and the model
shape: bench_floors.py has the formulas.

On a CPU the numbers mean nothing for speed: that run only shows the machinery works.
"""
import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from bench_floors import experts_read, floor, kv_bytes_per_token, prompt_flops, weight_bytes
from bench_kernels import bench_kernels, decode_timelines, format_rows, measure_ceilings, median_time, sync
from engine import LLM, EngineArgs, resolve_device_dtype
from model import Config, preset, resolve_checkpoint
from sample import SamplingParams, add_dataclass_args, pick, resolve

MODES = ["offline", "nanovllm", "decode-1", "spec", "allreduce", "prefix", "prefill", "accuracy", "timeline", "kernels", "serve"]
ENGINE_MODES = {"offline", "nanovllm", "decode-1", "spec", "prefix", "prefill", "timeline"}   # run LLM in this process
DEFAULT_MODES = ["offline", "decode-1", "prefill", "prefix"]      # MODES run in their order there (fewest rebuilds)


@dataclass
class Workloads:
    """BENCH.md's workload definitions (GPU), or the same shrunk for a CPU smoke run."""
    num_seqs: int = 256              # offline: requests, all submitted at once
    min_len: int = 100               # offline, serve: prompt and output lengths uniform in [min_len, max_len]
    max_len: int = 1024
    decode_prompt: int = 128         # decode-1: one request
    decode_tokens: int = 256
    prefill_seqs: int = 8            # prefill: prefill_seqs x prefill_len prompt tokens in one forward
    prefill_len: int = 2048
    prefix_seqs: int = 64            # prefix: a shared prefix + distinct suffixes, prefix_out tokens each
    prefix_len: int = 2000
    suffix_len: int = 100
    prefix_out: int = 128
    clients: tuple = (1, 16, 64, 256)  # serve: requests (and concurrent streaming clients) per level
    request_rate: float = float("inf")  # serve: Poisson arrivals per second (inf: all at once)
    max_concurrency: int | None = None  # serve: requests in flight at most (None: all of a level's)
    timeline_batches: tuple = (1, 8)    # timeline, kernels: decode steps of this many requests under the profiler
    timeline_prompt: int = 128          # ... each with a prompt this long


CPU_WORKLOADS = Workloads(num_seqs=8, min_len=16, max_len=64, decode_prompt=16, decode_tokens=32, prefill_seqs=2,
                          prefill_len=128, prefix_seqs=4, prefix_len=64, suffix_len=8, prefix_out=8, clients=(1, 4))


@dataclass
class Bench:
    """What every mode needs: engine settings, workloads, model shape, measured ceilings, the live engine."""
    eargs: EngineArgs
    w: Workloads
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    bandwidth: float                 # bytes/s, measured
    matmul: float                    # FLOP/s, measured
    sampling: dict                   # SamplingParams settings of the sampled runs ({}: the model's defaults)
    greedy_beside: bool              # also run greedy beside each sampled run
    peer_num_seqs: int | None        # offline: also run our engine on the peer's (smaller) workload
    held: dict                       # {"args": EngineArgs, "llm": LLM}: at most one engine alive
    repeat: int = 1                  # offline, nanovllm, serve: runs of each variant, interleaved; the median
    compiles: list = field(default_factory=list)   # Triton kernels compiled since the engine was built


# ----------------------------------------------------------------------------------------------------------
# Running the engine
# ----------------------------------------------------------------------------------------------------------

def engine(b: Bench, **overrides) -> LLM:
    """The engine for these settings. Each LLM sizes its KV cache to fill the GPU, so the old one goes first."""
    args = replace(b.eargs, **overrides)
    if b.held.get("args") != args:
        release(b)
        if b.device.type == "cuda" and torch.cuda.memory_allocated() > 2**30:
            print(f"warning: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated (an old engine?)", file=sys.stderr)
        print(f"building the engine ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'})", file=sys.stderr)
        llm = LLM(args)
        b.compiles.clear()                       # from here on, a compile is a stall a user's request would meet
        llm.generate([[1] * 32, [2] * 40], SamplingParams(max_tokens=8, ignore_eos=True))   # compile, warm up
        b.held.update(args=args, llm=llm)
    return b.held["llm"]


def watch_compiles(seen: list):
    """Append the name of each kernel Triton compiles from now on to seen (its post-compile hook; nothing where
    this Triton has none). The engine compiles at start (warm-up, CUDA graphs); one compiled later stalls the
    request that needed it, so the modes that run the engine in this process report any (serve's engine runs in
    a process of its own)."""
    try:
        import triton
    except Exception:                            # no Triton: the engine runs its references, nothing compiles
        return
    rt = getattr(getattr(triton, "knobs", None), "runtime", None)
    if rt is not None and hasattr(rt, "jit_post_compile_hook"):
        rt.jit_post_compile_hook = lambda **kw: seen.append(getattr(kw.get("fn"), "name", "?"))


def release(b: Bench):
    b.held.clear()
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def progress(total: int, desc: str):
    """tqdm's bar when tqdm is installed (it is not a dependency), else one that shows nothing."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:
        return SimpleNamespace(update=lambda n: None, close=lambda: None)


def run_requests(llm: LLM, prompts: list[list[int]], out_lens: list[int], sampling: dict, desc: str) -> dict:
    """Submit every request at once, step until all finish. Times are seconds since submission. sampling:
    SamplingParams settings (unset ones take the model's defaults: Qwen3's for random weights)."""
    llm.blocks.clear_cache()                     # each run computes its prompts: an earlier run's cache is not reused
    stats0 = llm.stats()
    bar = progress(sum(out_lens), desc)
    t0 = time.perf_counter()
    for p, n in zip(prompts, out_lens):
        # text comes once at the end, as LLM.generate does (no per-token detokenization)
        llm.add_request(p, SamplingParams(**sampling, max_tokens=n, ignore_eos=True), stream_text=False)
    stamps = []
    while llm.has_work():
        outs = llm.step()
        if outs:
            stamps.append(time.perf_counter() - t0)
            bar.update(len(outs))
    bar.close()
    stats = llm.stats()
    steps = stats["forward_passes"] - stats0["forward_passes"]
    busy = stats["gpu_busy_seconds"] - stats0["gpu_busy_seconds"]
    return {"seconds": stamps[-1], "first_token_s": stamps[0], "steps": steps, "output_tokens": sum(out_lens),
            "output_tok_s": sum(out_lens) / stamps[-1],
            "gpu_idle": 1 - busy / stamps[-1] if llm.device.type == "cuda" else None,
            "stamps": stamps, "prefill_tokens_computed": stats["prefill_tokens_computed"] - stats0["prefill_tokens_computed"],
            "preemptions": stats["num_preemptions"] - stats0["num_preemptions"], "blocks_total": stats["blocks_total"],
            "max_batch_seqs": stats["max_batch_seqs"]}


def offline_requests(n: int, lo: int, hi: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """BENCH.md's offline workload: seed 0, all prompt lengths drawn first, then output lengths, then ids."""
    random.seed(0)
    prompt_lens = [random.randint(lo, hi) for _ in range(n)]
    out_lens = [random.randint(lo, hi) for _ in range(n)]
    return [[random.randrange(vocab) for _ in range(p)] for p in prompt_lens], out_lens


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def row(workload: str, value: float, floor_tok_s: float | None, note: str = "", peer_of: str | None = None) -> dict:
    """One line of the table; value and floor in tok/s (higher is better)."""
    return {"workload": workload, "tok_s": value, "floor_tok_s": floor_tok_s, "note": note, "peer_of": peer_of,
            "peer_tok_s": None, "peer_note": None}


# ----------------------------------------------------------------------------------------------------------
# The modes: each returns (table rows, details for the JSON)
# ----------------------------------------------------------------------------------------------------------

def run_offline(b: Bench):
    w, llm = b.w, engine(b)
    prompts, outs = offline_requests(w.num_seqs, w.min_len, w.max_len, b.cfg.vocab_size)
    fl = floor(b, [len(p) for p in prompts], outs)
    rows, details = [], {"num_seqs": w.num_seqs, "prompt_tokens": sum(map(len, prompts)), "floor": fl}
    runs = variants(b, llm)
    if b.greedy_beside:      # what top-5 logprobs for every request cost, and a presence penalty (Qwen3's card: 0-2)
        runs.append((runs[0][0] + ", top-5 logprobs", {**runs[0][1], "logprobs": 5}))
        runs.append((runs[0][0] + ", presence penalty 1.5", {**runs[0][1], "presence_penalty": 1.5}))
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for label, r in repeated(b, llm, prompts, outs, runs, "offline"):
        rows.append(row(f"offline ({w.num_seqs} reqs), {label}", r["output_tok_s"], fl["tok_s"],
                        f"{r['output_tokens']:,} tok in {r['seconds']:.1f} s{r['spread']}, {r['blocks_total']:,} KV "
                        f"blocks, max batch {r['max_batch_seqs']}, {r['preemptions']} preemptions"
                        + (f", GPU idle {r['gpu_idle']:.1%}" if r["gpu_idle"] is not None else "")))
        details[label] = r
    if len(rows) == 4:
        rows[0]["note"] += f"; {rows[0]['tok_s'] / rows[1]['tok_s']:.1%} of greedy"
        for r in rows[2:]:
            r["note"] += f"; {r['tok_s'] / rows[0]['tok_s']:.1%} of the same without it"
        details["sampled_over_greedy"] = rows[0]["tok_s"] / rows[1]["tok_s"]
    if b.device.type == "cuda":                  # gpu_memory_utilization is what the engine may use of the card
        total = torch.cuda.get_device_properties(b.device).total_memory
        details["peak_memory_of_card"] = torch.cuda.max_memory_reserved() / total
        rows[0]["note"] += f"; peak GPU memory {details['peak_memory_of_card']:.1%} of the card"
    if b.peer_num_seqs:     # the peer runs fewer requests, all with the mean output length: run ours on that too
        prompts, outs = offline_requests(b.peer_num_seqs, w.min_len, w.max_len, b.cfg.vocab_size)
        outs = [round(statistics.mean(outs))] * len(outs)
        r2 = run_requests(llm, prompts, outs, {"temperature": 0.0}, "offline, peer workload")   # HF runs greedy
        fl2 = floor(b, [len(p) for p in prompts], outs)
        rows.append(row(f"offline ({len(outs)} reqs, out={outs[0]})", r2["output_tokens"] / r2["seconds"],
                        fl2["tok_s"], f"{r2['output_tokens']:,} tok in {r2['seconds']:.1f} s", peer_of="offline"))
        details["peer_workload"] = {"num_seqs": len(outs), "out_len": outs[0], "floor": fl2,
                                    "output_tok_s": r2["output_tokens"] / r2["seconds"], "seconds": r2["seconds"]}
    return rows, details


def repeated(b: Bench, llm: LLM, prompts, outs, runs: list[tuple[str, dict]], desc: str) -> list[tuple[str, dict]]:
    """Each (label, settings) run b.repeat times, the variants interleaved (A B C A B C ...) so that a slow spell of
    the machine falls on all of them; each variant's median run (by tok/s), with every run's tok/s beside it."""
    results = {label: [] for label, _ in runs}
    for i in range(b.repeat):
        for label, sampling in runs:
            r = run_requests(llm, prompts, outs, sampling, f"{desc}, {label}" + (f" ({i + 1}/{b.repeat})" if b.repeat > 1 else ""))
            results[label].append({k: v for k, v in r.items() if k != "stamps"})
    return [(label, median_run(rs)) for label, rs in results.items()]


def median_run(rs: list[dict]) -> dict:
    """The run of median output tok/s among repeats, with every run's tok/s beside it (runs_tok_s, spread)."""
    rates = [r["output_tok_s"] for r in rs]
    med = sorted(rs, key=lambda r: r["output_tok_s"])[(len(rs) - 1) // 2]
    spread = f"; median of {len(rs)}: {', '.join(f'{x:,.0f}' for x in rates)} tok/s" if len(rs) > 1 else ""
    return {**med, "runs_tok_s": rates, "spread": spread}


def variants(b: Bench, llm: LLM) -> list[tuple[str, dict]]:
    """(label, settings) of the runs of a workload: the sampled one, then greedy beside it."""
    p = resolve(SamplingParams(**b.sampling), llm.defaults)
    label = "greedy" if p.greedy else ", ".join(
        [f"T {p.temperature:g}"] + [f"{k} {v:g}" for k, v in (("top-p", p.top_p), ("top-k", p.top_k), ("min-p", p.min_p))
                                    if v not in (1.0, 0, 0.0)])
    return [(label, b.sampling)] + ([("greedy", {"temperature": 0.0})] if b.greedy_beside and not p.greedy else [])


def nanovllm_requests(n: int, lo: int, hi: int, max_id: int) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py, draw for draw: random.seed(0); each prompt randint(lo, hi) ids randint(0, max_id);
    then each output length randint(lo, hi)."""
    random.seed(0)
    prompts = [[random.randint(0, max_id) for _ in range(random.randint(lo, hi))] for _ in range(n)]
    return prompts, [random.randint(lo, hi) for _ in range(n)]


def run_nanovllm(b: Bench):
    """nano-vllm's own workload and settings (temperature 0.6, nothing else), beside Qwen3's settings and greedy
    on the same requests: the first row compares with the figures nano-vllm and vLLM publish."""
    w, llm = b.w, engine(b)
    prompts, outs = nanovllm_requests(w.num_seqs, w.min_len, w.max_len, min(10000, b.cfg.vocab_size - 1))
    fl = floor(b, [len(p) for p in prompts], outs)
    rows, details = [], {"floor": fl}
    runs = [("T 0.6 (nano-vllm's settings)", dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.0))]
    runs += [(label, kw) for label, kw in variants(b, llm) if kw != runs[0][1]]
    for label, r in repeated(b, llm, prompts, outs, runs, "nanovllm"):
        rows.append(row(f"nanovllm ({w.num_seqs} reqs), {label}", r["output_tok_s"], fl["tok_s"],
                        f"{r['output_tokens']:,} tok in {r['seconds']:.1f} s{r['spread']}"))
        details[label] = r
    if len(rows) == 3:
        rows[1]["note"] += f"; {rows[1]['tok_s'] / rows[2]['tok_s']:.1%} of greedy"
    return rows, details


def run_decode1(b: Bench):
    """One request (ms/token of its decode steps) and 8 at once (ms/step), with each of `variants`: Qwen3's
    sampling, then greedy beside it (issue 13's targets are greedy's)."""
    w, llm = b.w, engine(b)
    floor_ms = 1e3 * weight_bytes(b.cfg, b.dtype.itemsize) / b.bandwidth
    # batch 8's floor counts the experts 8 tokens route to (MoE); issue 13 asks for <= 1.2x decode-1
    floor8_ms = 1e3 * weight_bytes(b.cfg, b.dtype.itemsize, experts_read(b.cfg, 8) or None) / b.bandwidth
    rows, details = [], {}
    for label, sampling in variants(b, llm):
        r = run_requests(llm, random_prompts(1, w.decode_prompt, b.cfg.vocab_size, seed=1), [w.decode_tokens],
                         sampling, f"decode-1, {label}")
        ms = 1e3 * (r["seconds"] - r["first_token_s"]) / (w.decode_tokens - 1)   # decode steps only, not the prefill
        r8 = run_requests(llm, random_prompts(8, w.decode_prompt, b.cfg.vocab_size, seed=2), [w.decode_tokens] * 8,
                          sampling, f"decode-8, {label}")
        ms8 = 1e3 * (r8["stamps"][-1] - r8["stamps"][0]) / (len(r8["stamps"]) - 1)
        rows += [row(f"decode-1, {label}", 1e3 / ms, 1e3 / floor_ms, f"{ms:.2f} ms/token (floor {floor_ms:.2f} ms)",
                     peer_of="decode-1" if label == "greedy" else None),     # the peer decodes greedily
                 row(f"decode-8, {label}", 8e3 / ms8, 8e3 / floor8_ms, f"{ms8:.2f} ms/step of 8 tokens (floor "
                     f"{floor8_ms:.2f} ms), {ms8 / ms:.2f}x decode-1")]
        details[label] = {"ms_per_token": ms, "tok_s": 1e3 / ms, "floor_ms_per_token": floor_ms,
                          "prefill_s": r["first_token_s"], "batch8_ms_per_step": ms8, "batch8_steps": len(r8["stamps"])}
    return rows, details


def oracle_drafter(continuations: dict, acceptance: float, vocab: int, rng: random.Random):
    """A drafter proposing each request's known greedy continuation, each token shifted to another id with chance
    1 - acceptance. drafted: tokens already appended as drafts (a draft model's, being rewritten)."""
    def propose(seq, k, drafted=0):
        done = seq.num_tokens - drafted - len(seq.prompt_ids)
        want = continuations[tuple(seq.prompt_ids)][done:done + k]
        return [t if rng.random() < acceptance else (t + 1) % vocab for t in want]
    return propose


def coin_judge(kept: float, rng: random.Random):
    """Speculator.judge for the rows of the engine's own rule: each draft kept with chance `kept`, up to the first
    miss, whatever its token. Plain steps between rounds (pauses, timing) would take a run off the oracle's path."""
    return lambda seq, drafts, target: next((j for j in range(len(drafts)) if rng.random() >= kept), len(drafts))


def run_spec(b: Bench):
    """Speculative decoding (speculate.py) at controlled acceptance, batch 1 and 16, K = 2, 4, 8, against the same
    requests without speculation (decode_prompt-token prompts, decode_tokens out; ms/token = wall time / tokens per
    sequence; the floor is plain decoding's). Rows drafting at every step (Speculator.pausing off) decode greedily
    and propose the target's own continuation (from a first run with every draft wrong: random weights' near-tied
    logits make plain decoding's differ), each draft wrong with probability 1 - kept; with --speculative-model the
    draft model runs every round and its drafts are replaced. The "adaptive" rows run the engine's rule (plain steps
    in between would leave that path), so coin_judge keeps each draft with the chosen chance instead, whatever the
    tokens: so they run greedy and with Qwen3's sampling (`variants`), each against its own run without drafts."""
    w = b.w
    draft = b.eargs.speculative_model is not None
    llm = engine(b, speculative_method="draft" if draft else "ngram")
    spec, rows, details = llm.speculator, [], {}
    greedy = {"temperature": 0.0}
    sampled = [(label, kw) for label, kw in variants(b, llm) if label != "greedy"]   # Qwen3's sampling (none: greedy)
    settings = {None: greedy, **dict(sampled)}         # sampling label (None: greedy) -> SamplingParams settings

    def timed(prompts, sampling=greedy):
        llm.blocks.clear_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(**sampling, max_tokens=w.decode_tokens, ignore_eos=True))
        while llm.has_work():                          # a round launched before the last tokens were reported
            llm.step()
        return time.perf_counter() - t0, {tuple(p): o.token_ids for p, o in zip(prompts, outs)}

    def drafting(kept, adaptive, seed):                # adaptive: a draft model's own drafts, judged
        oracle = oracle_drafter(cont, 0.0 if adaptive else kept, b.cfg.vocab_size, random.Random(seed))
        spec.drafter, spec.pausing, spec.gate = oracle, adaptive, None
        spec.rewrite = (lambda seq, d: oracle(seq, len(d), len(d))) if draft and not adaptive else None
        spec.judge = coin_judge(kept, random.Random(seed)) if adaptive else None

    for B in (1, 16):
        prompts = random_prompts(B, w.decode_prompt, b.cfg.vocab_size, seed=3)
        llm.speculator = None
        seconds, cont = timed(prompts)
        base = {None: 1e3 * seconds / w.decode_tokens}                # ms/token without drafts, by sampling label
        for label, _ in sampled:
            base[label] = 1e3 * timed(prompts, settings[label])[0] / w.decode_tokens
        llm.speculator = spec
        fl = B * b.bandwidth / weight_bytes(b.cfg, b.dtype.itemsize)
        for label, ms in base.items():
            rows.append(row(f"spec off, B={B}" + (f", {label}" if label else ""), B * 1e3 / ms, fl, f"{ms:.2f} ms/token"))
        # untimed: a pause's long catch-up runs eagerly, and its first run compiles kernels (1.5 s at B=16)
        spec.k = 2
        drafting(0.0, True, 0)
        for kw in settings.values():
            timed(prompts, kw)
        for K in (2, 4, 8):
            spec.k = K
            # the first run's tokens are the later runs' continuation
            cases = [(kept, False, None) for kept in (0.0, 1.0, 0.7, 0.4)]
            cases += [(kept, True, label) for label in settings for kept in (0.7, 0.4, 0.0)]
            for kept, adaptive, label in cases:
                drafting(kept, adaptive, K)
                before = spec.stats()
                seconds, got = timed(prompts, settings[label])
                if kept == 0.0 and not adaptive:
                    cont = got
                st = {k: v - before[k] for k, v in spec.stats().items()}
                ms, base_ms = 1e3 * seconds / w.decode_tokens, base[label]
                measured = st["spec_accepted_tokens"] / max(1, st["spec_draft_tokens"])
                if kept == 1.0 and measured < 0.9:         # drafts equal to its own tokens: the target disagreed
                    print(f"warning: B={B} K={K}: {measured:.0%} of the target's own continuation kept: its verify "
                          f"pass does not reproduce its tokens (a race, or rows computed differently)", file=sys.stderr)
                per_step = 1 + st["spec_accepted_tokens"] / max(1, st["spec_verified_seqs"])
                name = (f"spec B={B} K={K} drafts kept {kept:.0%}" + (", adaptive" if adaptive else "")
                        + (f", {label}" if label else "") + (f", draft model {b.eargs.speculative_model}" if draft else ""))
                rows.append(row(name, B * 1e3 / ms, fl, f"{ms:.2f} ms/token, {base_ms / ms:.2f}x spec off; "
                                f"acceptance {measured:.0%}, {per_step:.2f} tokens per verify pass, "
                                f"{st['spec_verify_steps']} passes"))
                details[name] = {"ms_per_token": ms, "speedup": base_ms / ms, "acceptance": measured,
                                  "tokens_per_step": per_step, "verify_passes": st["spec_verify_steps"]}
    return rows, details


def run_prefill(b: Bench):
    w = b.w
    n_tok = w.prefill_seqs * w.prefill_len
    llm = engine(b, max_num_batched_tokens=max(b.eargs.max_num_batched_tokens, n_tok),
                 max_num_seqs=max(b.eargs.max_num_seqs, w.prefill_seqs))
    times, steps = [], []
    for seed in range(4):      # fresh random prompts each time, so the prefix cache never helps; the first warms
        prompts = random_prompts(w.prefill_seqs, w.prefill_len, b.cfg.vocab_size, seed=100 + seed)
        r = run_requests(llm, prompts, [1] * w.prefill_seqs, {"temperature": 0.0}, "prefill")
        times.append(r["seconds"])
        steps.append(r["steps"])
    t = statistics.median(times[1:])
    fl = n_tok / (w.prefill_seqs * prompt_flops(b.cfg, 0, w.prefill_len) / b.matmul)
    return ([row(f"prefill ({w.prefill_seqs}x{w.prefill_len})", n_tok / t, fl,
                 f"{1e3 * t:.1f} ms, {steps[-1]} forward(s)", peer_of="prefill")],
            {"seconds": t, "tok_s": n_tok / t, "floor_tok_s": fl, "forwards": steps[-1], "all_seconds": times})


def run_prefix(b: Bench):
    w = b.w
    prefix = random_prompts(1, w.prefix_len, b.cfg.vocab_size, seed=2)[0]
    suffixes = random_prompts(w.prefix_seqs, w.suffix_len, b.cfg.vocab_size, seed=3)
    prompts, outs = [prefix + s for s in suffixes], [w.prefix_out] * w.prefix_seqs
    total = w.prefix_len + w.suffix_len
    fl = floor(b, [total] * w.prefix_seqs, outs, [(0, w.prefix_len)] + [(w.prefix_len, total)] * w.prefix_seqs,
               shared_prefix=w.prefix_len)
    # an untimed pass first, with another prefix (so it leaves nothing the timed pass can reuse): kernel
    # compiles, cuBLAS's first calls at these shapes and allocator growth are not part of the measurement
    warm = random_prompts(1, w.prefix_len, b.cfg.vocab_size, seed=4)[0]
    rows, details = [], {"floor": fl}
    for on in (True, False):
        llm = engine(b, prefix_cache=on)
        run_requests(llm, [warm + s for s in suffixes], outs, b.sampling, "prefix warm-up")
        r = run_requests(llm, prompts, outs, b.sampling, f"prefix cache {'on' if on else 'off'}")
        del llm                   # the next engine can only be built once this one's KV cache is freed
        tok_s = r["output_tokens"] / r["seconds"]
        rows.append(row(f"prefix, cache {'on' if on else 'off'}", tok_s, fl["tok_s"],
                        f"{r['prefill_tokens_computed']:,} prefill tokens computed of {total * w.prefix_seqs:,}"))
        details["on" if on else "off"] = {"output_tok_s": tok_s, "seconds": r["seconds"],
                                          "prefill_tokens_computed": r["prefill_tokens_computed"]}
    details["on_over_off"] = rows[0]["tok_s"] / rows[1]["tok_s"]
    rows[0]["note"] += f"; {details['on_over_off']:.2f}x cache off"
    return rows, details


def run_allreduce(b: Bench):
    """Tensor parallelism: all-reduce time and bus bandwidth (2 (N-1)/N x bytes / time, NCCL's measure) at the
    message sizes of decode (batch x hidden) and of a prefill chunk, and what a decode step spends in them."""
    n = b.eargs.tensor_parallel_size
    if n == 1:
        print("allreduce: needs --tensor-parallel-size 2 or more")
        return [], {"available": False}
    llm, H, L = engine(b), b.cfg.hidden_size, b.cfg.num_hidden_layers
    tokens = [1, 8, 64, 256, b.eargs.max_num_batched_tokens]
    times = llm.runner.all_reduce_times([t * H for t in tokens])
    table = [{"tokens": t, "bytes": t * H * b.dtype.itemsize, "us": 1e6 * s,
              "bus GB/s": 2 * (n - 1) / n * t * H * b.dtype.itemsize / s / 1e9,
              "per step (2L+1 of them), ms": 1e3 * (2 * L + 1) * s} for t, s in zip(tokens, times)]
    print(f"\nall-reduce over {n} ranks ({b.device.type}), hidden {H}, {L} layers:")
    print_table(table, list(table[0]))
    return [], {"available": True, "ranks": n, "rows": table}


def run_timeline(b: Bench):
    """A decode step of each of --timeline-batches requests (prompts of --timeline-prompt tokens) under the
    profiler (bench_kernels.decode_timeline), sampled and greedy beside it: each kernel's time per step, the GPU's
    busy time and the gaps, against the step's floor: the weights it reads (MoE: the experts that many tokens
    route to) and the batch's K/V, over the bandwidth. QWEN3_PDL=0 shows each kernel's own time (no launch
    overlaps another)."""
    if b.device.type != "cuda":
        print("timeline: the profiler timeline needs a GPU")
        return [], {"available": False}
    step_bytes = lambda n: (weight_bytes(b.cfg, b.dtype.itemsize, experts_read(b.cfg, n) or None)
                            + n * (b.w.timeline_prompt + 16) * kv_bytes_per_token(b))   # context mid-way
    llm = engine(b)
    return [], {"available": True, "decode_timeline": decode_timelines(
        llm, b.w.timeline_batches, b.w.timeline_prompt, lambda n: 1e6 * step_bytes(n) / b.bandwidth, variants(b, llm))}


def run_kernels(b: Bench):
    """run_timeline first, while an engine of this model is alive; then bench_kernels' table."""
    if b.device.type != "cuda":
        print("kernels: the kernel table needs a GPU")
        return [], {"available": False}
    try:
        timeline = run_timeline(b)[1]["decode_timeline"]
    except Exception as e:                             # the profiler must not cost the kernel table
        print(f"decode timeline failed: {type(e).__name__}: {e}")
        timeline = {}
    release(b)
    table = bench_kernels(b.bandwidth / 1e9, b.matmul / 1e12)
    print(format_rows(table, b.bandwidth / 1e9, b.matmul / 1e12))
    return [], {"available": True, "rows": table, "decode_timeline": timeline}


def run_accuracy(b: Bench):
    """bench_hf.accuracy: our engine (plain, FP8 KV cache, FP8 weights) and transformers in the run's dtype,
    each against transformers in fp32: top-1 agreement and logit error. 8 prompts x 512 positions (CPU: 2 x 64)."""
    import bench_hf
    release(b)
    n_prompts, length = (8, 512) if b.device.type == "cuda" else (2, 64)
    res = bench_hf.accuracy(b.cfg, b.eargs, b.device, b.dtype, n_prompts, length)
    release(b)
    table = [{"variant": k, "top-1 vs fp32": f"{v['top1_agreement']:.2%}", "max |logit diff|": v["max_abs_logit_diff"],
              "mean |logit diff|": v["mean_abs_logit_diff"], "clear positions": v["clear_positions"],
              "top-1 there": f"{v['top1_agreement_clear']:.2%}"} for k, v in res.items()]
    print(f"\naccuracy against transformers in fp32 ({n_prompts} x {length} positions):")
    print_table(table, list(table[0]))
    return [], res


# ---- serve: serve.py as a subprocess, clients in worker processes (bench_serve.py) ----------------------------

def run_serve(b: Bench):
    """Each level: N requests of the offline workload's lengths over N streaming clients (or --max-concurrency),
    sent at once or at --request-rate. Beside it, from the same run: the same N requests offline (all in one
    batch, as max_num_seqs = N would run them), its median step time, and the GPU's idle share while serving."""
    import bench_serve
    w, llm = b.w, engine(b)
    runs = variants(b, llm)
    reqs = {n: offline_requests(n, w.min_len, w.max_len, b.cfg.vocab_size) for n in w.clients}   # (prompts, outs)
    offline = {}
    for _ in range(b.repeat):                    # repeats interleaved, as `repeated` does; medians reported
        for label, kw in runs:
            for n in w.clients:
                r = run_requests(llm, *reqs[n], kw, f"offline x{n}, {label}")
                steps = [y - x for x, y in zip(r["stamps"], r["stamps"][1:])]
                offline.setdefault((label, n), []).append({
                    "output_tok_s": r["output_tokens"] / r["seconds"],
                    "step_p50_ms": 1e3 * statistics.median(steps) if steps else float("nan")})
    offline = {key: median_run(rs) for key, rs in offline.items()}
    del llm
    release(b)                                   # the server needs the GPU memory
    proc, port = bench_serve.start_server(bench_serve.server_flags(b.eargs))
    pool = bench_serve.ClientPool(min(8, max(w.clients)))
    rows, levels = [], {}
    try:
        for n in (16, 300, 1000):                # warm-up: Triton compiles its kernels for these shapes once
            bench_serve.stream_completion(port, {"model": b.eargs.model, "prompt": [1] * n, "max_tokens": 4,
                                                 "stream": True})
        served = {}
        for _ in range(b.repeat):
            for label, kw in runs:
                for n in w.clients:
                    prompts, outs = reqs[n]
                    bodies = [{"model": b.eargs.model, "stream": True, "stream_options": {"include_usage": True},
                               "ignore_eos": True, **kw, "prompt": p, "max_tokens": o} for p, o in zip(prompts, outs)]
                    busy = bench_serve.metric(port, "qwen3_gpu_busy_seconds_total")
                    res, t0 = pool.run(port, bodies, bench_serve.arrivals(n, w.request_rate), w.max_concurrency or n)
                    lv = bench_serve.summarize(res, outs, t0)
                    lv["gpu_idle"] = 1 - (bench_serve.metric(port, "qwen3_gpu_busy_seconds_total") - busy) / lv["seconds"]
                    served.setdefault((label, n), []).append(lv)
        for (label, n), lvs in served.items():
            lv, off = median_run(lvs), offline[label, n]
            lv.update(offline_tok_s=off["output_tok_s"], offline_step_p50_ms=off["step_p50_ms"],
                      of_offline=lv["output_tok_s"] / off["output_tok_s"], offline_runs_tok_s=off["runs_tok_s"])
            levels[f"{label}, {n}"] = lv
            prompts, outs = reqs[n]
            rows.append(row(f"serve ({n} clients), {label}", lv["output_tok_s"],
                            floor(b, list(map(len, prompts)), outs)["tok_s"],
                            bench_serve.note(lv, n) + lv["spread"] + off["spread"].replace("median", "offline: median")))
    finally:
        pool.close()
        bench_serve.stop_server(proc)
    return rows, {"levels": levels, "request_rate": w.request_rate, "max_concurrency": w.max_concurrency}


# ----------------------------------------------------------------------------------------------------------
# The peer: Hugging Face transformers on the same workloads, same random-weight shapes
# ----------------------------------------------------------------------------------------------------------

def peer_runs(b: Bench) -> dict:
    """mode -> (model -> (tok/s, note)): bench_hf's runs on this run's workloads."""
    import bench_hf
    w = b.w
    return {"decode-1": lambda m: bench_hf.decode1(m, torch.tensor(random_prompts(1, w.decode_prompt, b.cfg.vocab_size,
                                                                                  seed=1), device=b.device), w.decode_tokens),
            "prefill": lambda m: bench_hf.prefill(m, torch.tensor(random_prompts(w.prefill_seqs, w.prefill_len,
                                                                                 b.cfg.vocab_size, seed=100), device=b.device),
                                                  lambda fn: median_time(fn, b.device, reps=3, warmup=1)),
            "offline": lambda m: bench_hf.offline(m, *offline_requests(b.peer_num_seqs, w.min_len, w.max_len,
                                                                       b.cfg.vocab_size), lambda: sync(b.device))}


def run_peer(b: Bench, rows: list[dict], details: dict):
    import bench_hf
    release(b)
    print("building the HF transformers peer", file=sys.stderr)
    model = bench_hf.hf_model(b.cfg, b.device, b.dtype)
    for mode, fn in peer_runs(b).items():
        targets = [r for r in rows if r["peer_of"] == mode]
        if not targets:
            continue
        print(f"peer: {mode}", file=sys.stderr)
        try:
            value, note = fn(model)
        except Exception as e:                   # a peer that breaks must not lose our own results
            value, note = None, f"HF failed: {type(e).__name__}: {e}"
            print(note, file=sys.stderr)
        for r in targets:
            r["peer_tok_s"], r["peer_note"] = value, note
        details.setdefault("peer_hf", {})[mode] = {"tok_s": value, "note": note}
    del model
    release(b)


# ----------------------------------------------------------------------------------------------------------
# Output and main
# ----------------------------------------------------------------------------------------------------------

def fmt(x) -> str:
    if x is None or isinstance(x, str):
        return x or ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_table(rows: list[dict], cols: list[str]):
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    for j, line in enumerate(cells):
        print(" | ".join(c.ljust(wd) for c, wd in zip(line, widths)).rstrip())
        if j == 0:
            print("-+-".join("-" * wd for wd in widths))


def report(b: Bench, rows: list[dict], peer: bool):
    table = [{"workload": r["workload"], "model": b.eargs.model, "result (tok/s)": r["tok_s"], "floor": r["floor_tok_s"],
              "of floor": f"{r['tok_s'] / r['floor_tok_s']:.1%}",
              **({"peer (tok/s)": r["peer_tok_s"], "ours/peer": f"{r['tok_s'] / r['peer_tok_s']:.2f}x"
                  if r["peer_tok_s"] else ""} if peer else {}),
              "notes": r["note"] + (f"; peer: {r['peer_note']}" if r["peer_note"] else "")} for r in rows]
    print()
    if table:
        print_table(table, list(table[0]))
    print("\nsummary: " + ", ".join(
        f"{r['workload']} {r['tok_s']:,.0f} tok/s = {r['tok_s'] / r['floor_tok_s']:.0%} of floor"
        + (f", {r['tok_s'] / r['peer_tok_s']:.2f}x HF" if r["peer_tok_s"] else "") for r in rows)
        + ("" if b.device.type == "cuda" else " (CPU: not a speed measurement)"))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", help=f"any of {', '.join(MODES)} (default: {' '.join(DEFAULT_MODES)})")
    ap.add_argument("--peer", choices=["hf"], help="also run HF transformers on offline, decode-1 and prefill")
    ap.add_argument("--peer-num-seqs", type=int, default=64, help="offline requests for the peer (default: 64)")
    ap.add_argument("--num-seqs", type=int, help="offline requests (default: 256; CPU: 8)")
    ap.add_argument("--min-len", type=int, help="offline/serve shortest prompt and output (default: 100; CPU: 16)")
    ap.add_argument("--max-len", type=int, help="offline/serve longest prompt and output (default: 1024; CPU: 64)")
    ap.add_argument("--clients", type=int, nargs="+", help="serve: requests per level (default: 1 16 64 256)")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="serve: Poisson arrivals per second (default: inf, all at once)")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="serve: requests in flight at most (default: all of a level's)")
    ap.add_argument("--timeline-batches", type=int, nargs="+",
                    help="timeline, kernels: requests per profiled decode step (default: 1 8)")
    ap.add_argument("--timeline-prompt", type=int, help="timeline, kernels: their prompt length (default: 128)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="offline, prefix, serve, nanovllm: the sampled runs' temperature (default: the model's, with "
                         "its top-p/top-k: Qwen3's 0.6 / 0.95 / 20 for random weights); 0 = greedy only")
    ap.add_argument("--repeat", type=int, help="offline, nanovllm, serve: runs of each variant, interleaved, the median "
                                               "reported (default: 3 on a GPU, 1 on a CPU)")
    ap.add_argument("--out", default="results.json", help="where the JSON results go (default: results.json)")
    ap.add_argument("--model", help="a named size (random weights) or a checkpoint dir (default: qwen3-0.6b on a GPU, "
                                    "tiny on a CPU)")
    add_dataclass_args(ap, EngineArgs, skip=("model",))
    args = ap.parse_args(argv)
    args.modes = args.modes or DEFAULT_MODES
    if bad := [m for m in args.modes if m not in MODES]:
        ap.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    return args


def setup(args) -> Bench:
    """Engine settings, workloads and model shape from the flags; the ceilings measured; the offline floor shown."""
    eargs = pick(args, EngineArgs)
    device, dtype = resolve_device_dtype(eargs)
    gpu = device.type == "cuda"
    eargs.model = args.model or ("qwen3-0.6b" if gpu else "tiny")
    try:
        cfg, eargs.random_weights = preset(eargs.model), True      # a named size: random weights of its shape
    except ValueError:
        cfg = Config.from_json(resolve_checkpoint(eargs.model) / "config.json")
    cfg.quantization = cfg.quantization or eargs.quantization          # floors count FP8 weights at their width
    w = replace(Workloads() if gpu else CPU_WORKLOADS,
                **{k: getattr(args, k) for k in ("num_seqs", "min_len", "max_len") if getattr(args, k) is not None})
    w.clients, w.timeline_batches = tuple(args.clients or w.clients), tuple(args.timeline_batches or w.timeline_batches)
    w.timeline_prompt = args.timeline_prompt or w.timeline_prompt
    w.request_rate, w.max_concurrency = args.request_rate, args.max_concurrency
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, torch {torch.__version__}; model {eargs.model} "
          f"({'random weights' if eargs.random_weights else 'checkpoint'}, {str(dtype).removeprefix('torch.')}): hidden "
          f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
          f"head_dim {cfg.head_dim}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}"
          + (f", {cfg.num_experts} experts ({cfg.num_experts_per_tok} per token, width {cfg.moe_intermediate_size})"
             if cfg.num_experts else "") + (", FP8 projections (W8A16 for one token, W8A8 for more)" if cfg.quantization else ""))
    if not gpu:
        print("CPU run: the workloads are shrunk, and the numbers mean nothing for speed (they show the machinery works)")
    print("measuring the ceilings ...", file=sys.stderr)
    bandwidth, matmul = measure_ceilings(device, dtype)
    n = eargs.tensor_parallel_size              # tensor parallelism: the floor of all n devices together
    if n > 1:
        print(f"tensor parallelism over {n} devices: ceilings measured on one, floors at {n} x them")
        bandwidth, matmul = n * bandwidth, n * matmul
    sampling = {} if args.temperature is None else {"temperature": args.temperature}
    b = Bench(eargs, w, cfg, device, dtype, bandwidth, matmul, sampling, args.temperature != 0,
              args.peer_num_seqs if args.peer and "offline" in args.modes else None, {},
              args.repeat or (3 if gpu else 1))
    prompts, outs = offline_requests(w.num_seqs, w.min_len, w.max_len, cfg.vocab_size)
    fl = floor(b, list(map(len, prompts)), outs)
    print(f"ceilings: copy {si(bandwidth)}B/s (read + written), {str(dtype).removeprefix('torch.')} matmul {si(matmul)}FLOP/s")
    print(f"offline floor: {si(fl['kv_bytes'])}B of KV reads + {si(fl['weight_bytes'])}B of weight reads "
          f"({max(outs) - 1} steps, {si(fl['weight_bytes'] / (max(outs) - 1))}B each) at {si(bandwidth)}B/s + "
          f"{sum(map(len, prompts)):,} prompt tokens ({si(fl['prompt_flops'])}FLOP) at {si(matmul)}FLOP/s = "
          f"{fl['seconds']:.3g} s -> {fl['tok_s']:,.0f} output tok/s")
    return b


def si(x: float) -> str:
    return next((f"{x / p:.3g} {u}" for p, u in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                 if x >= p), f"{x:.3g} ")


def main(argv=None) -> dict:
    args = parse_args(argv)
    b = setup(args)
    watch_compiles(b.compiles)
    run = {"offline": run_offline, "nanovllm": run_nanovllm, "decode-1": run_decode1, "prefill": run_prefill,
           "prefix": run_prefix, "spec": run_spec, "timeline": run_timeline, "allreduce": run_allreduce,
           "accuracy": run_accuracy, "kernels": run_kernels, "serve": run_serve}
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(b.device)
           if b.device.type == "cuda" else "cpu", "torch": torch.__version__, "modes": args.modes,
           "model": b.eargs.model, "dtype": str(b.dtype).removeprefix("torch."), "shape": asdict(b.cfg),
           "engine_args": asdict(b.eargs), "workloads": asdict(b.w),
           "ceilings": {"copy_bytes_per_s": b.bandwidth, "matmul_flop_per_s": b.matmul}, "rows": [], "details": {}}
    save = lambda: Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    for mode in [m for m in MODES if m in args.modes]:
        b.compiles.clear()
        rows, out["details"][mode] = run[mode](b)
        if mode in ENGINE_MODES and b.compiles:
            print(f"warning: {mode}: {len(b.compiles)} Triton compiles after the engine was built (each a stall): "
                  f"{', '.join(sorted(set(b.compiles)))}", file=sys.stderr)
        for r in rows:
            print(f"{r['workload']}: {r['tok_s']:,.1f} tok/s, floor {r['floor_tok_s']:,.0f} ({r['note']})", file=sys.stderr)
        out["rows"] += rows
        save()                                   # a run cut short keeps what it measured
    if args.peer:
        run_peer(b, out["rows"], out["details"])
    release(b)
    report(b, out["rows"], bool(args.peer))
    save()
    print(f"results written to {args.out}")
    return out


if __name__ == "__main__":
    main()
