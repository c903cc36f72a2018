"""FP8 weights: Qwen's official FP8 checkpoints (Qwen/Qwen3-8B-FP8 and the rest) and `--quantization fp8` for
any bf16 checkpoint: weights stay float8_e4m3fn in memory (half the bytes a decode step reads). One token runs
W8A16 (the kernel widens the weights on the fly); two or more run W8A8, as the checkpoints' `activation_scheme:
dynamic` means and as vLLM and transformers run them, on the FP8 tensor cores (twice the bf16 rate).

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

Kernels (each with its PyTorch reference beside it; the measured table at FP8_GEMM_MAX_M):
  - one token: gemv.py's GEMV streams the fp8 rows (bytes: N x K x 1 + scales; the floor is those / bandwidth),
    with the RMSNorm before it, SiLU(gate) * up or the residual add after it as for bf16 (model.norm_linear,
    model.linear_add); reference `fp8_linear_ref` (dequantize, then F.linear);
  - two or more tokens: each token's activations quantized per group of 128 columns (`quantize_act_triton`:
    scale = max |x| / 448), then an FP8 x FP8 GEMM applying both scales per 128-column k step (reference
    `w8a8_linear_ref`): cuBLAS's block-scaled GEMM (torch's `scaled_mm`) on Hopper when the weight is in whole
    128 x 128 blocks; else `_fp8_gemm_kernel` (Triton): W8A16 tiles up to 16 tokens, W8A8 beyond.
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
        self.block_scales = None     # weight_scale_inv as cuBLAS's block-scaled GEMM reads them (set by `finish`)

    def forward(self, x, silu_mul: bool = False):
        """silu_mul: as model.Linear's (gate_up_proj; silu(gate) * up out, by kernels.silu_mul)."""
        y = fp8_linear(x, self.weight, self.weight_scale_inv, self.block_scales)
        return kernels.silu_mul(y) if silu_mul else y


def has_cublas_block_fp8(device) -> bool:
    """cuBLAS's block-scaled FP8 GEMM is there: torch's `scaled_mm` (2.10+) on a Hopper GPU (PyTorch allows
    its 1 x 128 / 128 x 128 recipes on SM90 only)."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
            and torch.cuda.get_device_capability(device)[0] == 9)


def finish(model):
    """After the weights are loaded: each Fp8Linear's scales in cuBLAS's block layout, where cuBLAS can run it."""
    for m in model.modules():
        if isinstance(m, Fp8Linear) and has_cublas_block_fp8(m.weight.device):
            m.block_scales = cublas_block_scales(m.weight_scale_inv, m.weight.shape[1])


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
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) of C. Program ids walk GROUP_M row tiles per column tile, so a
    column tile of W is reused from L2 by the programs running beside it."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * n_n) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * n_n)) % size_m, (pid % (GROUP_M * n_n)) // size_m


def quantize_act_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations -> (M, K) float8_e4m3fn, (M, ceil(K/128)) fp32 scales: each token's 128-column groups
    scaled so their largest magnitude maps to 448 (dynamic per-token-group quantization)."""
    M, K = x.shape
    kb = -(-K // BLOCK)
    padded = torch.zeros(M, kb * BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :K] = x.float()
    groups = padded.view(M, kb, BLOCK)                                         # (M, kb, 128)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX              # (M, kb)
    q = (groups / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, kb * BLOCK)[:, :K].contiguous(), scale


def w8a8_linear_ref(x, weight, scales):
    """What the W8A8 path computes: x quantized per token and 128 columns, times the FP8 weight, in fp32."""
    q, s = quantize_act_ref(x)
    return F.linear(dequantize(q, s, torch.float32), dequantize(weight, scales, torch.float32)).to(x.dtype)


@triton.jit(do_not_specialize=["M", "M_OUT", "stride_sm", "stride_sk"])   # token counts: one compile for all
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, M_OUT, K, stride_x, stride_sm, stride_sk, ROWS: tl.constexpr):
    # grid (cdiv(M_OUT, ROWS), KB): ROWS tokens x one 128-column group -> float8 values and one scale per token.
    # Rows M .. M_OUT-1 (padding some GEMMs want) read as zeros: values 0, a tiny scale.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    cols = kb * 128 + tl.arange(0, 128)
    out_mask = (rows < M_OUT)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0                         # (ROWS,)
    q = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=out_mask)
    tl.store(s_ptr + rows * stride_sm + kb * stride_sk, scale, mask=rows < M_OUT)


