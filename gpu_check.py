"""Ad-hoc GPU validation (not committed)."""
import os, sys, time, json, traceback
import torch
t0 = time.time()
def log(*a):
    print(f"[{time.time()-t0:6.1f}s]", *a, flush=True)
from engine import LLM, EngineArgs
from sample import SamplingParams
import triton; log("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
mode = sys.argv[1] if len(sys.argv) > 1 else "all"
if mode in ("all", "smoke"):
    prompts = [[(7 * i + j) % 500 for j in range(5 + 13 * i)] for i in range(8)]
    res = {}
    for graphs in (True, False):
        llm = LLM(EngineArgs(model="tiny", random_weights=True, dtype="float32", num_blocks=512, max_num_seqs=32,
                             cuda_graphs=graphs))
        outs = {}
        for name, kw in {"greedy": dict(temperature=0), "qwen3": dict(seed=3), "T0.6": dict(temperature=0.6, top_k=0, top_p=1.0, seed=4),
                         "minp": dict(temperature=1.0, min_p=0.05, top_k=0, seed=5), "pen": dict(seed=6, presence_penalty=0.5, repetition_penalty=1.2, logprobs=3)}.items():
            o = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, **kw))
            outs[name] = [x.token_ids for x in o]
            alone = llm.generate([prompts[3]], SamplingParams(max_tokens=24, ignore_eos=True, **kw))[0].token_ids
            outs[name + "-alone-eq-batched"] = alone == outs[name][3]
        res[graphs] = outs
        del llm; torch.cuda.empty_cache()
    for k in res[True]:
        log("smoke", k, "graphs==eager:", res[True][k] == res[False][k], "| value:", res[True][k] if isinstance(res[True][k], bool) else "")
if mode in ("all", "sampler"):
    import bench_kernels
    copy, mm = bench_kernels.measure_ceilings()
    rows = bench_kernels.bench_sampler(copy)
    print(bench_kernels.format_rows(rows, copy, mm), flush=True)
if mode in ("all", "bench"):
    import bench
    bench.main(sys.argv[2:] or ["offline", "nanovllm", "decode-1"])
log("done")
