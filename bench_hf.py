"""HF transformers beside the engine in bench.py: the peer's speed on the same workloads, and the accuracy mode.

    python bench.py offline decode-1 prefill --peer hf      # the peer columns of the table
    python bench.py accuracy                                # top-1 agreement and logit error against fp32

Nothing here imports bench.py: it hands in the shape, the workloads' token ids and a timer.
"""
import inspect
import statistics
import tempfile
import time
from dataclasses import fields, replace

import torch

from engine import LLM
from model import AttnMeta, Config


def import_transformers():
    """transformers, or a clear error where its import fails on this repo's kernels.py: transformers 5.25 requires
    the `kernels` package and imports it, and the repo's own kernels.py shadows that name here."""
    try:
        import transformers
        transformers.Qwen3ForCausalLM              # (lazy: the model code is where `kernels` is imported)
    except ImportError as e:
        if "kernels" in str(e):
            raise SystemExit(f"transformers could not be imported ({e}): versions from 5.25 import the `kernels` "
                             "package, which this repo's kernels.py shadows; pip install 'transformers<5.25'") from e
        raise
    return transformers


def hf_model(cfg: Config, device, dtype):
    """transformers' Qwen3ForCausalLM of the engine's shape (Config's field names are config.json's), random init
    (std 0.02): with EOS ignored, weight values do not change throughput."""
    transformers = import_transformers()
    shape = {f.name: getattr(cfg, f.name) for f in fields(Config) if f.name != "eos_token_id"}
    hc = transformers.Qwen3Config(**shape, initializer_range=0.02, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hc)
    return model.to(dtype).eval()


def decode1(model, ids: torch.Tensor, n_tokens: int) -> tuple[float, str]:
    """`generate` with a static cache; ms/token from the streamer's per-token timestamps, prefill excluded."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):                   # first call: the prompt; then one per new token
            value.cpu()                          # wait for the GPU, so the time is the token's
            self.t.append(time.perf_counter())

        def end(self):
            pass
    gc_ = GenerationConfig(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                           cache_implementation="static", pad_token_id=0)
    for _ in range(2):                           # the first run compiles
        s = Stamps()
        with torch.inference_mode():
            model.generate(ids, generation_config=gc_, streamer=s)
    ms = 1e3 * (s.t[-1] - s.t[1]) / (len(s.t) - 2)
    return 1e3 / ms, f"HF generate, static cache: {ms:.2f} ms/token"


def prefill(model, ids: torch.Tensor, timer) -> tuple[float, str]:
    """One plain forward of the batch, logits of the last position only (as the engine computes).
    timer(fn) -> seconds (bench.py's median over a few runs)."""
    with torch.inference_mode():
        t = timer(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False))
    return ids.numel() / t, "HF forward"


def offline(model, prompts: list[list[int]], outs: list[int], sync) -> tuple[float, str]:
    """`generate_batch` (continuous batching, paged cache); one max_new_tokens for all: the mean output length."""
    from transformers import GenerationConfig
    n_out = round(statistics.mean(outs))
    gc_ = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=None, pad_token_id=0)
    kw = {"progress_bar": True} if "progress_bar" in inspect.signature(model.generate_batch).parameters else {}
    sync()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gc_, **kw)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.generated_tokens) for r in results.values())
    if tokens == 0:
        raise RuntimeError("generate_batch returned no tokens (its log says why)")
    return tokens / seconds, (f"HF generate_batch: {len(prompts)} reqs, {tokens:,} of {len(prompts) * n_out:,} tok "
                              f"in {seconds:.1f} s")


