"""The Qwen3 model: config, forward pass over a packed batch on a paged KV cache, checkpoint loading.

Read `Config` first, then `Qwen3ForCausalLM.forward`. Everything here is plain PyTorch; the fused ops it calls
live in kernels.py, attention in attention.py (decode) and prefill.py, the projections in gemv.py (Triton on the
GPU, their PyTorch references on the CPU).

The forward pass takes a *packed* batch: the new tokens of many sequences laid end to end (T tokens in all,
no padding), their positions, and an `AttnMeta` saying where each sequence starts, how long its context is
and where its K/V live in the paged cache. Prefill, decode and a mix of both go through the same code.

Qwen3-MoE checkpoints (model_type qwen3_moe) differ only in their MLPs: the layers `Config.is_moe_layer` names
hold a `moe.SparseMoeBlock` instead. FP8 (quant.py) swaps the `Linear` projections for `quant.Fp8Linear`.
Tensor parallelism (parallel.py) builds the same model from one rank's shard of the config; its only marks
here are the `parallel.` hooks: the vocab-parallel embedding, two all-reduces per layer, the logits' gather.

    python model.py --model qwen3-0.6b      # prints the config and parameter count of a named size
"""
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

import attention
import gemv
import kernels
import parallel
import prefill
import quant
from moe import SparseMoeBlock


