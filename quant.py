"""FP8 weights: Qwen's official FP8 checkpoints (Qwen/Qwen3-8B-FP8 and the rest) and `--quantization fp8` for
any bf16 checkpoint, run as W8A16: weights stay float8_e4m3fn in memory (half the bytes a decode step reads),
the kernels widen them to the activations' dtype on the fly and multiply there.

    python sample.py --model ./Qwen3-8B-FP8 --prompt hi                     # quantization_config: read as is
    python bench.py decode-1 offline --model qwen3-8b --quantization fp8    # bf16 weights quantized at load

The format (the checkpoint's `quantization_config`: quant_method fp8, fmt e4m3, weight_block_size [128, 128],
activation_scheme dynamic): every quantized projection stores `weight` (N, K) in float8_e4m3fn and
`weight_scale_inv` (ceil(N/128), ceil(K/128)) in float32; the real weight is each value times the scale of its
128 x 128 block. Embeddings, norms, the lm_head and the MoE router stay in the model's dtype.

What this file replaces in model.py: `model.Linear` modules of the attention (qkv_proj, o_proj) and the dense MLP
(gate_up_proj, down_proj) become `Fp8Linear`, whose `weight_scale_inv` holds one scale per *row* and 128-column
block, (N, ceil(K/128)): q, k and v (and gate and up) are fused into one matrix whose shards need not start on a
128-row boundary, so each row carries its own shard's block scale. That costs 4 bytes per 128 weights (3%).
MoE experts (Qwen3-30B-A3B-FP8 and the like) are stacked per layer: `experts_to_fp8` makes their two weights
float8 with the same per-row scales, and moe.py's kernels read them.

Kernels (Triton, each with `fp8_linear_ref` as the reference: dequantize, then F.linear):
  - one token: a GEMV that streams fp8 rows (bytes: N x K x 1 + scales; the floor is those / bandwidth);
  - a few tokens: a tiled GEMM on the tensor cores, BLOCK_K = 128 so each k step has one scale per column;
  - many tokens: the weight widened once by a dequantize kernel, then cuBLAS (measured table at FP8_GEMM_MAX_M).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import gemv
import kernels
from kernels import _use_triton, tl, triton

BLOCK = 128                                   # the checkpoints' block size along both dims
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                               # largest finite e4m3fn value


def check_config(qc: dict, where) -> str:
    """A checkpoint's quantization_config -> 'fp8', or a clear error for what is not supported."""
    if qc.get("quant_method") != "fp8":
        raise ValueError(f"{where}: quantization {qc.get('quant_method')!r} is not supported (fp8 only)")
    if qc.get("fmt", "e4m3") != "e4m3" or list(qc.get("weight_block_size") or [BLOCK, BLOCK]) != [BLOCK, BLOCK]:
        raise ValueError(f"{where}: fp8 with fmt {qc.get('fmt')!r} and blocks {qc.get('weight_block_size')} is not "
                         f"supported (e4m3, [128, 128] only)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{where}: fp8 activation_scheme {qc.get('activation_scheme')!r}: only dynamic is supported")
    return "fp8"


# ----------------------------------------------------------------------------------------------------------
# The block format
# ----------------------------------------------------------------------------------------------------------

def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (N, K) float8_e4m3fn values, (ceil(N/128), ceil(K/128)) fp32 scales: each 128 x 128 block
    scaled so its largest magnitude maps to 448 (what the official FP8 checkpoints store)."""
    N, K = w.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.float()
    blocks = padded.view(nb, BLOCK, kb, BLOCK)                               # (nb, 128, kb, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX        # (nb, kb)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * BLOCK, kb * BLOCK)[:N, :K].contiguous(), scale


def row_scales(block_scales: torch.Tensor, rows: int) -> torch.Tensor:
    """(ceil(N/128), kb) block scales -> (N, kb): each row gets its block's."""
    return block_scales.repeat_interleave(BLOCK, dim=0)[:rows]


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp8 and (N, ceil(K/128)) row scales -> (N, K) in dtype."""
    K = q.shape[1]
    return (q.float() * scales.repeat_interleave(BLOCK, dim=1)[:, :K]).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------

class Fp8Linear(nn.Module):
    """model.Linear with float8 weights; the checkpoint names (weight, weight_scale_inv) are kept."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(out_features, -(-in_features // BLOCK), device=device),
                                             requires_grad=False)

    def forward(self, x, silu_mul: bool = False):
        if silu_mul:
            x = kernels.silu_mul(x)
        return fp8_linear(x, self.weight, self.weight_scale_inv)


