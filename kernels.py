"""The fused kernels of the forward pass: one PyTorch reference per op, plus a Triton kernel where it wins.

Every op here has the same three neighbours:
  - `<op>_ref`: the plain PyTorch version. It is the definition of the op, the CPU path and the fallback.
  - a Triton kernel and its launcher (added in the Triton section below).
  - `<op>`: the dispatcher the model calls. It picks Triton or PyTorch by device and size.

Set QWEN3_KERNELS=torch or QWEN3_KERNELS=triton to force one path (tests and debugging); the default, auto,
uses the measured thresholds written next to each dispatcher. On the CPU the PyTorch path always runs
unless TRITON_INTERPRET=1 and QWEN3_KERNELS=triton (that is how the tests run the Triton kernels on a CPU).

The ops: embed (with the previous step's tokens still on the device), rms_norm, add_rms_norm, silu_mul,
qk_norm_rope_store (q/k norm + RoPE + K/V into the cache), argmax (greedy decoding's token); the
projections (GEMV, skinny GEMM) are in gemv.py, paged attention in attention.py (both built on this file's
helpers: `_use_triton`, `pdl`). The decode chain's kernels use programmatic dependent launch on Hopper (`pdl`;
QWEN3_PDL=0 turns it off); `pdl_pair` is two empty such launches that a decode replay needs after it.

KV cache layout (per layer): k_cache, v_cache of shape (num_blocks, block_size, n_kv_heads, head_dim), in
the activations' dtype or float8_e4m3fn (--kv-cache-dtype fp8: values stored as they are, no scale, widened
to the activations' dtype as attention loads them).
A cache *slot* is block_id * block_size + offset_in_block. Block 0 is never handed to a sequence: padded
rows of a CUDA-graph batch point at it, so kernels may read/write it freely.
"""
import functools
import math
import os
import types

import torch
import torch.nn.functional as F


def kernel_mode() -> str:
    """'auto', 'torch' or 'triton' (read each call so tests can flip it with monkeypatch.setenv)."""
    mode = os.environ.get("QWEN3_KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"QWEN3_KERNELS must be auto, torch or triton, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------------

def resolve_pending(ids: torch.Tensor, last_tokens: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """ids with each negative one (scheduler.PENDING: a token the previous step sampled, still on the device)
    replaced by last_tokens[gather[row]] (the decode graphs' fixed-shape inputs)."""
    return torch.where(ids < 0, last_tokens[gather], ids)


def embed_ref(ids: torch.Tensor, weight: torch.Tensor, last_tokens=None, gather=None) -> torch.Tensor:
    """weight[ids]: (T, hidden); with last_tokens, PENDING ids first resolved (resolve_pending)."""
    return F.embedding(ids if last_tokens is None else resolve_pending(ids, last_tokens, gather), weight)


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) int64: each row's first index of its maximum (greedy decoding)."""
    return x.argmax(-1)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, in fp32, cast back before the weight multiply (as HF Qwen3 does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual = x + residual; return (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2*I) -> (T, I): silu(gate) * up, gate the first half (the gate_up_proj layout)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, device=None,
                 yarn: dict | None = None) -> torch.Tensor:
    """(max_positions, head_dim) fp32 table: cos in the first half of each row, sin in the second. yarn: the
    checkpoint's rope_scaling for YaRN: its frequencies (yarn_inv_freq), and cos and sin times its attention factor
    (so q . k is scaled by its square), as transformers applies them. The kernels only read the table."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    scale = 1.0
    if yarn is not None:
        inv_freq, scale = yarn_inv_freq(inv_freq, theta, yarn)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return (torch.cat([angles.cos(), angles.sin()], dim=-1) * scale).float()


def yarn_inv_freq(inv_freq: torch.Tensor, theta: float, yarn: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071; Qwen3's way past 32,768 tokens), as transformers computes it: a frequency that turns
    more than beta_fast times over the original context is kept, one that turns fewer than beta_slow times is
    divided by the factor (positions interpolated), a linear ramp over the dimensions between. Returns the new
    frequencies and the attention factor (0.1 ln(factor) + 1 unless the config gives one)."""
    dim, factor, original = 2 * inv_freq.numel(), yarn["factor"], yarn["original_max_position_embeddings"]
    dim_of = lambda turns: dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))   # a dimension
    low, high = dim_of(yarn.get("beta_fast") or 32), dim_of(yarn.get("beta_slow") or 1)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype, device=inv_freq.device) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)                 # 0: keep, 1: interpolate
    mscale = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
    scale = yarn.get("attention_factor") or (mscale(yarn["mscale"]) / mscale(yarn["mscale_all_dim"])
                                            if yarn.get("mscale") and yarn.get("mscale_all_dim") else mscale(1))
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp, scale