@dataclass
class Config:
    """Model shape. Defaults are Qwen3-0.6B; field names follow the checkpoint's config.json."""
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8          # GQA: each K/V head serves num_attention_heads / this many q heads
    head_dim: int = 128                   # not hidden_size / heads in Qwen3 (0.6B: 16 x 128 = 2048 != 1024)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None      # YaRN's settings (kernels.yarn_inv_freq), as config.json gives them
    max_position_embeddings: int = 40960  # positions served; with YaRN original x factor, as vLLM derives it
    tie_word_embeddings: bool = True      # small sizes reuse embed_tokens as the lm_head
    eos_token_id: list[int] = field(default_factory=lambda: [151645, 151643])   # <|im_end|>, <|endoftext|>
    # Mixture of experts (Qwen3-MoE, moe.py); num_experts 0 = a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0          # k: experts each token is routed to
    moe_intermediate_size: int = 0        # each expert's SwiGLU width
    norm_topk_prob: bool = True           # renormalize the k routing weights to sum 1
    decoder_sparse_step: int = 1          # every n-th layer has experts ...
    mlp_only_layers: list[int] = field(default_factory=list)   # ... except these, which keep a dense MLP
    quantization: str | None = None       # "fp8": the checkpoint's projections are FP8 blocks (quant.py)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @staticmethod
    def from_json(path, rope_scaling: dict | None = None) -> "Config":
        """Translate a checkpoint's config.json, once, at load time (rope_scaling: in place of the file's)."""
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type", "qwen3") not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is neither qwen3 nor qwen3_moe")
        if raw.get("model_type") == "qwen3_moe":
            raw.setdefault("num_experts", raw.get("num_local_experts"))   # transformers 5 writes this name
        if raw.get("quantization_config"):
            raw["quantization"] = quant.check_config(raw["quantization_config"], path)
        stored = raw.get("rope_scaling") or raw.get("rope_parameters") or {}    # (transformers 5 writes the latter)
        kw = {f.name: raw[f.name] for f in fields(Config) if f.name in raw and raw[f.name] is not None}
        kw.setdefault("rope_theta", stored.get("rope_theta", Config.rope_theta))
        kw.update(rope_fields(stored if rope_scaling is None else rope_scaling,
                              kw.get("max_position_embeddings", Config.max_position_embeddings), path))
        if "head_dim" not in kw:
            kw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        eos = kw.get("eos_token_id", Config().eos_token_id)
        kw["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
        return Config(**kw)


def rope_fields(rope: dict, max_positions: int, where) -> dict:
    """Config's RoPE fields from a config.json's rope_scaling: plain RoPE, or YaRN (Qwen3's model card adds
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} for 131,072 tokens), which
    serves original x factor positions, as vLLM derives them. Other kinds are refused."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return {"rope_scaling": None, "max_position_embeddings": max_positions}
    if kind != "yarn" or not rope.get("factor"):
        raise ValueError(f"{where}: rope scaling {rope} is not supported (plain RoPE, or YaRN with a factor)")
    original = rope.get("original_max_position_embeddings") or max_positions
    return {"rope_scaling": {**rope, "original_max_position_embeddings": original},
            "max_position_embeddings": max(max_positions, int(original * rope["factor"]))}


# Named sizes (random weights of the real shapes, for benchmarks and smoke runs).
PRESETS = {
    "qwen3-0.6b": Config(),
    "qwen3-1.7b": Config(hidden_size=2048, intermediate_size=6144),
    "qwen3-4b": Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "qwen3-8b": Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       tie_word_embeddings=False),
    "qwen3-14b": Config(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                        tie_word_embeddings=False),
    "qwen3-32b": Config(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                        tie_word_embeddings=False),
    "qwen3-30b-a3b": Config(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                            intermediate_size=6144, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=768),
    "qwen3-235b-a22b": Config(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                              intermediate_size=12288, tie_word_embeddings=False, num_experts=128,
                              num_experts_per_tok=8, moe_intermediate_size=1536),
    # for tests and CPU smoke runs: vocab 512 covers the 256 byte-level tokens plus a few merges/specials
    "tiny": Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                   eos_token_id=[0]),
    "tiny-moe": Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, eos_token_id=[0],
                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
}


def preset(name: str) -> Config:
    key = name.lower()
    key = key if key in PRESETS else "qwen3-" + key
    if key not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; named sizes: {', '.join(PRESETS)}")
    return replace(PRESETS[key])


@dataclass
class AttnMeta:
    """Where each sequence of the packed batch lives. B = sequences, T = tokens in the batch.

    All tensors are on the model's device. Nothing here is global: it is passed down the forward pass."""
    cu_seqlens_q: torch.Tensor     # (B+1,) int32: sequence b owns packed rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
    context_lens: torch.Tensor     # (B,) int32: tokens in b's KV cache once this step's tokens are written
    block_tables: torch.Tensor     # (B, max_blocks) int32: b's cache blocks in order (unused entries: 0)
    slot_mapping: torch.Tensor     # (T,) int64: cache slot each new token's K/V is written to
    logits_indices: torch.Tensor | None   # (B_sample,) int64: packed rows whose logits are wanted (None: all)
    is_decode: bool                # every sequence has exactly one new token (decode kernel, CUDA graphs)
    max_seqlen_q: int = 1          # longest new-token run in the batch (grid size of the prefill kernel)
    shared_prefix: attention.SharedPrefix | None = None   # decode: blocks many rows share, attended once (cascade)
    # decode rows that are consecutive tokens of one sequence (speculate.forward_tokens): per row, the rows of its
    # sequence it leads (attention.row_groups; 0: another row's group holds it), attended together, up to
    # group_rows at once, so a context is read once per group. A row attends to the K/V other rows of the same
    # pass write, so all are stored before any row attends (not the fused decode kernel).
    row_groups: torch.Tensor | None = None
    group_rows: int = 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)   # (normed, x + residual)


