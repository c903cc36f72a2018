"""The fused kernels of the forward pass: one PyTorch reference per op, plus a Triton kernel where it wins.

Every op here has the same three neighbours:
  - `<op>_ref`: the plain PyTorch version. It is the definition of the op, the CPU path and the fallback.
  - a Triton kernel and its launcher (added in the Triton section below).
  - `<op>`: the dispatcher the model calls. It picks Triton or PyTorch by device and size.

Set QWEN3_KERNELS=torch or QWEN3_KERNELS=triton to force one path (tests and debugging); the default, auto,
uses the measured thresholds written next to each dispatcher. On the CPU the PyTorch path always runs
unless TRITON_INTERPRET=1 and QWEN3_KERNELS=triton (that is how the tests run the Triton kernels on a CPU).

The ops: rms_norm, add_rms_norm, silu_mul, qk_norm_rope_store (q/k norm + RoPE + K/V into the cache),
decode_attention and prefill_attention (paged); the projections (GEMV, skinny GEMM) are in gemv.py.
The decode chain's kernels use programmatic dependent launch on Hopper (`pdl`; QWEN3_PDL=0 turns it off).
decode_attention also does cascade attention: when many sequences share leading cache blocks (prefix
caching), plan_shared_prefix picks a shared prefix and the kernel reads its K/V once for all of them.

KV cache layout (per layer): k_cache, v_cache of shape (num_blocks, block_size, n_kv_heads, head_dim), in
the activations' dtype or float8_e4m3fn (--kv-cache-dtype fp8: values stored as they are, no scale, widened
to the activations' dtype as attention loads them).
A cache *slot* is block_id * block_size + offset_in_block. Block 0 is never handed to a sequence: padded
rows of a CUDA-graph batch point at it, so kernels may read/write it freely.
"""
import functools
import os
import types
from typing import NamedTuple

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


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, device=None) -> torch.Tensor:
    """(max_positions, head_dim) fp32 table: cos in the first half of each row, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


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


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, n_kv, hd), block_table (..., M) -> (..., M*block_size, n_kv, hd)."""
    g = cache[block_table.long()]                            # (..., M, block_size, n_kv, hd)
    return g.flatten(-4, -3)                                 # (..., M*block_size, n_kv, hd)


def decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence. q: (B, n_heads, hd); block_tables: (B, M); context_lens: (B,).
    Vectorised with a mask (no host sync), so it can be captured in a CUDA graph. Returns (B, n_heads, hd)."""
    B, n_heads, hd = q.shape
    k = gather_kv_ref(k_cache, block_tables).float()         # (B, S, n_kv, hd), S = M*block_size
    v = gather_kv_ref(v_cache, block_tables).float()
    n_kv = k.shape[2]
    qg = q.float().view(B, n_kv, n_heads // n_kv, hd)        # (B, n_kv, group, hd)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k) * scale  # (B, n_kv, group, S)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]   # (B, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", scores.softmax(-1), v)
    return out.reshape(B, n_heads, hd).to(q.dtype)


class SharedPrefix(NamedTuple):
    """A decode batch's shared prefix: leading cache blocks that several sequences hold in common (prefix
    caching shares them). Cascade attention reads them once for all those sequences instead of once each.
    Device tensors, built on the device by plan_shared_prefix, so a CUDA graph can compute and use them."""
    ref_row: torch.Tensor       # (1,) int32: a batch row whose block table starts with the prefix's blocks
    prefix_len: torch.Tensor    # (1,) int32: prefix tokens (whole blocks; 0: no prefix this step)
    shared_lens: torch.Tensor   # (B,) int32: prefix_len for the rows that share it, else 0


def plan_shared_prefix(block_tables, context_lens, block_size: int) -> SharedPrefix:
    """Pick the prefix to attend once: among rows that start with the most common first block, the length P
    (in blocks) that saves the most block reads, P x (rows sharing >= P blocks - 1). Only whole blocks before a
    row's newest token count (this step writes that one). Tensor ops only: no host sync."""
    B = block_tables.shape[0]
    full = (context_lens - 1) // block_size                  # (B,) blocks wholly before each row's newest token
    first = block_tables[:, 0]
    votes = ((first[:, None] == first[None, :]) & (full[None, :] > 0)).sum(1) * (full > 0)   # (B,)
    ref = votes.argmax().view(1)
    same = (block_tables == block_tables.index_select(0, ref)).int().cumprod(1).sum(1)    # (B,) blocks in common
    shared = torch.minimum(torch.minimum(same, full), full.index_select(0, ref))
    s = shared.sort(descending=True).values
    saved = s * torch.arange(B, device=s.device)             # prefix s[k]: rows 0..k read it once, not k+1 times
    best = saved.argmax().view(1)
    blocks = torch.where(saved.index_select(0, best) > 0, s.index_select(0, best), 0)   # (1,)
    shared_lens = torch.where(shared >= blocks, blocks * block_size, 0).to(torch.int32)
    return SharedPrefix(ref.to(torch.int32), (blocks * block_size).to(torch.int32), shared_lens)


def prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale: float) -> torch.Tensor:
    """Variable-length causal attention over the paged cache. q: (T, n_heads, hd) packed, sequence b owns
    rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its K/V (context_lens[b] tokens, cached prefix included) are
    already in the cache. Query i of sequence b sits at position context_lens[b] - q_len_b + i.
    Loops over sequences with host-side lengths (one sync; prefill only, never the decode graph)."""
    out = torch.empty_like(q)
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    starts, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        s, e = starts[b], starts[b + 1]
        n_blocks = -(-ctx // k_cache.shape[1])
        k = gather_kv_ref(k_cache, block_tables[b, :n_blocks])[:ctx].to(q.dtype)     # (ctx, n_kv, hd)
        v = gather_kv_ref(v_cache, block_tables[b, :n_blocks])[:ctx].to(q.dtype)
        k = k.repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)  # (n_heads, ctx, hd)
        v = v.repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)
        qb = q[s:e].transpose(0, 1)                                       # (n_heads, q_len, hd)
        # bottom-right aligned causal mask: query i sees keys 0 .. ctx - q_len + i
        q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]   # (q_len, ctx)
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Each kernel is written for the GPU's memory system first: the elementwise/norm ops read and write every byte
# once (the floor is bytes / bandwidth), decode attention streams the KV cache once (same floor), and prefill
# attention is a flash-attention loop on the tensor cores (the floor is FLOPs / matmul rate). The arithmetic
# beside each kernel is what bench_kernels.py divides by the measured ceilings.
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