def projections(model, shard_rows):
    """(parent module, attribute, shard row counts or None) of every projection FP8 replaces; shard_rows is
    model.shard_rows, the fused layout's owner."""
    for layer in model.model.layers:
        yield layer.self_attn, "qkv_proj", shard_rows(model.config, "qkv_proj")
        yield layer.self_attn, "o_proj", None
        if hasattr(layer.mlp, "gate_up_proj"):                 # a dense MLP (MoE experts stay as they are)
            yield layer.mlp, "gate_up_proj", shard_rows(model.config, "gate_up_proj")
            yield layer.mlp, "down_proj", None


def quantize_rows(w: torch.Tensor, shards: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> FP8 values and (N, ceil(K/128)) row scales, each shard of rows (q, k, v) quantized on its own."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(w.shape[0], -(-w.shape[1] // BLOCK), device=w.device)
    start = 0
    for rows in shards:
        q[start:start + rows], blocks = quantize_blocks(w[start:start + rows])
        s[start:start + rows] = row_scales(blocks, rows)
        start += rows
    return q, s


def experts_to_fp8(experts, quantize: bool):
    """A moe.Experts' stacked weights (E, N, K) to FP8 with (E, N, ceil(K/128)) scales: quantized from what it
    holds (gate and up on their own) or empty, for an FP8 checkpoint to fill."""
    for name, shards in (("gate_up_proj", 2), ("down_proj", 1)):
        w = getattr(experts, name).data
        E, N, K = w.shape
        q = torch.empty(E, N, K, dtype=FP8, device=w.device)
        s = torch.empty(E, N, -(-K // BLOCK), device=w.device)
        if quantize:
            for e in range(E):
                q[e], s[e] = quantize_rows(w[e], [N // shards] * shards)
        setattr(experts, name, nn.Parameter(q, requires_grad=False))
        setattr(experts, name + "_scale_inv", nn.Parameter(s, requires_grad=False))


def to_fp8(model, shard_rows, quantize: bool):
    """Swap the projections for Fp8Linear and the MoE experts for FP8 ones. quantize: from the weights they hold
    (each checkpoint shard, e.g. q, k, v, quantized on its own, as an FP8 checkpoint stores it); else empty, for
    an FP8 checkpoint to fill."""
    for parent, name, shards in projections(model, shard_rows):
        lin = getattr(parent, name)
        N, K = lin.weight.shape
        new = Fp8Linear(K, N, device=lin.weight.device)
        if quantize:
            new.weight.data, new.weight_scale_inv.data = quantize_rows(lin.weight.data, shards or [N])
        setattr(parent, name, new)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            experts_to_fp8(layer.mlp.experts, quantize)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

def fp8_linear_ref(x, weight, scales):
    """x (M, K) @ dequantize(weight)^T -> (M, N) in x's dtype."""
    return F.linear(x, dequantize(weight, scales, x.dtype))


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, KB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One token: out[n] = sum_k x[k] * w[n, k] * s[n, k // 128]. Program = BLOCK_N rows streamed in BLOCK_K
    # chunks (a multiple of 128): one scale per row and 128-column block is loaded and broadcast over its block.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    NB: tl.constexpr = BLOCK_K // 128
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        blocks = k0 // 128 + tl.arange(0, NB)
        s = tl.load(s_ptr + rows[:, None] * KB + blocks[None, :], mask=row_mask[:, None] & (blocks < KB)[None, :],
                    other=0.0)                                                          # (BLOCK_N, NB)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NB, 128)), (BLOCK_N, BLOCK_K))
        acc += w * s * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _fp8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, KB, BLOCK_N: tl.constexpr):
    # (BLOCK_N rows, one 128-column block) per program: fp8 x its scale -> out's dtype
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    s = tl.load(s_ptr + rows * KB + kb, mask=rows < N, other=0.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s[:, None]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(weight, scales, dtype):
    N, K = weight.shape
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    _fp8_dequant_kernel[(triton.cdiv(N, 32), scales.shape[1])](weight, scales, out, N, K, scales.shape[1], BLOCK_N=32)
    return out


@triton.jit
def _fp8_gemm_kernel(a_ptr, w_ptr, s_ptr, c_ptr, M, N, K, KB, stride_a, stride_c,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Several tokens: C (M, N) = A (M, K) @ W^T, k steps of 128 (one scale block): acc += (A_k @ W_k^T) * s_k
    # with s_k the scales of the tile's columns. The weight tile is widened to A's dtype for the tensor cores.
    # Program ids walk GROUP_M row tiles per column tile, so a column tile of W is reused from L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a + offs_k[None, :]           # (BM, 128)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]                  # (128, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k_in = offs_k < K - kb * 128
        a = tl.load(a_ptrs, mask=(offs_m < M)[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & (offs_n < N)[None, :], other=0.0).to(a.dtype)
        s = tl.load(s_ptr + offs_n * KB + kb, mask=offs_n < N, other=0.0)
        acc += tl.dot(a, w) * s[None, :]
        a_ptrs += 128
        w_ptrs += 128
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# H200, bf16 activations, 8b shapes (ms; bench.py kernels), Triton tiles vs cuBLAS on the bf16 weight:
#                     | M=16: triton / cuBLAS bf16 | M=256: triton / cuBLAS bf16 | M=8192: triton / cuBLAS bf16
#  qkv 4096->6144     |     0.026 / 0.017          |     0.088 / 0.023           |     1.93 / 0.59
#  gate_up 4096->24576|     0.046 / 0.056          |     0.256 / 0.082           |     7.47 / 2.40
#  down 12288->4096   |     0.073 / 0.032          |     0.253 / 0.046           |     3.84 / 1.13
# The tiled kernel widens each weight tile in registers on its way to the tensor cores and loses to cuBLAS from
# a few rows on, so above FP8_GEMM_MAX_M rows the weight is widened once (one pass: 1 byte read, 2 written)
# and cuBLAS runs; FP8 tensor-core GEMMs with quantized activations (W8A8) are what would win there.
# One token, swept on an H200 (BLOCK_N 2-16, BLOCK_K 256-1024, 4-8 warps), us: qkv 13.0-13.4, gate_up 35.8-38.5,
# down 22.3-25.3 for the best four each; 4 x 512 x 4 warps is within 8% of the best on all three.
FP8_GEMV_CONFIG = dict(BLOCK_N=4, BLOCK_K=512, num_warps=4)
FP8_GEMM_MAX_M = 16


def fp8_gemm_config(M: int) -> dict:
    if M <= 64:
        return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_linear_triton(x, weight, scales, config: dict | None = None):
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if M == 1:
        cfg = dict(config or FP8_GEMV_CONFIG)
        _fp8_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, weight, scales, out, N, K, scales.shape[1], **cfg)
        return out
    if M > FP8_GEMM_MAX_M and config is None:     # compute-bound: widen once, then cuBLAS (table above)
        return gemv.linear_ref(x, dequantize_triton(weight, scales, x.dtype))
    cfg = dict(config or fp8_gemm_config(M))
    if not x.is_cuda:
        cfg.pop("num_stages", None)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](x, weight, scales, out, M, N, K, scales.shape[1], x.stride(0), out.stride(0), **cfg)
    return out


def fp8_linear(x, weight, scales):
    return fp8_linear_triton(x, weight, scales) if _use_triton(x) else fp8_linear_ref(x, weight, scales)