class Linear(nn.Module):
    """A projection without bias, y = x @ weight^T, through gemv.linear (quant.Fp8Linear stands in for FP8)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x, silu_mul: bool = False):
        """silu_mul: this is gate_up_proj (gate rows first) and the output silu(gate) * up, (T, out / 2)."""
        return gemv.linear(x, self.weight, silu_mul=silu_mul)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        # q, k and v projections fused into one matmul; loading fills the three row ranges (see FUSED).
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)   # per-head norms, before RoPE (new in Qwen3)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, qkv, positions, meta: AttnMeta, kv, cos_sin):
        """qkv: (T, (n_heads + 2*n_kv) * head_dim), qkv_proj's output (DecoderLayer runs it with the norm, and
        o_proj on what this returns, with the residual add)."""
        k_cache, v_cache = kv                                     # (num_blocks, block_size, n_kv, head_dim) each
        # norm + RoPE on q and k, and k/v written into their cache slots before attention reads them
        args = (qkv, self.q_norm.weight, self.k_norm.weight, cos_sin, positions, k_cache, v_cache, meta.slot_mapping,
                self.n_heads, self.n_kv_heads, self.eps)
        scale = self.head_dim ** -0.5
        if meta.is_decode and meta.shared_prefix is None and meta.row_groups is None:   # all that and attention at once
            o = attention.decode_attention_qkv(*args, meta.block_tables, meta.context_lens, scale)
        elif meta.is_decode:
            o = attention.decode_attention(kernels.qk_norm_rope_store(*args), k_cache, v_cache, meta.block_tables,
                                           meta.context_lens, scale, shared=meta.shared_prefix,
                                           groups=meta.row_groups, rows=meta.group_rows)
        else:                                                     # q: (T, n_heads, head_dim)
            o = prefill.prefill_attention(kernels.qk_norm_rope_store(*args), k_cache, v_cache, meta.cu_seqlens_q,
                                          meta.context_lens, meta.block_tables, scale, max_seqlen_q=meta.max_seqlen_q)
        return o.reshape(qkv.shape[0], -1)                         # (T, n_heads * head_dim); DecoderLayer runs o_proj


class MLP(nn.Module):
    """The dense MLP's weights. DecoderLayer runs gate_up_proj with the norm before it and silu(gate) * up
    after it (one kernel at decode sizes, gemv.py), and down_proj with the residual add after it."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)   # gate rows first
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)


# The residual stream is carried as (x, residual), meaning x + residual (residual None: x alone), so that each
# add happens inside a kernel that runs anyway: in the projection before it (up to 16 tokens: linear_add) or in
# the norm after it (norm_linear, add_norm).
def add_norm(norm: RMSNorm, x, residual):
    """(norm(x + residual), x + residual); residual None: no add."""
    return (norm(x), x) if residual is None else norm(x, residual)


def norm_linear(norm: RMSNorm, x, residual, proj, silu_mul: bool = False):
    """(proj(norm(x + residual), silu_mul), x + residual); residual None: no add. Up to 16 tokens a plain Linear
    does both in one kernel (gemv.norm_linear), one token a quant.Fp8Linear too (the same GEMV, with its scales)."""
    scales = proj.weight_scale_inv if isinstance(proj, quant.Fp8Linear) else None
    if scales is None or gemv.one_token(x, norm.weight):
        return gemv.norm_linear(x, residual, norm.weight, norm.eps, proj.weight, silu_mul, scales)
    x, residual = add_norm(norm, x, residual)
    return proj(x, silu_mul=silu_mul), residual