def apply_rope_ref(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: (T, n_heads, head_dim); cos_sin: (T, head_dim) rows of the table. Rotate-half (GPT-NeoX) style."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]    # (T, 1, head_dim/2)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def qk_norm_rope_store_ref(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping,
                           n_heads: int, n_kv_heads: int, eps: float) -> torch.Tensor:
    """Split the packed qkv projection, RMSNorm q and k per head, rotate them, write k and v into their
    cache slots, and return q.

    qkv: (T, (n_heads + 2*n_kv_heads) * head_dim); positions, slot_mapping: (T,) int.
    Returns q: (T, n_heads, head_dim).
    """
    T = qkv.shape[0]
    head_dim = q_norm_w.shape[0]
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q = rms_norm_ref(q.reshape(T, n_heads, head_dim), q_norm_w, eps)       # (T, n_heads, head_dim)
    k = rms_norm_ref(k.reshape(T, n_kv_heads, head_dim), k_norm_w, eps)    # (T, n_kv_heads, head_dim)
    cs = cos_sin[positions]                                                 # (T, head_dim)
    q, k = apply_rope_ref(q, cs), apply_rope_ref(k, cs)
    slots = slot_mapping.long()
    store_kv_ref(k_cache, slots, k)
    store_kv_ref(v_cache, slots, v.reshape(T, n_kv_heads, head_dim))
    return q


def store_kv_ref(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor):
    """x (T, n_kv, hd) into cache slots, in the cache's dtype (torch has no index_copy for float8: its bytes)."""
    flat, x = cache.view(-1, *cache.shape[2:]), x.to(cache.dtype)
    if cache.dtype.itemsize == 1:
        flat, x = flat.view(torch.uint8), x.view(torch.uint8)
    flat.index_copy_(0, slots, x)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Each kernel is written for the GPU's memory system first: the elementwise/norm ops read and write every byte
# once, so the floor is bytes / bandwidth. The arithmetic beside each kernel is what bench_kernels.py divides by
# the measured ceilings.
# ----------------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # not installed, or installed but unusable: the dispatchers then always take the references
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)     # just enough for the decorators below to be defined
    tl = types.SimpleNamespace(constexpr=None)

HAS_GDC = HAS_TRITON and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")  # Triton >= 3.3
# What a kernel boundary costs (H200, 2026-12-04, scratch): 168 kernels that each load, reduce and store 512 floats
# per program, chained in a CUDA graph, us per kernel at 1 / 132 / 264 / 528 / 1,056 programs: 0.96 / 1.55 / 1.65 /
# 1.84 / 2.14 plain, 0.64 / 1.04 / 1.06 / 1.22 / 1.70 with PDL. One persistent kernel doing the same 168 steps with
# a grid-wide barrier between them (an atomic counter): 1.04 / 1.33 / 1.65 us per step at 1 / 132 / 264 programs.
# A decode step of ~170 kernels (qwen3-0.6b) pays ~180 us in boundaries; a megakernel whose steps wait on grid
# barriers would pay more, so its gain can only come from finer dependencies and weights streamed ahead.