def accuracy(cfg: Config, eargs, device, dtype, n_prompts: int, length: int) -> dict:
    """Next-token top-1 agreement and logit error against transformers computing in fp32, on one checkpoint:
    random weights of cfg's shape (std 0.02) saved in dtype with save_pretrained; n_prompts random prompts of
    `length` tokens, one prefill each. Variants: our engine in dtype; with an FP8 KV cache (a prefill reads its
    own K/V back from the cache, so the rounding shows); with FP8 weights (--quantization fp8; dense models);
    and transformers in dtype, the peer: how far apart two correct implementations at that precision are.
    "clear" positions: the reference's top-2 margin exceeds twice the variant's max logit error (no rounding
    of that size could flip the top-1). The FP8 peers (dense models, where accelerate is installed, which
    transformers asks for to load FP8): the same weights written in Qwen's FP8 format (fp8_checkpoint), loaded by
    transformers with FineGrainedFP8Config(dequantize=True), i.e. the FP8 weights in the run's dtype (W8A16), and
    (on a GPU) as FP8 modules running W8A8 like ours. transformers' FP8 matmul comes from a hub kernel
    (kernels-community/finegrained-fp8), outside this project's dependencies and unreachable offline: that peer
    runs w8a8_standin in its place (fp8_peer)."""
    transformers = import_transformers()
    hf_cfg = transformers.Qwen3Config(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
        "tie_word_embeddings")}, initializer_range=0.02)
    prompts = torch.randint(0, cfg.vocab_size, (n_prompts, length), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        hf = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype)
        hf.save_pretrained(d)
        hf = hf.float().to(device).eval()                       # the reference: the saved weights, fp32 math
        refs = [hf(ids[None].to(device)).logits[0].float().cpu() for ids in prompts]
        del hf

        def score(logits_of) -> dict:
            outs = [logits_of(ids.to(device)).float().cpu() for ids in prompts]
            worst = max((o - r).abs().max().item() for o, r in zip(outs, refs))
            same = [o.argmax(-1) == r.argmax(-1) for o, r in zip(outs, refs)]
            top2 = [r.topk(2, dim=-1).values for r in refs]
            clear = [(t[:, 0] - t[:, 1]) > 2 * worst for t in top2]
            n, n_clear = n_prompts * length, sum(m.sum().item() for m in clear)
            return {"top1_agreement": sum(x.sum().item() for x in same) / n, "max_abs_logit_diff": worst,
                    "mean_abs_logit_diff": sum((o - r).abs().mean().item() for o, r in zip(outs, refs)) / n_prompts,
                    "clear_positions": n_clear,
                    "top1_agreement_clear": sum(x[m].sum().item() for x, m in zip(same, clear)) / max(n_clear, 1)}

        name = str(dtype).removeprefix("torch.")
        res = {}
        peer = transformers.Qwen3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        res[f"transformers {name} (peer)"] = score(lambda ids: peer(ids[None]).logits[0])
        del peer
        variants = {f"ours {name}": {}, f"ours {name}, FP8 KV cache": {"kv_cache_dtype": "fp8"}}
        if not cfg.num_experts:
            variants[f"ours {name}, FP8 weights"] = {"quantization": "fp8"}
            peers = {"dequantized at load": True}
            if torch.device(device).type == "cuda":           # transformers runs FP8 modules on a GPU only
                peers["W8A8, torch stand-in kernel"] = False
            for how, dequantize in peers.items():
                peer8 = fp8_peer(d, dtype, dequantize, device)
                if peer8 is not None:
                    res[f"transformers {name}, FP8 checkpoint {how} (peer)"] = score(
                        lambda ids: peer8(ids[None]).logits[0])
                    del peer8
        plain = dict(model=d, random_weights=False, cuda_graphs=False, quantization=None, kv_cache_dtype="auto",
                     tensor_parallel_size=1, speculative_method=None, speculative_model=None,
                     num_blocks=length // eargs.block_size + 8)
        for label, kw in variants.items():
            llm = LLM(replace(eargs, **{**plain, **kw}))
            bs = llm.args.block_size
            meta = AttnMeta(torch.tensor([0, length], dtype=torch.int32, device=device),
                            torch.tensor([length], dtype=torch.int32, device=device),
                            torch.arange(1, length // bs + 1, dtype=torch.int32, device=device)[None],
                            torch.arange(bs, bs + length, device=device), torch.arange(length, device=device),
                            is_decode=False, max_seqlen_q=length)
            res[label] = score(lambda ids: llm.model.compute_logits(
                llm.model(ids, torch.arange(length, device=device), meta, llm.kv_cache)))
            del llm
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return res


FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def fp8_layout(tensors: dict) -> dict:
    """Checkpoint tensors in Qwen's FP8 layout: each projection's weight (experts' too) as float8_e4m3fn with its
    weight_scale_inv per 128 x 128 block (quant.quantize_blocks, the blocks --quantization fp8 makes at load),
    everything else as it was."""
    import quant
    out = {}
    for key, t in tensors.items():
        if key.endswith(".weight") and key.split(".")[-2] in FP8_PROJECTIONS:
            out[key], out[key + "_scale_inv"] = quant.quantize_blocks(t)
        else:
            out[key] = t.contiguous()
    return out


def fp8_checkpoint(src: str, dst: str):
    """A checkpoint (safetensors, one or many files) rewritten in Qwen's FP8 format (fp8_layout, one file);
    config.json gains the quantization_config."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    tensors = {k: t for f in sorted(Path(src).glob("*.safetensors")) for k, t in load_file(f).items()}
    save_file(fp8_layout(tensors), str(Path(dst) / "model.safetensors"))
    cfg = json.loads((Path(src) / "config.json").read_text())
    (Path(dst) / "config.json").write_text(json.dumps({**cfg, "quantization_config": FP8_CONFIG}))


def fp8_peer(src: str, dtype, dequantize: bool, device):
    """transformers' model of src's weights in FP8 (fp8_checkpoint) on `device`; None (and a line on stderr)
    without accelerate. dequantize: FineGrainedFP8Config(dequantize=True), the FP8 weights in the run's dtype
    (W8A16). Else (a GPU) its FP8Linear modules as loaded, W8A8: their matmul, a hub kernel that cannot be
    fetched here, replaced by w8a8_standin (DeepGEMM, the other backend, is turned off)."""
    import sys

    transformers = import_transformers()
    try:
        import accelerate  # noqa: F401  (transformers wants it to load an FP8 checkpoint at all)
    except ImportError:
        print("accuracy: no transformers FP8 peer (it needs the optional package accelerate)", file=sys.stderr)
        return None
    if not dequantize:
        from transformers.integrations import finegrained_fp8 as hf8
        hf8._FINEGRAINED_FP8 = hf8.FineGrainedFP8(matmul=w8a8_standin, batched_matmul=None, grouped_matmul=None)
        hf8.FP8Linear._deepgemm_disabled = True
    with tempfile.TemporaryDirectory() as d8:
        fp8_checkpoint(src, d8)
        qc = transformers.FineGrainedFP8Config(dequantize=dequantize)
        return transformers.Qwen3ForCausalLM.from_pretrained(d8, dtype=dtype, quantization_config=qc,
                                                             device_map=str(device)).eval()


def w8a8_standin(x, weight, weight_scale_inv, block_size, out_dtype, activation_scale=None):
    """The scheme of transformers' FP8 matmul kernel (kernels-community/finegrained-fp8), written in torch for
    the accuracy peer: the activations quantized per token and block_size[1] columns (dynamic: each group's
    largest magnitude maps to 448, the e4m3 maximum), the weight dequantized by its block scales, the product in
    fp32. Not our quant.py: an independent reading of the same scheme."""
    assert activation_scale is None, "static activation scales are not used by Qwen's FP8 checkpoints"
    bn, bk = block_size
    (N, K), lead = weight.shape, x.shape[:-1]
    assert K % bk == 0, "Qwen3's projections are whole 128-column blocks deep"
    a = x.reshape(-1, K).float()
    g = a.view(a.shape[0], K // bk, bk)                                      # (M, K/bk, bk)
    s = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
    a = ((g / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s).view(-1, K)
    w = weight.float() * weight_scale_inv.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (a @ w.t()).to(out_dtype).view(*lead, N)