def linear_add(proj, x, residual, tp: parallel.Group | None):
    """The stream after a row-parallel projection: (proj(x) + residual, None) where the GEMV or skinny GEMM adds
    it (up to 16 tokens a plain Linear, one token a quant.Fp8Linear; no TP), else (proj(x) summed over the TP
    ranks, residual)."""
    scales = proj.weight_scale_inv if isinstance(proj, quant.Fp8Linear) else None
    if tp is None and (scales is None or (residual is not None and gemv.one_token(x))):
        return gemv.linear_add(x, proj.weight, residual, scales)
    return parallel.all_reduce(proj(x), tp), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, moe: bool, tp: parallel.Group | None = None):
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                                  cfg.norm_topk_prob) if moe else MLP(cfg)

    def forward(self, x, residual, positions, meta, kv, cos_sin):
        # Each norm runs inside the projection after it (norm_linear) and each residual add inside the
        # projection before it or the norm after it (linear_add). TP: o_proj and down_proj sum over the ranks.
        qkv, residual = norm_linear(self.input_layernorm, x, residual, self.self_attn.qkv_proj)
        o = self.self_attn(qkv, positions, meta, kv, cos_sin)
        x, residual = linear_add(self.self_attn.o_proj, o, residual, self.tp)
        if isinstance(self.mlp, SparseMoeBlock):        # the router and the experts read the normed input
            x, residual = add_norm(self.post_attention_layernorm, x, residual)
            return parallel.all_reduce(self.mlp(x), self.tp), residual
        act, residual = norm_linear(self.post_attention_layernorm, x, residual, self.mlp.gate_up_proj, silu_mul=True)
        return linear_add(self.mlp.down_proj, act, residual, self.tp)               # act: silu(gate) * up


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Config, tp: parallel.Group | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_moe_layer(i), tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: Config, tp: parallel.Group | None = None):
        """tp: this process's tensor-parallel group; cfg is then the rank's shard (parallel.shard_config)."""
        super().__init__()
        self.config, self.tp = cfg, tp
        self.model = Qwen3Model(cfg, tp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE table, fp32, not a parameter: rebuilt on .to(device) via the buffer machinery
        self.register_buffer("cos_sin", kernels.rope_cos_sin(cfg.head_dim, cfg.max_position_embeddings,
                                                             cfg.rope_theta, yarn=cfg.rope_scaling), persistent=False)

    def forward(self, input_ids, positions, meta: AttnMeta, kv_cache, pending=None) -> torch.Tensor:
        """input_ids, positions: (T,); kv_cache: (num_layers, 2, num_blocks, block_size, n_kv, head_dim). pending:
        (last_tokens, gather) when input_ids hold tokens still on the device (kernels.embed_ref: decode graphs).
        Returns the final hidden states of the rows in meta.logits_indices: (B_sample, hidden)."""
        x = parallel.embed(input_ids, self.model.embed_tokens.weight, self.tp, pending)      # (T, hidden)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, meta, kv_cache[i], self.cos_sin)
        x, _ = add_norm(self.model.norm, x, residual)
        return x if meta.logits_indices is None else x[meta.logits_indices]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B_sample, vocab) logits in the model's dtype, written into `out` if given (CUDA graphs share one
        buffer). Greedy decoding takes their argmax as they are; sampling does its math in fp32."""
        if self.tp is None:
            return gemv.linear(hidden, self.lm_head.weight, out=out)
        return parallel.gather_vocab(gemv.linear(hidden, self.lm_head.weight), self.tp, out)  # (B, V/N) each


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

# Checkpoint tensors that land inside a fused parameter: name -> (fused name, which shard).
FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def shard_rows(cfg: Config, fused: str, expert: bool = False) -> list[int]:
    """Row counts of the shards of a fused weight, in shard order."""
    if fused == "qkv_proj":
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    return [cfg.moe_intermediate_size if expert else cfg.intermediate_size] * 2


def checkpoint_slot(params: dict, cfg: Config, key: str):
    """Where checkpoint tensor `key` goes: (the parameter's name, the view of it to fill), or (None, None).
    Three cases: a plain parameter; a shard of a fused one (FUSED); one expert of a stacked expert weight
    (mlp.experts.<e>.<proj>.weight -> row e of mlp.experts.gate_up_proj or mlp.experts.down_proj; FP8 scales
    .weight_scale_inv -> mlp.experts.gate_up_proj_scale_inv / down_proj_scale_inv)."""
    module, _, leaf = key.rpartition(".")             # e.g. model.layers.0.self_attn.q_proj, weight
    prefix, _, proj = module.rpartition(".")
    expert = None
    parent, _, e = prefix.rpartition(".")             # ...mlp.experts, 3
    if e.isdigit() and parent.endswith(".experts"):  # stacked: weight -> <proj>, weight_scale_inv -> <proj>_scale_inv
        suffix = {"weight": "", "weight_scale_inv": "_scale_inv"}.get(leaf)
        if suffix is None:
            return key, None
        prefix, expert, leaf = parent, int(e), suffix
    if proj in FUSED:
        fused, shard = FUSED[proj]
        name = f"{prefix}.{fused}" + (leaf if expert is not None else f".{leaf}")
        rows = shard_rows(cfg, fused, expert is not None)
        target = params.get(name)
        if target is not None:
            target = target.data if expert is None else target.data[expert]
            target = target[sum(rows[:shard]):sum(rows[:shard + 1])]
        return name, target
    if expert is not None:                            # down_proj of one expert
        name = f"{prefix}.{proj}{leaf}"
        return name, params[name].data[expert] if name in params else None
    return key, params[key].data if key in params else None


def expected_keys(model: "Qwen3ForCausalLM") -> set[str]:
    """The checkpoint keys a complete checkpoint has (fused and stacked parameters named as stored)."""
    cfg, keys = model.config, set()
    for name, p in model.named_parameters():       # a tied lm_head appears once, as embed_tokens
        module, _, leaf = name.rpartition(".")
        prefix, _, proj = module.rpartition(".")
        if ".experts." in name:                   # gate_up_proj, down_proj and FP8's *_scale_inv
            projs = ("gate_proj", "up_proj") if "gate_up_proj" in leaf else ("down_proj",)
            kind = "weight_scale_inv" if leaf.endswith("_scale_inv") else "weight"
            keys |= {f"{module}.{e}.{n}.{kind}" for e in range(cfg.num_experts) for n in projs}
        elif proj in ("qkv_proj", "gate_up_proj"):
            keys |= {f"{prefix}.{n}.{leaf}" for n, (fz, _) in FUSED.items() if fz == proj}
        else:
            keys.add(name)
    return keys


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]   # what loading reads (chat_template.jinja: the template)


def resolve_checkpoint(model: str) -> Path:
    """A local directory, or a hub id downloaded with huggingface_hub (offline: a clear error)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    hub_id = model.count("/") == 1 and not model.startswith(("/", ".", "~"))    # "./Qwen3-0.6B" is a path
    if path.exists() or not hub_id:
        raise FileNotFoundError(f"model {model!r} is neither a checkpoint directory nor a hub id like "
                                f"'Qwen/Qwen3-0.6B'; for random weights pass a named size ({', '.join(PRESETS)}) "
                                f"with --random-weights")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as e:
        raise FileNotFoundError(f"could not download {model!r} from the hub ({type(e).__name__}: {e}). Offline, "
                                f"pass a local checkpoint directory (config.json, *.safetensors, tokenizer.json) "
                                f"instead") from e


def read_tensor(st, key: str, target: torch.Tensor, tp: parallel.Group | None, kv_heads: int) -> torch.Tensor:
    """Checkpoint tensor `key` as `target` holds it: FP8 block scales widened to one per row, and under tensor
    parallelism only this rank's slice, read from the file alone (parallel.shard_slice says which)."""
    where = None if tp is None else parallel.shard_slice(key, tuple(target.shape), tp.rank, tp.size, kv_heads)
    if key.endswith(".weight_scale_inv"):                 # (ceil(N/128), ceil(K/128)) -> (N, ceil(K/128))
        t = st.get_tensor(key)
        t = quant.row_scales(t, t.shape[0] * quant.BLOCK)
        if where is not None:                             # the rank's rows, or its 128-column blocks
            t = t.narrow(where[0], where[1], target.shape[where[0]])
        return t[:target.shape[0]]
    if where is None:
        return st.get_tensor(key)
    dim, start = where
    part = st.get_slice(key)
    end = min(start + target.shape[dim], part.get_shape()[dim])   # a short read fails the shape check below
    return part[start:end] if dim == 0 else part[:, start:end]


def load_weights(model: Qwen3ForCausalLM, ckpt_dir: Path, kv_heads: int):
    """Copy every tensor of the checkpoint's safetensors files into the model (checkpoint_slot says where;
    kv_heads: the checkpoint's K/V heads, which TP ranks may share). Fails on an unknown, missing or misshapen
    tensor."""
    from safetensors import safe_open
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors files")
    filled = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():
                name, target = checkpoint_slot(params, cfg, key)
                if target is None:
                    if key == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue                               # some tied checkpoints store it anyway
                    raise KeyError(f"{f.name}: unexpected tensor {key!r} (not a Qwen3 parameter)")
                tensor = read_tensor(st, key, target, model.tp, kv_heads)
                if (target.dtype == quant.FP8) != (tensor.dtype == quant.FP8):
                    raise ValueError(f"{f.name}: {key} is {tensor.dtype}, the model expects {target.dtype} (a "
                                     f"checkpoint mixing FP8 and unquantized projections is not supported)")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"{f.name}: {key} has shape {tuple(tensor.shape)}, the config says "
                                     f"{tuple(target.shape)}")
                target.copy_(tensor)
                filled.add(key)
    missing = sorted(expected_keys(model) - filled)
    if missing:
        raise KeyError(f"{ckpt_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def load_config(model: str, random_weights: bool, rope_scaling: dict | None = None) -> tuple[Config, Path | None]:
    """(config, checkpoint dir or None): a named size's, or a checkpoint's config.json (its EOS tokens joined by
    generation_config.json's, as transformers' and vLLM's generation stop on both); rope_scaling (YaRN, as
    config.json would give it) in place of theirs."""
    if random_weights:
        cfg = preset(model)
        if rope_scaling is not None:
            cfg = replace(cfg, **rope_fields(rope_scaling, cfg.max_position_embeddings, "rope_scaling"))
        return cfg, None
    ckpt = resolve_checkpoint(model)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt}: no config.json, so this is not a Hugging Face checkpoint")
    cfg = Config.from_json(ckpt / "config.json", rope_scaling)
    gen = ckpt / "generation_config.json"     # Qwen3's instruct checkpoints list <|endoftext|> only there
    eos = (json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None) or []
    eos = [eos] if isinstance(eos, int) else eos
    return replace(cfg, eos_token_id=cfg.eos_token_id + [t for t in eos if t not in cfg.eos_token_id]), ckpt