def pdl(x: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch (Hopper and later): the decode step's kernels start
    while the one before them finishes, each doing what does not depend on it (the GEMV's first weight chunk)
    before `gdc_wait`. A kernel given these must wait before it reads what an earlier kernel wrote. {} off the
    GPU (the interpreter has no such thing) and with QWEN3_PDL=0. H200, `bench.py decode-1`, off -> on in one
    run: qwen3-0.6b 0.92 -> 0.85 ms/token, qwen3-8b 4.84 -> 4.68 ms/token, greedy tokens identical."""
    if not x.is_cuda or os.environ.get("QWEN3_PDL", "1") == "0" or _sm_major(x.device) < 9 or not HAS_GDC:
        return {}
    return dict(USE_GDC=True, launch_pdl=True)


@functools.lru_cache
def _sm_major(device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.lru_cache
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@triton.jit
def _embed_kernel(ids_ptr, last_ptr, gather_ptr, w_ptr, out_ptr, H, PENDING: tl.constexpr, BLOCK: tl.constexpr,
                  USE_GDC: tl.constexpr = False):
    # One program per row: one weight row read, one written. PENDING: ids < 0 take last_tokens[gather[row]].
    if USE_GDC:                                        # last_tokens: written by the previous step's sampler
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    tok = tl.load(ids_ptr + row)
    if PENDING:
        tok = tl.where(tok < 0, tl.load(last_ptr + tl.load(gather_ptr + row)), tok)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    tl.store(out_ptr + row * H + cols, tl.load(w_ptr + tok.to(tl.int64) * H + cols, mask=mask), mask=mask)


def embed_triton(ids, weight, last_tokens=None, gather=None):
    """ids (T,) int64, weight (V, H) contiguous -> (T, H); last_tokens, gather as in embed_ref."""
    (T,), H = ids.shape, weight.shape[1]
    assert weight.is_contiguous() and ids.is_contiguous() and ids.dtype == torch.int64
    assert last_tokens is None or last_tokens.is_contiguous() and gather.is_contiguous()
    out = torch.empty(T, H, dtype=weight.dtype, device=weight.device)
    pending = last_tokens is not None
    BLOCK = triton.next_power_of_2(H)
    _embed_kernel[(T,)](ids, last_tokens if pending else ids, gather if pending else ids, weight, out, H,
                        PENDING=pending, BLOCK=BLOCK, num_warps=min(8, max(1, BLOCK // 1024)), **pdl(weight))
    return out


@triton.jit
def _first_max(v, idx, BIG):
    """(max of v, smallest idx where v is the max): torch.argmax's tie rule (sample.py's kernels use it too)."""
    m = tl.max(v, axis=0)
    return m, tl.min(tl.where(v == m, idx, BIG), axis=0)


@triton.jit
def _argmax_chunk_kernel(x_ptr, stride, V, cmax_ptr, carg_ptr, NCHUNK, CHUNK: tl.constexpr,
                         USE_GDC: tl.constexpr = False):
    # grid (B, NCHUNK): each chunk's max and where; bytes: the logits, read once.
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row, c = tl.program_id(0), tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m, arg = _first_max(x, offs, V)
    tl.store(cmax_ptr + row * NCHUNK + c, m)
    tl.store(carg_ptr + row * NCHUNK + c, tl.minimum(arg, V - 1))      # a NaN matches nothing: still a token id


@triton.jit
def _argmax_row_kernel(cmax_ptr, carg_ptr, out_ptr, NCHUNK, BLOCK_C: tl.constexpr, USE_GDC: tl.constexpr = False):
    # grid (B,): the first chunk holding the row's max; its argmax is the row's (chunks are in index order).
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    m = tl.load(cmax_ptr + row * NCHUNK + c, mask=c < NCHUNK, other=float("-inf"))
    _, first = _first_max(m, c, BLOCK_C)
    tl.store(out_ptr + row, tl.load(carg_ptr + row * NCHUNK + tl.minimum(first, NCHUNK - 1)).to(tl.int64))


@triton.jit
def _tick_kernel(x_ptr, USE_GDC: tl.constexpr = False):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def pdl_pair(x: torch.Tensor):
    """Two one-program kernels, the second launched dependent on the first (`pdl`), eagerly on the stream; x: one
    int32 counter they bump. Without an eager dependent launch between replays, a decode graph's kernels start
    ~0.3 us later each (H200, 2026-12-04, qwen3-0.6b, profiled gaps between its skinny GEMMs: 0.45 against 0.13
    us): sampled steps, whose sampler runs inside the graph, took 1,040 us at batch 8 and 1,524 at 32 against
    greedy's 980 and 1,413, whose eager argmax is two such launches; greedy with its argmax launched without
    `pdl` took 1,031 and 1,513. Token values, the sampler's kernels, a host sync between steps and one dependent
    launch alone (of 1 or 152 programs) changed nothing; two of them, before or after the replay, do it (sampled
    990 and 1,430). Measured, not explained: the driver's handling of a stream that chains launches.
    HISTORY.md, thirty-fourth session. The engine calls it after a decode graph of 2+ rows that greedy's argmax does not
    follow (one row's GEMVs chain by PDL themselves: there it only cost, decode-1 sampled 1,562 against 1,578
    tok/s). Nothing off Hopper, with QWEN3_PDL=0, or on the CPU."""
    kw = pdl(x)
    if kw:
        _tick_kernel[(1,)](x, **kw)
        _tick_kernel[(1,)](x, **kw)


ARGMAX_CHUNK = 4096    # Qwen3's vocabulary in 38 chunks: enough programs to read one row at bandwidth


def argmax_triton(x):
    """x (B, V), rows contiguous -> (B,) int64, as argmax_ref (a row with NaNs gets some token id, not torch's)."""
    B, V = x.shape
    assert x.stride(1) == 1
    nchunk = triton.cdiv(V, ARGMAX_CHUNK)
    cmax = torch.empty(B, nchunk, dtype=torch.float32, device=x.device)
    carg = torch.empty(B, nchunk, dtype=torch.int32, device=x.device)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    _argmax_chunk_kernel[(B, nchunk)](x, x.stride(0), V, cmax, carg, nchunk, CHUNK=ARGMAX_CHUNK, num_warps=4,
                                      **pdl(x))
    _argmax_row_kernel[(B,)](cmax, carg, out, nchunk, BLOCK_C=triton.next_power_of_2(nchunk), num_warps=1, **pdl(x))
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    # One program per row; the row (N <= BLOCK elements) stays in registers between the sum and the scale.
    # Bytes: rms_norm reads x and writes out (2*N*elt per row); add_rms_norm also reads residual and writes the
    # new residual (4*N*elt). FLOPs are ~4 per element: far under the matmul rate, so bandwidth is the floor.
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * N + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)      # rounded once to the input dtype, as torch's add
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x32 * rstd).to(x.dtype).to(tl.float32) * w                 # cast back before the weight, as rms_norm_ref
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, residual=None):
    """x, residual: (..., N) contiguous; weight: (N,). Returns out, or (out, x + residual) when given one."""
    N = x.shape[-1]
    assert x.is_contiguous() and weight.shape == (N,) and weight.is_contiguous(), "want contiguous (..., N) and (N,)"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    BLOCK = triton.next_power_of_2(N)
    _rms_norm_kernel[(x.numel() // N,)](x, residual, weight, out, res_out, N, eps, HAS_RESIDUAL=residual is not None,
                                        BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 512)), **pdl(x))
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, I, BLOCK: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)). Bytes: reads 2*I and writes I elements per row; bandwidth is the floor.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)          # torch rounds silu(gate) before the multiply
    tl.store(out_ptr + row * I + cols, (act * up).to(dtype), mask=mask)


