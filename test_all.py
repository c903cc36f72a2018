"""The test suite: CPU only, no downloads. Run with `python -m pytest -q test_all.py`.

The oracle is Hugging Face transformers' Qwen3 on the same checkpoint. The tests write their own tiny
checkpoints with transformers' `save_pretrained` (so key names and file layout are the real ones) and train
a tiny byte-level BPE tokenizer with `tokenizers`. Every test that runs the engine ends by checking that all
KV blocks went back to the pool.
"""
import json
import os
import random

import pytest
import torch

import cache
from engine import LLM, Detokenizer, EngineArgs, Tokenizer
from model import AttnMeta, preset
from sample import SamplingParams, SamplingTensors, sample
from scheduler import Scheduler, Sequence

os.environ.setdefault("QWEN3_KERNELS", "torch")   # engine tests use the PyTorch path; kernel tests flip it

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "Qwen3 is a family of language models. Über naïve café — ünïcödé 日本語 テキスト 😀! ") * 20


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


def make_checkpoint(path, tied=True, shard=False, seed=0):
    import transformers
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=tied, eos_token_id=2, bos_token_id=0, initializer_range=0.3)
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


@pytest.mark.parametrize("batched", [True, False])
def test_greedy_matches_transformers(ckpt, batched):
    path, hf = ckpt
    llm = engine(path)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
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
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 33, 1, 17)])
    for p, o, n in zip(prompts, outs, (5, 33, 1, 17)):
        assert o.token_ids == hf_greedy(hf, p, n)
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

def draw(logits, params, seeds, steps=None):
    B = logits.shape[0]
    st = SamplingTensors.build(params, seeds, steps or [0] * B, [[0]] * B, logits.shape[1], "cpu")
    return sample(logits, st)


def test_sampling_rules():
    torch.manual_seed(0)
    V, N = 50, 400
    logits = torch.randn(1, V) * 2
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)
    many = logits.expand(N, V).contiguous()
    seeds = list(range(N))
    # temperature 0 is argmax
    assert (draw(many, [SamplingParams()] * N, seeds) == order[0]).all()
    # top-k never picks outside the k best
    got = draw(many, [SamplingParams(temperature=1.0, top_k=3)] * N, seeds)
    assert set(got.tolist()) <= set(order[:3].tolist()) and len(set(got.tolist())) > 1
    # top-p: the smallest prefix of the sorted tokens whose mass reaches p
    p = 0.6
    cum = probs[order].cumsum(0)
    keep = order[: int((cum < p).sum()) + 1].tolist()
    got = draw(many, [SamplingParams(temperature=1.0, top_p=p)] * N, seeds)
    assert set(got.tolist()) <= set(keep)
    # min-p: never a token below min_p x the best token's probability
    got = draw(many, [SamplingParams(temperature=1.0, min_p=0.3)] * N, seeds)
    assert all(probs[t] >= 0.3 * probs.max() for t in got.tolist())
    # seeded draws repeat, different seeds differ, and the frequencies follow softmax
    a = draw(many, [SamplingParams(temperature=1.0)] * N, seeds)
    b = draw(many, [SamplingParams(temperature=1.0)] * N, seeds)
    assert torch.equal(a, b) and len(set(a.tolist())) > 5
    freq = torch.bincount(draw(logits.expand(4000, V).contiguous(), [SamplingParams(temperature=1.0)] * 4000,
                               list(range(4000))), minlength=V).float() / 4000
    print("max |freq - softmax|:", (freq - probs).abs().max().item())
    assert (freq - probs).abs().max() < 0.05


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    st = SamplingTensors.build([SamplingParams(repetition_penalty=2.0)], [0], [0], [[0]], 4, "cpu")
    assert sample(logits, st).item() == 1                  # token 0 was seen: 2.0 / 2 < 1.9


def test_seeded_generation_repeats(ckpt):
    path, _ = ckpt
    llm = engine(path)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=123, ignore_eos=True)
    a = llm.generate([PROMPTS[0]], p)[0].token_ids
    b = llm.generate([PROMPTS[1], PROMPTS[0]], p)[1].token_ids    # same request inside another batch
    assert a == b
    assert llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=20, seed=7, ignore_eos=True))[0].token_ids != a
    assert_no_leak(llm)


# ----------------------------------------------------------------------------------------------------------
# Text: detokenization and stop strings
# ----------------------------------------------------------------------------------------------------------

def test_incremental_detokenization_is_exact(ckpt):
    path, _ = ckpt
    tok = Tokenizer(path)
    ids = tok.encode(TEXT[:300])
    detok = Detokenizer(tok, [], SamplingParams())
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
    full = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    stop = full.text[10:13]
    assert len(full.text) > 13 and stop.strip()
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    # streaming hands out exactly the same text, never a piece of the stop string
    streamed = "".join(o.text for _, o in llm.stream([PROMPTS[1]], SamplingParams(max_tokens=40, ignore_eos=True,
                                                                                   stop=[stop])))
    assert streamed == out.text
    assert_no_leak(llm)


def test_eos_and_stop_token_ids(ckpt):
    path, _ = ckpt
    llm = engine(path)
    full = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop_tok = full.token_ids[5]
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1]
    assert_no_leak(llm)


def test_chat_template_fallback_renders_qwen3_format(ckpt):
    path, _ = ckpt
    tok = Tokenizer(path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_inputs(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        LLM(EngineArgs(model=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unknown model size"):
        LLM(EngineArgs(model="qwen3-7t", random_weights=True))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    llm = engine(path, max_model_len=64)
    with pytest.raises(ValueError, match="context window is 64"):
        llm.add_request(list(range(100)))
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("")
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
    out = llm.generate(["hi"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    assert_no_leak(llm)
