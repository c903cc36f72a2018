"""The physical floors of bench.py's workloads: the time no engine can beat on this device. bench.py measures
two ceilings first (BENCH.md; bench_kernels.measure_ceilings): memory bandwidth = bytes read + written by a
device-to-device copy of 2 GiB / median time, and the bf16 matmul rate of 8192^3 `a @ b`. Every floor comes
from these two numbers and the model shape (`b` below is a bench.Bench: its config, dtype, engine args and
ceilings):

  W = weight bytes read per decode step = (each layer's q,k,v,o,gate,up,down + lm_head) x bytes per element
      (the embedding lookup reads only T rows, so a tied lm_head is counted once)
  K = KV bytes per token of context = 2 (K and V) x layers x kv_heads x head_dim x bytes per element
      (1 with --kv-cache-dtype fp8)
  F(a, b) = FLOPs to compute prompt tokens a..b-1 when the first a are cached
          = 2 x weight params x (b - a)  +  4 x layers x heads x head_dim x (a+1 + ... + b)
            (QK^T and PV: 2 FLOPs per head_dim element each, causal: token p attends to p+1 tokens)

  offline, serve, prefix: request i has a prompt of p_i tokens and o_i output tokens. Its first output token
  comes out of the prefill; each of the other o_i - 1 needs a decode step that reads the K/V of its whole
  context (p_i + j tokens at its j-th step). With every request in one batch, the batch runs max(o_i) - 1
  decode steps, each reading all the weights once. So

      floor seconds = [K x sum_i sum_{j=1}^{o_i-1} (p_i + j)  +  W x (max_i o_i - 1)] / bandwidth
                      + sum_i F(cached_i, p_i) / matmul rate,          floor tok/s = sum_i o_i / floor seconds

  qwen3-0.6b at 2.99 TB/s and 777 TFLOP/s: 15.2 TB of KV + 1.2 TB of weights (1,023 steps x 1.19 GB) + 145k
  prompt tokens (0.24 s) = 5.72 s -> 25,200 output tok/s, as BENCH.md says. (prefix: the shared prefix
  computed once, F(0, 2000) + 64 x F(2000, 2100), and its K/V read once per decode step for the whole batch;
  serve: the offline formula over the N requests of a level.)
  MoE models (qwen3-30b-a3b, qwen3-235b-a22b): W of a step counts only the experts its running requests are
  routed to (experts_read: k for one token, nearly all for 256), and F counts the active parameters (k experts).
  decode-1: W / bandwidth per token (0.40 ms for 0.6b). prefill: F(0, 2048) per prompt at the matmul rate.

With --tensor-parallel-size N the floors use N x the ceilings measured on one device (N GPUs' bandwidth and
matmul rate together).
"""
from model import Config


def projection_params(cfg: Config) -> int:
    """The attention projections of every layer and the dense MLPs (what FP8 quantizes)."""
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    attn = H * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    return L * attn + sum(not cfg.is_moe_layer(i) for i in range(L)) * 3 * H * cfg.intermediate_size


def weight_params(cfg: Config, experts: float | None = None) -> float:
    """Parameters read per decode step: every layer's matrices and the lm_head (norms are negligible). A MoE
    layer reads its router and only the experts some token was routed to: `experts` of them (default k, what
    one token reads); the same count with k is a prefill token's active parameters."""
    H = cfg.hidden_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    e = cfg.num_experts_per_tok if experts is None else experts
    moe = moe_layers * (cfg.num_experts * H + e * 3 * H * cfg.moe_intermediate_size)
    return projection_params(cfg) + moe + cfg.vocab_size * H


def weight_bytes(cfg: Config, nbytes: int, experts: float | None = None) -> float:
    """Bytes of weight_params(cfg, experts): FP8 projections and experts (quant.py) read 1 byte per weight plus a
    4-byte scale per 128, the rest nbytes."""
    if cfg.quantization != "fp8":
        return weight_params(cfg, experts) * nbytes
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    e = cfg.num_experts_per_tok if experts is None else experts
    fp8 = projection_params(cfg) + moe_layers * e * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return weight_params(cfg, experts) * nbytes - fp8 * (nbytes - 1 - 4 / 128)


def experts_read(cfg: Config, batch: int) -> float:
    """Distinct experts a decode step of `batch` tokens reads per MoE layer when routing is uniform (as random
    weights route): E x (1 - (1 - k/E)^batch). One token: exactly k; 256 tokens: nearly all of them."""
    if not cfg.num_experts:
        return 0.0
    return cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch)


def prompt_flops(cfg: Config, a: int, b: int) -> int:
    """F(a, b): FLOPs to compute prompt tokens a..b-1 with the first a cached (the docstring above)."""
    attn_pairs = (b * (b + 1) - a * (a + 1)) // 2
    return 2 * weight_params(cfg) * (b - a) + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * attn_pairs


def kv_bytes_per_token(b) -> int:
    """K: the K/V bytes of one token of context, all layers (1 byte per element with --kv-cache-dtype fp8)."""
    kv_nbytes = 1 if b.eargs.kv_cache_dtype == "fp8" else b.dtype.itemsize
    return 2 * b.cfg.num_hidden_layers * b.cfg.num_key_value_heads * b.cfg.head_dim * kv_nbytes


def floor(b, prompt_lens: list[int], out_lens: list[int], computed: list[tuple[int, int]] | None = None,
          shared_prefix: int = 0) -> dict:
    """The floor of requests run as one batch (the docstring above). computed: the (a, b) prompt spans that
    must be computed, default every prompt in full. shared_prefix: leading tokens every request shares, whose
    K/V a decode step need read from memory only once for the whole batch."""
    nbytes = b.dtype.itemsize
    K = kv_bytes_per_token(b)
    kv = K * sum((o - 1) * p + o * (o - 1) // 2 for p, o in zip(prompt_lens, out_lens))
    kv -= K * shared_prefix * (sum(out_lens) - len(out_lens) - (max(out_lens) - 1))
    # decode step j (1 .. max o - 1) runs the requests with o_i > j; dense: the same weights every step
    running = [sum(o > j for o in out_lens) for j in range(1, max(out_lens))] if b.cfg.num_experts else []
    weights = (sum(weight_bytes(b.cfg, nbytes, experts_read(b.cfg, n)) for n in running) if running else
               weight_bytes(b.cfg, nbytes) * (max(out_lens) - 1))
    flops = sum(prompt_flops(b.cfg, lo, hi) for lo, hi in (computed or [(0, p) for p in prompt_lens]))
    seconds = (kv + weights) / b.bandwidth + flops / b.matmul
    return {"tok_s": sum(out_lens) / seconds, "seconds": seconds, "kv_bytes": kv, "weight_bytes": weights,
            "prompt_flops": flops}