LOG2E = 1.4426950408889634   # the attention kernels use exp2: exp(x) = exp2(x * log2(e)), folded into the scale


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
def _norm_rope(x1, x2, w_ptr, cos, sin, eps, HEAD_DIM: tl.constexpr):
    """RMSNorm then rotate-half RoPE on a tile of heads, given as its two halves x1, x2: (BLOCK_H, HEAD_DIM/2)."""
    d = tl.arange(0, HEAD_DIM // 2)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HEAD_DIM // 2 + d).to(tl.float32)[None, :]
    # the roundings of qk_norm_rope_store_ref: normalized -> dtype, times weight -> dtype, rotate in fp32
    y1 = ((x1f * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
    y2 = ((x2f * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    return y1 * cos - y2 * sin, y2 * cos + y1 * sin


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
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)
    pos = tl.load(positions_ptr + t)
    slot = tl.load(slot_mapping_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + d)[None, :]               # (1, HALF)
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HALF + d)[None, :]
    row = qkv_ptr + t * qkv_stride

    h = tl.arange(0, BLOCK_H)[:, None]                                       # q heads
    hmask = h < N_HEADS
    q1 = tl.load(row + h * HEAD_DIM + d[None, :], mask=hmask, other=0.0)     # (BLOCK_H, HALF)
    q2 = tl.load(row + h * HEAD_DIM + HALF + d[None, :], mask=hmask, other=0.0)
    q1, q2 = _norm_rope(q1, q2, q_norm_w_ptr, cos, sin, eps, HEAD_DIM)
    q_out = q_out_ptr + t * N_HEADS * HEAD_DIM + h * HEAD_DIM + d[None, :]
    tl.store(q_out, q1.to(q_out_ptr.dtype.element_ty), mask=hmask)
    tl.store(q_out + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=hmask)

    h = tl.arange(0, BLOCK_KV)[:, None]                                      # kv heads
    hmask = h < N_KV
    k_row = row + N_HEADS * HEAD_DIM + h * HEAD_DIM + d[None, :]
    k1, k2 = _norm_rope(tl.load(k_row, mask=hmask, other=0.0), tl.load(k_row + HALF, mask=hmask, other=0.0),
                        k_norm_w_ptr, cos, sin, eps, HEAD_DIM)
    cache_off = slot * N_KV * HEAD_DIM + h * HEAD_DIM + d[None, :]          # (BLOCK_KV, HALF)
    tl.store(k_cache_ptr + cache_off, k1.to(k_cache_ptr.dtype.element_ty), mask=hmask)
    tl.store(k_cache_ptr + cache_off + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=hmask)
    v_row = row + (N_HEADS + N_KV) * HEAD_DIM + h * HEAD_DIM + d[None, :]
    v_dtype = v_cache_ptr.dtype.element_ty
    tl.store(v_cache_ptr + cache_off, tl.load(v_row, mask=hmask).to(v_dtype), mask=hmask)
    tl.store(v_cache_ptr + cache_off + HALF, tl.load(v_row + HALF, mask=hmask).to(v_dtype), mask=hmask)


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


@triton.jit
def _widen(x, cache_ptr, q_ptr):
    """Attention over an FP8 cache multiplies q and the loaded K/V in fp16 when q is 16-bit (e4m3 widens to fp16
    in one instruction, to bf16 through several), in fp32 when q is; other caches: x as it is."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:     # decided at compile time; one return (the compiler's rule)
        if q_ptr.dtype.element_ty == tl.float32:
            x = x.to(tl.float32)
        else:
            x = x.to(tl.float16)
    return x


@triton.jit
def _kv_offsets(block_table_row_ptr, offs_n, in_range, kv_head, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
    """Element offsets of tokens offs_n (BLOCK_N,) of one sequence, one kv head, in the paged cache."""
    block_id = tl.load(block_table_row_ptr + offs_n // BLOCK_SIZE, mask=in_range, other=0)
    slot = block_id.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
    return slot[:, None] * (N_KV * HEAD_DIM) + kv_head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _decode_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr, shared_lens_ptr,
                  out_ptr, part_o_ptr, part_lse_ptr, qk_scale, b, kv_head, split, num_splits, num_slots,
                  N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SHARED: tl.constexpr):
    """One program of decode attention: sequence b, one kv head, one slice of the context. A sequence's
    tokens first .. ctx-1 are cut into num_splits slices of whole BLOCK_N tiles; first is 0, or with SHARED
    the length of the shared prefix that _shared_prefix_slice attends to for it.
    All GROUP q heads of the kv head ride along as the rows of one (BLOCK_G, HEAD_DIM) tile (padded to the
    16 rows tl.dot needs), so each K/V tile is read once for the whole group.
    Bytes: context_len * N_KV * HEAD_DIM * elt * 2 (K and V) per sequence, read once; q, out are noise.
    FLOPs: 4 * context_len * N_HEADS * HEAD_DIM, ~GROUP/elt per byte: bandwidth is the floor."""
    GROUP: tl.constexpr = N_HEADS // N_KV
    ctx = tl.load(context_lens_ptr + b)
    first = 0
    if SHARED:
        first = tl.load(shared_lens_ptr + b)
    partition = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * partition
    end = tl.minimum(start + partition, ctx)        # slices past the context do no work and write lse = -inf

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g                                                          # (BLOCK_G,)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * N_HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :],
                mask=g[:, None] < GROUP, other=0.0)                                      # (BLOCK_G, HEAD_DIM)
    q = _widen(q, k_cache_ptr, q_ptr)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)     # running max of the scores (log2 units)
    l_i = tl.zeros((BLOCK_G,), tl.float32)                    # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        kv_off = _kv_offsets(bt_row, offs_n, in_range, kv_head, N_KV, HEAD_DIM, BLOCK_SIZE)   # (BLOCK_N, HEAD_DIM)
        k = _widen(tl.load(k_cache_ptr + kv_off, mask=in_range[:, None], other=0.0), k_cache_ptr, q_ptr)
        v = _widen(tl.load(v_cache_ptr + kv_off, mask=in_range[:, None], other=0.0), k_cache_ptr, q_ptr)
        s = tl.dot(q, tl.trans(k)) * qk_scale                                            # (BLOCK_G, BLOCK_N)
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    row = b.to(tl.int64) * N_HEADS + heads                                               # (BLOCK_G,) rows of (B*H)
    gmask = g < GROUP
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:   # partial result of this slice: normalized output and its log2-sum-exp2, merged by the reduce kernel
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(part_o_ptr + (row[:, None] * num_slots + split) * HEAD_DIM + d[None, :], acc / l_safe[:, None],
                 mask=gmask[:, None])
        tl.store(part_lse_ptr + row * num_slots + split, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")),
                 mask=gmask)


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr,
                             out_ptr, part_o_ptr, part_lse_ptr, qk_scale, num_splits,
                             N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             SPLIT: tl.constexpr, USE_GDC: tl.constexpr = False):
    # grid (B, N_KV, num_splits): one _decode_slice each
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    _decode_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr, context_lens_ptr,
                  out_ptr, part_o_ptr, part_lse_ptr, qk_scale, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                  num_splits, num_splits, N_HEADS, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_G, BLOCK_N, SPLIT, SHARED=False)


@triton.jit
def _shared_prefix_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, ref_row_ptr, prefix_len_ptr,
                         shared_lens_ptr, part_o_ptr, part_lse_ptr, qk_scale, B, kv_head, chunk, tile, num_chunks,
                         num_slots, first_slot, N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cascade attention's first level: the prefix_len tokens that many sequences share (the blocks of row
    ref_row's table) are cut into num_chunks slices, and one program attends slice `chunk` for BLOCK_M query
    rows, each a (sequence, q head of this kv head) pair: a prefill tile whose queries come from different
    sequences (_prefill_tiles, below). The prefix's K/V are read once per step instead of once per sequence.
    Each slice's partial result goes to slot first_slot + chunk; rows with shared_lens == 0 get lse = -inf."""
    GROUP: tl.constexpr = N_HEADS // N_KV
    prefix_len = tl.load(prefix_len_ptr)
    chunk_len = tl.cdiv(tl.cdiv(prefix_len, num_chunks), BLOCK_N) * BLOCK_N
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, prefix_len)     # no prefix, or a slice past it: no work, lse = -inf
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    live = r < B * GROUP
    row = (r // GROUP).to(tl.int64) * N_HEADS + kv_head * GROUP + r % GROUP     # (BLOCK_M,) rows of (B*H)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)   # (BLOCK_M, HEAD_DIM)
    q = _widen(q, k_cache_ptr, q_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    bt_row = block_tables_ptr + tl.load(ref_row_ptr).to(tl.int64) * bt_stride
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, r, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end,
                                   qk_scale, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL=False, RAGGED=True)
    takes = tl.load(shared_lens_ptr + r // GROUP, mask=live, other=0) > 0
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    slot = row * num_slots + first_slot + chunk
    tl.store(part_o_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=live[:, None])
    tl.store(part_lse_ptr + slot, tl.where(takes & (l_i > 0), m_i + tl.log2(l_safe), float("-inf")), mask=live)


@triton.jit
def _cascade_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr,
                              ref_row_ptr, prefix_len_ptr, shared_lens_ptr, part_o_ptr, part_lse_ptr, qk_scale, B,
                              num_splits, num_chunks, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    # grid (N_KV * num_chunks * q_tiles + B * N_KV * num_splits,): the shared prefix's slices first (the longer
    # programs), then every row's own tokens, in one launch so the two kinds run side by side. Both write
    # partial results (slots: the row's num_splits slices, then the prefix's num_chunks); the reduce merges.
    pid = tl.program_id(0)
    num_slots = num_splits + num_chunks
    n_prefix = N_KV * num_chunks * tl.cdiv(B * (N_HEADS // N_KV), BLOCK_M)
    if pid < n_prefix:
        _shared_prefix_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, ref_row_ptr,
                             prefix_len_ptr, shared_lens_ptr, part_o_ptr, part_lse_ptr, qk_scale, B, pid % N_KV,
                             (pid // N_KV) % num_chunks, pid // (N_KV * num_chunks), num_chunks, num_slots,
                             num_splits, N_HEADS, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N)
    else:
        p = pid - n_prefix
        _decode_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr,
                      shared_lens_ptr, q_ptr, part_o_ptr, part_lse_ptr, qk_scale, p // (N_KV * num_splits),
                      (p // num_splits) % N_KV, p % num_splits, num_splits, num_slots, N_HEADS, N_KV, HEAD_DIM,
                      BLOCK_SIZE, BLOCK_G, BLOCK_N, SPLIT=True, SHARED=True)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, out_ptr, num_slots, HEAD_DIM: tl.constexpr,
                          BLOCK_S: tl.constexpr, USE_GDC: tl.constexpr = False):
    # grid (B * N_HEADS,): weigh each slice's output by exp2(lse_slice - lse_max). Bytes: num_slots * HEAD_DIM
    # fp32 per head, small against the KV bytes of the slices.
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * num_slots + s, mask=s < num_slots, other=float("-inf"))   # (BLOCK_S,)
    w = tl.exp2(lse - tl.max(lse, axis=0))                   # slice 0 always holds >= 1 token: the max is finite
    o = tl.load(part_o_ptr + (row * num_slots + s[:, None]) * HEAD_DIM + d[None, :],
                mask=s[:, None] < num_slots, other=0.0)      # (BLOCK_S, HEAD_DIM)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# Decode tuning, H100, bf16, head_dim 128 (swept: BLOCK_N 32/64/128, 2-8 warps, 2-4 stages; min partition
# 64/128/256; 2/4/8 programs per SM). 64-token slices lift B=1 ctx=2048 from 600 to 800 GB/s; past 4 programs
# per SM, B=64 ctx=2048 splits in two and loses 3%.
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)   # BLOCK_N: tokens per K/V tile
# An FP8 cache (--kv-cache-dtype fp8), H200, bf16 q, us per call, contexts drawn from [ctx/2, ctx] (scratch sweep,
# 2026-12-02; BLOCK_N/warps/stages, the bf16 cache's 64/4/3 beside it):
#   heads, B, ctx         | bf16 cache | 128/4/3 | 64/4/3 | 64/2/3 | 128/2/3 | 64/1/3 | 32/1/3
#   16/8,   1, 1024       |            |    8.5  |   7.6  |   7.7  |  10.1   |  10.1  |   9.4
#   16/8,  16, 1024       |            |   24.3  |  25.9  |  21.2  |  23.0   |  25.8  |  24.8
#   16/8, 256, 1024       |   259.5*   |  193.4  | 198.9  | 161.6  | 176.6   | 172.3  | 180.0
#   16/8, 256,  512       |            |  107.8  | 106.2  |  84.9  |  99.0   |  94.5  |  94.4
#   32/8,  64, 2048       |   137.4*   |  103.7  | 124.5  | 104.7  |  91.9   | 134.0  | 139.3
#   32/8,   1, 32768      |    62.5*   |   39.6  |  47.1  |  37.9  |  34.1   |  44.7  |  56.8
#   32/8, 256, 1024       |   208.7    |  187.8  | 193.4  | 157.0  | 173.0   | 172.4  | 172.8
#   32/4, 256, 1024       |   115.5    |   99.9  | 108.8  |  97.0  |  95.1   |  88.9  |  93.4
# (* every context at ctx, an earlier sweep.) 64/2/3: 0.89x of 128/4/3 in geometric mean, 1.01x at worst. At
# 128/4/3 (16/8 heads, B=256, ctx 1024: 229 us) the kernel was latency- and issue-bound (Nsight Compute: 25%
# occupancy, memory 47% and SM 44% of peak; loads alone 141-147 us, all-FP8 dots 226-229, head-major cache 213-217):
# an FP8 tile holds twice the tokens per byte, so twice the per-token work (the padded 16-row softmax, its
# cross-warp reductions, masks); two warps halve the cross-warp traffic and fit twice the programs per SM. The
# bf16 cache is byte-bound (4.18 TB/s) and keeps 4 warps: 2 warps were 1.006x its time, 1 warp 1.07-1.36x.
DECODE_CONFIG_FP8 = dict(BLOCK_N=64, num_warps=2, num_stages=3)
DECODE_MIN_PARTITION = 64     # fewest tokens a context slice is given (one tile)
DECODE_WAVES = 4              # split until B * n_kv * splits reaches this many programs per SM
DECODE_MAX_SPLITS = 64        # the reduce kernel holds all slices of a head in registers
# Tried and dropped (H200, 2026-12-02): no reduce launch, the last slice of each (sequence, kv head) to finish
# merging them (an atomic counter per pair). `bench.py decode-1` got slower: qwen3-0.6b 0.90 ms/token (0.85 with
# the reduce kernel), qwen3-8b 4.75 (4.66): that merge takes longer than the reduce launch it saves under PDL.


def decode_num_splits(batch: int, n_kv: int, max_ctx: int, device) -> int:
    """How many slices to cut each context into. Shapes only (never the context lengths): graph-capturable.
    The kernel sizes the slices per sequence, so a context shorter than max_ctx still fills every slice."""
    want = (DECODE_WAVES * _num_sms(device)) // (batch * n_kv)
    return max(1, min(want, triton.cdiv(max_ctx, DECODE_MIN_PARTITION), DECODE_MAX_SPLITS))


# Cascade tuning, H100, bf16, 0.6b heads, 2,000 shared + 164 own tokens per row, ms for 28 layers' attention
# (one launch for both passes; BLOCK_M 32/64/128 swept, 64 best or tied everywhere):
#   slices of the prefix |   2   |   4   |   8   |  16   | plain decode attention
#   B=16                 | 0.892 | 0.579 | 0.440 | 0.469 | 0.75
#   B=64                 | 1.095 | 0.922 | 0.934 | 1.094 | 2.44
#   B=256                | 2.806 | 2.974 | 3.181 | 3.649 | 9.21
# The best gives the shared pass about one program per two SMs (8b heads at B=64: 4 slices, 1.076 ms, beat 2
# by 8%; the rule gives 2). Smaller batches were not measured: the engine plans a shared prefix from 16 rows on.
CASCADE_MIN_BATCH = 16
SHARED_BLOCK_M = 64           # query rows per program of the shared pass (the prefill kernel's tile)
SHARED_MIN_CHUNKS = 2


def shared_prefix_chunks(batch: int, n_heads: int, n_kv: int, splits: int, block_m: int, device) -> int:
    """Slices of the shared prefix: about one program per two SMs for the shared pass. Shapes only:
    graph-capturable. The reduce holds a head's slices, the context's and the prefix's, in registers:
    together at most DECODE_MAX_SPLITS."""
    q_tiles = triton.cdiv(batch * (n_heads // n_kv), block_m)
    want = max(SHARED_MIN_CHUNKS, _num_sms(device) // (2 * n_kv * q_tiles))
    return max(1, min(want, DECODE_MAX_SPLITS - splits))


def decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, shared=None, num_splits=None,
                            num_chunks=None):
    """Same contract as decode_attention_ref. shared: a SharedPrefix plan (cascade attention), or None.
    num_splits / num_chunks: None picks by shape (decode_num_splits / shared_prefix_chunks)."""
    B, n_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[3] == hd
    assert k_cache.dtype == v_cache.dtype in (q.dtype, torch.float8_e4m3fn), "the cache: q's dtype or FP8"
    assert n_heads % n_kv == 0 and hd & (hd - 1) == 0, "n_heads must be a multiple of n_kv; head_dim a power of 2"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.stride(1) == 1
    assert context_lens.shape == (B,)
    max_ctx = block_tables.shape[1] * block_size                 # M = block_tables.shape[1]: fixed per graph
    splits = num_splits or decode_num_splits(B, n_kv, max_ctx, q.device)
    block_m = SHARED_BLOCK_M if q.is_cuda else 16                # a small tile: a quick CPU interpreter
    chunks = 0 if shared is None else num_chunks or shared_prefix_chunks(B, n_heads, n_kv, splits, block_m,
                                                                         q.device)
    slots = splits + chunks      # partial results per (sequence, head): the context's slices, the prefix's
    out = torch.empty_like(q)
    part_o = torch.empty(B, n_heads, slots, hd, dtype=torch.float32, device=q.device) if slots > 1 else None
    part_lse = torch.empty(B, n_heads, slots, dtype=torch.float32, device=q.device) if slots > 1 else None
    block_g = max(16, triton.next_power_of_2(n_heads // n_kv))
    if shared is None:
        _decode_attention_kernel[(B, n_kv, splits)](
            q, k_cache, v_cache, block_tables, block_tables.stride(0), context_lens, out, part_o, part_lse,
            scale * LOG2E, splits, N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_SIZE=block_size, BLOCK_G=block_g,
            SPLIT=splits > 1, **(DECODE_CONFIG_FP8 if k_cache.dtype.itemsize == 1 else DECODE_CONFIG), **pdl(q))
    else:
        grid = (n_kv * chunks * triton.cdiv(B * (n_heads // n_kv), block_m) + B * n_kv * splits,)
        _cascade_attention_kernel[grid](
            q, k_cache, v_cache, block_tables, block_tables.stride(0), context_lens, shared.ref_row,
            shared.prefix_len, shared.shared_lens, part_o, part_lse, scale * LOG2E, B, splits, chunks,
            N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_M=block_m,
            **DECODE_CONFIG)
    if slots > 1:
        _decode_reduce_kernel[(B * n_heads,)](part_o, part_lse, out, slots, HEAD_DIM=hd,
                                              BLOCK_S=triton.next_power_of_2(slots), **pdl(q))
    return out


# Prefill tuning, H100, bf16, head_dim 128. TFLOP/s at 8 x 2048 causal with 16 / 32 heads, and 1 x 512 with 32:
# BLOCK_M x BLOCK_N, warps, stages: 64x64 4w 3s 318 / 333, 125 (chosen: as fast, and best on short prompts);
# 64x64 4w 4s 331 / 330, 125; 128x32 4w 3s 328 / 340, 77; 128x64 4w 3s 304 / 327, 84; 128x128 8w 3s 305 / 311;
# 64x64 8w 3s 232 / 230; 64x128 4w 3s 241 / 241.
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


@triton.jit
def _prefill_tiles(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end, qk_scale,
                   N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, RAGGED: tl.constexpr = False):
    """Online softmax over key tiles [start, end) of one sequence; CAUSAL masks key j > q_pos of each row,
    RAGGED masks keys past end (needed when end - start is not a whole number of tiles, and not causal)."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        kv_off = _kv_offsets(bt_row, offs_n, in_range, kv_head, N_KV, HEAD_DIM, BLOCK_SIZE)   # (BLOCK_N, HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_off, mask=in_range[:, None], other=0.0).to(q.dtype)   # q: widened (_widen)
        s = tl.dot(q, tl.trans(k)) * qk_scale                                            # (BLOCK_M, BLOCK_N)
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        if RAGGED:
            s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=in_range[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr,
                              bt_stride, out_ptr, qk_scale, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                              HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    # grid (N_HEADS, cdiv(max_seqlen_q, BLOCK_M), B): one program per (head, tile of BLOCK_M queries, sequence).
    # Heads vary fastest, so the GROUP programs that share a kv head run together and share its K/V in L2;
    # query tiles go last-first, so the longest (most keys) start first and the short ones fill the tail.
    # FLOPs: 4 * HEAD_DIM per (query, visible key) pair, ~2 * q_len * ctx * N_HEADS * HEAD_DIM for a causal
    # sequence without prefix; K/V bytes are re-read once per query tile, ~BLOCK_M FLOPs/byte: compute-bound.
    h = tl.program_id(0)
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + b)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = ctx - q_len + offs_m              # bottom-right aligned: the last query sits at position ctx - 1
    d = tl.arange(0, HEAD_DIM)
    q_off = (q_start + offs_m).to(tl.int64)[:, None] * (N_HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=(offs_m < q_len)[:, None], other=0.0)                   # (BLOCK_M, HEAD_DIM)
    q = _widen(q, k_cache_ptr, q_ptr)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride
    kv_head = h // (N_HEADS // N_KV)
    first_pos = ctx - q_len + m_block * BLOCK_M
    # keys 0 .. first_pos are visible to every query of the tile: whole tiles of them need no mask
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, 0, full_end,
                                   qk_scale, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL=False)
    # the diagonal: keys up to the tile's last query, masked per query
    diag_end = tl.minimum(ctx, first_pos + BLOCK_M)
    acc, l_i, m_i = _prefill_tiles(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, full_end,
                                   diag_end, qk_scale, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N, CAUSAL=True)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=(offs_m < q_len)[:, None])


def prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                             max_seqlen_q: int | None = None):
    """Same contract as prefill_attention_ref. max_seqlen_q sizes the grid; None reads it (one host sync)."""
    T, n_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    B = context_lens.shape[0]
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[3] == hd
    assert k_cache.dtype == v_cache.dtype in (q.dtype, torch.float8_e4m3fn), "the cache: q's dtype or FP8"
    assert n_heads % n_kv == 0 and hd & (hd - 1) == 0, "n_heads must be a multiple of n_kv; head_dim a power of 2"
    assert cu_seqlens_q.shape == (B + 1,) and block_tables.shape[0] == B and block_tables.stride(1) == 1
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    cfg = PREFILL_CONFIG if q.is_cuda else dict(BLOCK_M=32, BLOCK_N=32)   # small tiles: a quick CPU interpreter
    out = torch.empty_like(q)
    grid = (n_heads, triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), B)
    _prefill_attention_kernel[grid](q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                    block_tables.stride(0), out, scale * LOG2E, N_HEADS=n_heads, N_KV=n_kv,
                                    HEAD_DIM=hd, BLOCK_SIZE=block_size, **cfg)
    return out


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


# 16/8 heads x 128 | B=1 ctx=128 | B=1 ctx=2048 | B=8 ctx=512 | B=64 ctx=2048 | B=256 ctx=1024 | B=1 ctx=32768
# triton           |   0.0061    |    0.0101    |   0.0127    |    0.1934     |     0.3735     |    0.0563
# torch            |   0.0414    |    0.0937    |   0.1322    |    3.2640     |     6.3863     |    1.5417
def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, shared: SharedPrefix | None = None):
    """shared (cascade attention) changes how the Triton kernels split the work, never the result: the
    reference ignores it."""
    if _use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, shared=shared)
    return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


# 16/8 heads x 128, causal | 1 x 128 | 1 x 512 | 8 x 2048
# triton                   | 0.0077  | 0.0163  |  0.4202
# torch (eager: it syncs)  | 0.3818  | 0.4324  | 16.2654
def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                      max_seqlen_q: int | None = None):
    if _use_triton(q):
        return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                        max_seqlen_q=max_seqlen_q)
    return prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