def silu_mul_triton(gate_up):
    """gate_up: (..., 2*I) contiguous -> (..., I)."""
    assert gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0
    I = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    _silu_mul_kernel[(gate_up.numel() // (2 * I), triton.cdiv(I, BLOCK))](gate_up, out, I, BLOCK=BLOCK, num_warps=4)
    return out


@triton.jit
def _norm_w(w_ptr, HEAD_DIM: tl.constexpr):
    """A q/k norm weight at each element and at its rotation partner (same offset in the other half), fp32. Like
    _cos_sin's, nothing a kernel writes: a kernel may load it before it waits for the one before it (`pdl`)."""
    d = tl.arange(0, HEAD_DIM)
    return tl.load(w_ptr + d).to(tl.float32), tl.load(w_ptr + (d + HEAD_DIM // 2) % HEAD_DIM).to(tl.float32)


@triton.jit
def _cos_sin(cs_ptr, HEAD_DIM: tl.constexpr):
    """The cos and sin of a token's position at each element (cs_ptr: its row of the rope_cos_sin table)."""
    d = tl.arange(0, HEAD_DIM) % (HEAD_DIM // 2)
    return tl.load(cs_ptr + d), tl.load(cs_ptr + HEAD_DIM // 2 + d)


@triton.jit
def _load_heads(row_ptr, heads, mask, HEAD_DIM: tl.constexpr):
    """Heads `heads` (BLOCK_H,) of one token's row, each HEAD_DIM wide (rows off `mask` read as 0), and each
    element's rotation partner, loaded a second time (from L1) so that the tile stays whole: (x, xp)."""
    d = tl.arange(0, HEAD_DIM)
    at = row_ptr + heads[:, None] * HEAD_DIM
    x = tl.load(at + d[None, :], mask=mask[:, None], other=0.0)                      # (BLOCK_H, HEAD_DIM)
    return x, tl.load(at + ((d + HEAD_DIM // 2) % HEAD_DIM)[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _rope_heads(x, xp, w, wp, cos, sin, eps, HEAD_DIM: tl.constexpr):
    """RMSNorm then rotate-half RoPE of loaded heads (_load_heads): (BLOCK_H, HEAD_DIM) fp32. w, wp: _norm_w's."""
    d = tl.arange(0, HEAD_DIM)
    xf, xp32 = x.to(tl.float32), xp.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)[:, None]
    # the roundings of qk_norm_rope_store_ref: normalized -> dtype, times weight -> dtype, rotate in fp32
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w[None, :]).to(x.dtype).to(tl.float32)
    yp = ((xp32 * rstd).to(x.dtype).to(tl.float32) * wp[None, :]).to(x.dtype).to(tl.float32)
    sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)[None, :]
    return y * cos[None, :] + sign * yp * sin[None, :]                 # x1 cos - x2 sin | x2 cos + x1 sin


@triton.jit
def _norm_rope(row_ptr, heads, mask, w_ptr, cs_ptr, eps, HEAD_DIM: tl.constexpr):
    """RMSNorm then rotate-half RoPE on heads `heads` (BLOCK_H,) of one token's row (rows off `mask` read as 0):
    (BLOCK_H, HEAD_DIM) fp32. cs_ptr: the token position's row of the rope_cos_sin table."""
    x, xp = _load_heads(row_ptr, heads, mask, HEAD_DIM)
    w, wp = _norm_w(w_ptr, HEAD_DIM)
    cos, sin = _cos_sin(cs_ptr, HEAD_DIM)
    return _rope_heads(x, xp, w, wp, cos, sin, eps, HEAD_DIM)


@triton.jit
def _store_kv(k, v, heads, mask, slot, k_cache_ptr, v_cache_ptr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K (normed and rotated, fp32) and V (as loaded) of kv heads `heads` (those on `mask`) of one token into cache
    slot `slot`, in the cache's dtype."""
    d = tl.arange(0, HEAD_DIM)
    off = slot.to(tl.int64) * N_KV * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :]   # (BLOCK_H, HEAD_DIM)
    # k rounded to the model's dtype first, as the reference's rotated k is: an FP8 cache then gets the same bytes
    # (rounding fp32 straight to e4m3 put some values one e4m3 step from the reference's: double rounding)
    tl.store(k_cache_ptr + off, k.to(v.dtype).to(k_cache_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(v_cache_ptr + off, v.to(v_cache_ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _store_new_kv(row_ptr, heads, mask, k_norm_w_ptr, cs_ptr, slot, k_cache_ptr, v_cache_ptr, eps,
                  N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K (normed, rotated) and V of kv heads `heads` (those on `mask`) of one token's qkv row into cache slot
    `slot`, in the cache's dtype."""
    d = tl.arange(0, HEAD_DIM)
    k = _norm_rope(row_ptr + N_HEADS * HEAD_DIM, heads, mask, k_norm_w_ptr, cs_ptr, eps, HEAD_DIM)
    v = tl.load(row_ptr + (N_HEADS + N_KV) * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None])
    _store_kv(k, v, heads, mask, slot, k_cache_ptr, v_cache_ptr, N_KV, HEAD_DIM)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qkv_stride, q_norm_w_ptr, k_norm_w_ptr, cos_sin_ptr, positions_ptr,
                               slot_mapping_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, eps,
                               N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, USE_GDC: tl.constexpr = False):
    # One program per token: its whole qkv row, (N_HEADS + 2*N_KV) * HEAD_DIM elements, is read once; q comes
    # out normed+rotated, k normed+rotated into its cache slot, v copied into its slot. Bytes per token:
    # (N_HEADS + 2*N_KV) * HEAD_DIM * elt read and as many written, plus one HEAD_DIM fp32 cos/sin row.
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + t * qkv_stride
    cs = cos_sin_ptr + tl.load(positions_ptr + t) * HEAD_DIM
    h = tl.arange(0, BLOCK_H)                                                # q heads
    q = _norm_rope(row, h, h < N_HEADS, q_norm_w_ptr, cs, eps, HEAD_DIM)
    d = tl.arange(0, HEAD_DIM)
    tl.store(q_out_ptr + t * N_HEADS * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :],
             q.to(q_out_ptr.dtype.element_ty), mask=(h < N_HEADS)[:, None])
    h = tl.arange(0, BLOCK_KV)                                               # kv heads
    _store_new_kv(row, h, h < N_KV, k_norm_w_ptr, cs, tl.load(slot_mapping_ptr + t), k_cache_ptr, v_cache_ptr,
                  eps, N_HEADS, N_KV, HEAD_DIM)


def qk_norm_rope_store_triton(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping,
                              n_heads: int, n_kv_heads: int, eps: float) -> torch.Tensor:
    """Same contract as qk_norm_rope_store_ref; returns q: (T, n_heads, head_dim)."""
    T, hd = qkv.shape[0], q_norm_w.shape[0]
    assert qkv.dim() == 2 and qkv.shape[1] == (n_heads + 2 * n_kv_heads) * hd and qkv.stride(1) == 1
    assert hd >= 2 and hd & (hd - 1) == 0, "head_dim must be a power of two"
    assert q_norm_w.dtype == k_norm_w.dtype == qkv.dtype, "norm weights must have the activations' dtype"
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == hd and cos_sin.is_contiguous()
    assert k_cache.shape[2:] == (n_kv_heads, hd) and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert positions.shape == slot_mapping.shape == (T,)
    q = torch.empty(T, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    _qk_norm_rope_store_kernel[(T,)](qkv, qkv.stride(0), q_norm_w, k_norm_w, cos_sin, positions, slot_mapping, q,
                                     k_cache, v_cache, eps, N_HEADS=n_heads, N_KV=n_kv_heads, HEAD_DIM=hd,
                                     BLOCK_H=triton.next_power_of_2(n_heads),
                                     BLOCK_KV=triton.next_power_of_2(n_kv_heads), num_warps=4, **pdl(qkv))
    return q


# ----------------------------------------------------------------------------------------------------------
# Dispatchers: what model.py calls
# ----------------------------------------------------------------------------------------------------------

def _use_triton(x: torch.Tensor) -> bool:
    """Triton when forced, or (auto) for CUDA tensors; never when Triton is missing.

    The tables below are GPU times in ms, Triton vs the PyTorch reference, on an H100 in bf16 (bench_kernels.py:
    CUDA-graph replays on inputs not in L2). Triton wins from the smallest size measured, one row, so auto has
    no size threshold on CUDA; on the CPU the references run (Triton needs a GPU there, or the interpreter)."""
    mode = kernel_mode()
    if not HAS_TRITON or mode == "torch":
        return False
    return mode == "triton" or x.is_cuda


def embed(ids, weight, last_tokens=None, gather=None):
    f = embed_triton if _use_triton(weight) else embed_ref
    return f(ids, weight, last_tokens, gather)


def argmax(x):
    return argmax_triton(x) if _use_triton(x) else argmax_ref(x)


# rows x 4096 |   1    |   16   |  128   |  1024  | 16384
# triton      | 0.0020 | 0.0024 | 0.0030 | 0.0073 | 0.0922
# torch       | 0.0151 | 0.0238 | 0.0265 | 0.0643 | 1.0144
def rms_norm(x, weight, eps):
    return rms_norm_triton(x, weight, eps) if _use_triton(x) else rms_norm_ref(x, weight, eps)


# rows x 4096 |   1    |   16   |  128   |  1024  | 16384
# triton      | 0.0020 | 0.0026 | 0.0036 | 0.0125 | 0.1821
# torch       | 0.0128 | 0.0249 | 0.0282 | 0.0698 | 1.1480
def add_rms_norm(x, residual, weight, eps):
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps, residual=residual)
    return add_rms_norm_ref(x, residual, weight, eps)


# rows x 2x12288 |   1    |   16   |  128   |  1024  | 16384
# triton         | 0.0020 | 0.0024 | 0.0053 | 0.0282 | 0.4232
# torch          | 0.0040 | 0.0079 | 0.0137 | 0.0765 | 1.1248
def silu_mul(gate_up):
    return silu_mul_triton(gate_up) if _use_triton(gate_up) else silu_mul_ref(gate_up)


# tokens, 32/8 heads x 128 |   1    |   16   |  128   |  1024  | 16384
# triton                   | 0.0039 | 0.0043 | 0.0052 | 0.0118 | 0.1476
# torch                    | 0.0765 | 0.0857 | 0.0939 | 0.2153 | 3.1213
def qk_norm_rope_store(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping,
                       n_heads, n_kv_heads, eps):
    f = qk_norm_rope_store_triton if _use_triton(qkv) else qk_norm_rope_store_ref
    return f(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping, n_heads, n_kv_heads, eps)