def build_model(model: str, random_weights: bool, dtype: torch.dtype, device: torch.device, seed: int = 0,
                quantization: str | None = None, tp: parallel.Group | None = None, rope_scaling: dict | None = None):
    """Returns (model, config, checkpoint dir or None); under tensor parallelism (tp) the model is this rank's
    shard and config the whole model's. Random weights: init std 0.02, as the benchmarks use (every rank draws
    the same stream, so replicated weights agree). quantization "fp8": the projections' weights quantized to
    FP8 blocks after loading (quant.py); an FP8 checkpoint is loaded as it is stored either way. rope_scaling:
    YaRN in place of the config's (load_config)."""
    full, ckpt = load_config(model, random_weights, rope_scaling)
    cfg = full if tp is None else parallel.shard_config(full, tp.size)
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = Qwen3ForCausalLM(cfg, tp)
    m = m.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:                                # to_empty gives each module its own tensor
        m.lm_head.weight = m.model.embed_tokens.weight
    m.cos_sin = kernels.rope_cos_sin(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, device=device,
                                     yarn=cfg.rope_scaling)
    if cfg.quantization == "fp8":
        quant.to_fp8(m, shard_rows, quantize=False)                        # empty FP8 projections the checkpoint fills
    if ckpt is None:
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)
    else:
        load_weights(m, ckpt, full.num_key_value_heads)
    if quantization == "fp8" and cfg.quantization is None:
        quant.to_fp8(m, shard_rows, quantize=True)
        cfg.quantization = full.quantization = "fp8"
    if cfg.quantization == "fp8":
        quant.finish(m)
    return m.eval().requires_grad_(False), full, ckpt


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    args = ap.parse_args()
    cfg = preset(args.model) if not os.path.isdir(args.model) else Config.from_json(Path(args.model) / "config.json")
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3ForCausalLM(cfg).parameters())
    print(cfg)
    print(f"{n / 1e9:.3f} B parameters")
