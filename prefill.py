"""Prefill attention: causal flash attention of packed variable-length prompts (or prompt chunks) over the paged KV
cache, each chunk's K/V already stored there (kernels.qk_norm_rope_store) after any cached prefix.

    o = prefill.prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)

The reference, the Triton kernel with its measured config, then the dispatcher model.py calls. The tile loop
(attention._prefill_tiles) and the cache addressing are attention.py's: its cascade kernel attends a shared prefix
the same way. Tests: test_all.py's prefill section (Triton under TRITON_INTERPRET=1); GPU: `python bench.py kernels`.
"""
import torch
import torch.nn.functional as F

from attention import LOG2E, _prefill_tiles, _widen, gather_kv_ref
from kernels import _use_triton, tl, triton


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


# Prefill tuning, H100, bf16, head_dim 128. TFLOP/s at 8 x 2048 causal with 16 / 32 heads, and 1 x 512 with 32:
# BLOCK_M x BLOCK_N, warps, stages: 64x64 4w 3s 318 / 333, 125 (chosen: as fast, and best on short prompts);
# 64x64 4w 4s 331 / 330, 125; 128x32 4w 3s 328 / 340, 77; 128x64 4w 3s 304 / 327, 84; 128x128 8w 3s 305 / 311;
# 64x64 8w 3s 232 / 230; 64x128 4w 3s 241 / 241.
PREFILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


# bt_stride unspecialized: Triton compiles a variant per class of an int's value (1, 16k, other), so a table width of
# a new class compiled one mid-serving (a ~1.1 s stall in `bench.py spec`, H200, 2026-12-03). Read once per program.
@triton.jit(do_not_specialize=["bt_stride"])
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


# 16/8 heads x 128, causal | 1 x 128 | 1 x 512 | 8 x 2048
# triton                   | 0.0077  | 0.0163  |  0.4202
# torch (eager: it syncs)  | 0.3818  | 0.4324  | 16.2654
def prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                      max_seqlen_q: int | None = None):
    if _use_triton(q):
        return prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                        max_seqlen_q=max_seqlen_q)
    return prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