def quantize_act_triton(x, rows_multiple: int = 1, column_major: bool = False):
    """Same contract as quantize_act_ref. rows_multiple: pad the rows to a multiple of it (zeros); column_major:
    the scales laid out (KB, M) in memory, returned as the (M, KB) transposed view (what cuBLAS reads)."""
    M, K = x.shape
    KB = triton.cdiv(K, BLOCK)
    Mp = -(-M // rows_multiple) * rows_multiple
    q = torch.empty(Mp, K, dtype=FP8, device=x.device)
    s = torch.empty(KB, Mp, dtype=torch.float32, device=x.device).t() if column_major else \
        torch.empty(Mp, KB, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(triton.cdiv(Mp, 16), KB)](x, q, s, M, Mp, K, x.stride(0), s.stride(0), s.stride(1), ROWS=16,
                                                 num_warps=4)
    return q, s


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, KB, stride_c,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, A_FP8: tl.constexpr):
    # C (M, N) = A (M, K) @ W^T, W float8, in k steps of 128 (one scale group): A_FP8 (W8A8): A float8 too, and
    # acc += (A_k @ W_k^T) * a_scale[row] * w_scale[col] on the FP8 tensor cores; else (W8A16) the weight tile is
    # widened to A's dtype and acc += (A_k @ W_k^T) * w_scale[col]. fp32 accumulation either way.
    # Out-of-range rows and columns read row/column 0 (indices modulo M, N: no masks in the loop) and are not
    # stored; the last k step masks the columns past K.
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, 128)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]                 # (BM, 128)
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]                 # (128, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k_in = offs_k < K - kb * 128
        a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        w_s = tl.load(ws_ptr + offs_n * KB + kb)
        if A_FP8:
            acc += tl.dot(a, w) * tl.load(as_ptr + offs_m * KB + kb)[:, None] * w_s[None, :]
        else:
            acc += tl.dot(a, w.to(a.dtype)) * w_s[None, :]
        a_ptrs += 128
        w_ptrs += 128
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def fp8_gemm_triton(a, a_scales, weight, scales, dtype, config: dict):
    """(M, K) contiguous activations times the FP8 weight -> (M, N) in dtype: W8A8 when a is float8 with its
    (M, KB) a_scales, W8A16 when a_scales is None."""
    M, K = a.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=dtype, device=a.device)
    if M == 0:
        return out
    cfg = dict(config)
    if not a.is_cuda:
        cfg.pop("num_stages", None)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](a, a_scales, weight, scales, out, M, N, K, scales.shape[1], out.stride(0),
                           A_FP8=a_scales is not None, **cfg)
    return out


def w8a8_gemm_triton(q, s, weight, scales, dtype, config: dict | None = None):
    """(M, K) float8 activations and their (M, KB) scales times the FP8 weight -> (M, N) in dtype."""
    return fp8_gemm_triton(q, s, weight, scales, dtype, config or w8a8_config(q.shape[0]))


def w8a8_linear_triton(x, weight, scales, config: dict | None = None):
    """Same contract as w8a8_linear_ref: quantize_act_triton, then the FP8 x FP8 GEMM."""
    return w8a8_gemm_triton(*quantize_act_triton(x), weight, scales, x.dtype, config)


def cublas_block_scales(scales: torch.Tensor, in_features: int) -> torch.Tensor | None:
    """(N, KB) row scales -> (N / 128, KB rounded up to 4) block scales, whose transposed view is what cuBLAS's
    block-scaled FP8 GEMM reads (as `torch.nn.functional.scaled_mm` takes them); None where they are not whole
    128 x 128 blocks (a fused shard not on a 128-row boundary, N or K not a multiple of 128): the Triton GEMM."""
    N, KB = scales.shape
    if N % BLOCK or in_features % BLOCK or not torch.equal(scales, scales[::BLOCK].repeat_interleave(BLOCK, dim=0)):
        return None
    return F.pad(scales[::BLOCK], (0, -KB % 4)).contiguous()


def scaled_mm_cublas(x, weight, block_scales):
    """W8A8 through cuBLAS's block-scaled FP8 GEMM (Hopper, CUDA 12.9+): activations in 1 x 128 groups, the weight
    in 128 x 128 blocks; the rows padded to a multiple of 4 as it wants. The same products as _fp8_gemm_kernel's W8A8."""
    M = x.shape[0]
    q, s = quantize_act_triton(x, rows_multiple=4, column_major=True)
    return F.scaled_mm(q, weight.t(), s, F.ScalingType.BlockWise1x128, block_scales.t(),
                       F.ScalingType.BlockWise128x128, output_dtype=x.dtype)[:M]


def w8a8_config(M: int) -> dict:
    """Swept on an H200 (8b shapes, BLOCK_M 16-128 x BLOCK_N 32-256, 4-8 warps, 3-4 stages): the best or within
    5% at each size; 128-row tiles lost 15-35% everywhere."""
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=3)


# Two or more tokens, H200, bf16 activations, us per call (CUDA-graph replays over weights rotated past L2), the
# FP8 paths against cuBLAS on the bf16 weight (what the bf16 model runs). cuBLAS block: quantize_act_triton +
# torch's scaled_mm with 1 x 128 / 128 x 128 scales; Triton W8A8: the best of 4 tiles; Triton W8A16: the tiles
# above (before this table they served up to 16 tokens, and above that the weight was widened, then cuBLAS bf16):
#   shape, tokens          | bf16 cuBLAS | cuBLAS block W8A8 | Triton W8A8 | Triton W8A16
#   qkv 4096->6144,    17  |     17.4    |   17.0            |    21.3     |    40.5
#                     256  |     22.7    |   19.2 (1.18x)    |    37.6     |
#                    2048  |    151.1    |  101.0 (1.50x)    |   193.8     |
#                   16384  |   1243.0    |  771.3 (1.61x)    |  1545.0     |
#   o 4096->4096,      17  |     15.4    |   17.4 (0.89x)    |    19.0     |    41.9
#                     256  |     18.1    |   18.6 (0.98x)    |    29.3     |
#                   16384  |    818.4    |  547.9 (1.49x)    |  1027.9     |
#   gate_up 4096->24576, 17|     56.0    |   41.1 (1.36x)    |    46.1     |    98.8
#                     256  |     84.3    |   54.0 (1.56x)    |   106.0     |
#                   16384  |   5154.6    | 3070.4 (1.68x)    |  6306.0     |
#   down 12288->4096,  17  |     31.9    |   27.8 (1.15x)    |    43.7     |   115.7
#                      64  |     33.8    |   39.5 (0.86x)    |    43.7     |   119.6
#                     256  |     46.5    |   42.7 (1.09x)    |    76.4     |
#                   16384  |   2546.2    | 1633.8 (1.56x)    |  3320.9     |
# So from two tokens on cuBLAS's block-scaled GEMM runs wherever it can (Hopper, weights in whole 128 x 128
# blocks), Triton's W8A8 elsewhere (it keeps each k step's scaling inside the loop, which stalls its pipeline:
# 400-600 TFLOP/s), the W8A16 tiles only up to 16 tokens off Hopper. An earlier widen-then-cuBLAS path lost to
# the bf16 model everywhere (one more pass over the weight per call).
# One token runs gemv.py's GEMV (`gemv.linear_triton(..., scales=)`; its table at FP8_GEMV_CONFIG).
FP8_GEMM_MAX_M = 16
FP8_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4)   # W8A16, 2..16 tokens


def fp8_linear_triton(x, weight, scales, config: dict | None = None, block_scales=None):
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    if M <= 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M == 0:
            return out
        return gemv.linear_triton(x, weight, config, out=out, scales=scales)
    if block_scales is not None and config is None:      # cuBLAS's FP8 tensor-core GEMM (W8A8, table above)
        return scaled_mm_cublas(x, weight, block_scales)
    if M > FP8_GEMM_MAX_M and config is None:             # the same product in Triton (W8A8)
        return w8a8_linear_triton(x, weight, scales)
    return fp8_gemm_triton(x, None, weight, scales, x.dtype, config or FP8_GEMM_CONFIG)


def fp8_linear(x, weight, scales, block_scales=None):
    """x (M, K) @ the FP8 weight^T. block_scales: cublas_block_scales(scales), where cuBLAS runs the block format."""
    if _use_triton(x):
        return fp8_linear_triton(x, weight, scales, block_scales=block_scales)
    return fp8_linear_ref(x, weight, scales)
