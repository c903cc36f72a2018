"""Paged attention over the KV cache for decode: one new token per sequence (or a few consecutive ones: a verify
pass), split-K over the context, cascade for shared prefixes. Prefill attention is prefill.py's.

    o = attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    o = attention.decode_attention_qkv(qkv, ..., block_tables, context_lens, scale)  # + q/k norm, RoPE, K/V store

Laid out as kernels.py is: the PyTorch references first (the definitions, the CPU path), then the Triton
kernels with their measured configs, then the dispatchers model.py calls. The cache layout (block 0, slots,
the FP8 cache) is described in kernels.py, which writes the cache (qk_norm_rope_store).
decode_attention also does cascade attention: when many sequences share leading cache blocks (prefix
caching), plan_shared_prefix picks a shared prefix and the kernel reads its K/V once for all of them; and rows
that are consecutive tokens of one sequence (a speculative verify pass: row_groups) attend together, reading
that sequence's K/V once.
Tests: test_all.py's attention section (Triton under TRITON_INTERPRET=1); GPU: `python bench.py kernels`.
"""
from typing import NamedTuple

import torch

from kernels import (_cos_sin, _load_heads, _norm_w, _num_sms, _rope_heads, _store_kv, _use_triton, pdl,
                     qk_norm_rope_store, tl, triton)


# ----------------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------------
def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, n_kv, hd), block_table (..., M) -> (..., M*block_size, n_kv, hd)."""
    g = cache[block_table.long()]                            # (..., M, block_size, n_kv, hd)
    return g.flatten(-4, -3)                                 # (..., M*block_size, n_kv, hd)


def decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence. q: (B, n_heads, hd); block_tables: (B, M); context_lens: (B,).
    Vectorised with a mask (no host sync), so it can be captured in a CUDA graph. Returns (B, n_heads, hd)."""
    B, n_heads, hd = q.shape
    k = gather_kv_ref(k_cache, block_tables).float()         # (B, S, n_kv, hd), S = M*block_size
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]   # (B, S)
    # slots past a context may hold anything, NaN included (0 * NaN = NaN): V there is zeroed
    v = gather_kv_ref(v_cache, block_tables).float().masked_fill(~valid[:, :, None, None], 0.0)
    n_kv = k.shape[2]
    qg = q.float().view(B, n_kv, n_heads // n_kv, hd)        # (B, n_kv, group, hd)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k) * scale  # (B, n_kv, group, S)
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


LOG2E = 1.4426950408889634   # the attention kernels use exp2: exp(x) = exp2(x * log2(e)), folded into the scale

# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
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
def _slice_bounds(ctx, first, split, num_splits, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr):
    """Tokens [start, end) of slice `split` when a sequence's tokens first .. ctx-1 are cut into num_splits
    slices of whole BLOCK_N tiles, each at least MIN_PART tokens: a short context fills fewer slices, and the
    slices past its end are empty (start >= end)."""
    partition = tl.maximum(tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N, MIN_PART)
    start = first + split * partition
    return start, tl.minimum(start + partition, ctx)


@triton.jit
def _decode_slice(q, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end, qk_scale, N_KV: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of the q rows (BLOCK_G, HEAD_DIM) (the GROUP q heads of one kv head, padded to a power of two,
    or to 16 over an FP8 cache: DECODE_FP8_ROWS; widened by _widen) over tokens [start, end) of one sequence (block
    table row bt_row): each K/V tile is read once for the whole group. Returns acc (unnormalized output), l_i (sum
    of exp2) and m_i (running max, log2 units); l_i = 0 for an empty slice.
    Bytes: context_len * N_KV * HEAD_DIM * elt * 2 (K and V) per sequence, read once; q, out are noise.
    FLOPs: 4 * context_len * N_HEADS * HEAD_DIM, ~GROUP/elt per byte: bandwidth is the floor."""
    m_i = tl.full((q.shape[0],), float("-inf"), tl.float32)
    l_i = tl.zeros((q.shape[0],), tl.float32)
    acc = tl.zeros((q.shape[0], HEAD_DIM), tl.float32)
    return _decode_tiles(q, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end, qk_scale, acc, l_i, m_i, N_KV,
                         HEAD_DIM, BLOCK_SIZE, BLOCK_N)


@triton.jit
def _decode_tiles(q, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end, qk_scale, acc, l_i, m_i,
                  N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """_decode_slice's loop from the state (acc, l_i, m_i) of the tiles before `start`."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        kv_off = _kv_offsets(bt_row, offs_n, in_range, kv_head, N_KV, HEAD_DIM, BLOCK_SIZE)   # (BLOCK_N, HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_off, mask=in_range[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=in_range[:, None], other=0.0)
        acc, l_i, m_i = _attend_tile(q, k, v, in_range[None, :], acc, l_i, m_i, qk_scale)
    return acc, l_i, m_i


@triton.jit
def _attend_tile(q, k, v, keys, acc, l_i, m_i, qk_scale):
    """One K/V tile (BLOCK_N, HEAD_DIM), as loaded from the cache, into the online softmax of the q rows
    (keys: (1, BLOCK_N) for all rows, or (BLOCK_G, BLOCK_N) per row; the others masked out): the updated acc,
    l_i, m_i."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = tl.dot(q, tl.trans(k)) * qk_scale                                               # (BLOCK_G, BLOCK_N)
    s = tl.where(keys, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


# Tried and dropped (H200, 2026-12-04): both products on the CUDA cores in fp32 (q unpadded, a row at a time), 2-5x
# slower at every shape (HISTORY.md, thirtieth session).


@triton.jit
def _store_partial(part_o_ptr, part_lse_ptr, slot, mask, acc, l_i, m_i, HEAD_DIM: tl.constexpr):
    """A slice's partial result for the rows at `slot` (row of (B*H) * num_slots + slice): its normalized
    output and its log2-sum-exp2 (-inf when it saw no token), which _decode_reduce_kernel merges."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    d = tl.arange(0, HEAD_DIM)
    tl.store(part_o_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=mask[:, None])
    tl.store(part_lse_ptr + slot, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=mask)


@triton.jit
def _decode_attention_kernel(q_ptr, q_stride, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride,
                             context_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr, qk_scale, num_splits,
                             q_norm_w_ptr, k_norm_w_ptr, cos_sin_ptr, positions_ptr, slot_mapping_ptr, eps,
                             N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             MIN_PART: tl.constexpr, SPLIT: tl.constexpr, NEW_TOKEN: tl.constexpr,
                             SKIP_EMPTY: tl.constexpr, USE_GDC: tl.constexpr = False):
    # grid (B, N_KV, num_splits): sequence b, one kv head, one slice of its context (_slice_bounds).
    # NEW_TOKEN: q_ptr is the qkv projection's output (rows q_stride apart) and this kernel also does
    # qk_norm_rope_store's work, one launch fewer per layer: every program norms and rotates its q heads (a few
    # hundred bytes), and the program whose slice ends at the newest token (position ctx - 1) first writes that
    # token's K/V into the cache, then reads its tiles.
    # A program that saw the whole context writes the output itself (always so without SPLIT); otherwise each
    # slice writes a partial result and the reduce kernel merges them.
    # With NEW_TOKEN (a plain decode step: the newest token is each row's only new one) the first tile's K/V of
    # older tokens, written by earlier steps, is loaded before gdc_wait, so it streams while the qkv projection
    # finishes; the newest token's row of that tile is read after its store. The norm weights, the cos / sin row
    # and the slot (weights and step inputs) are loaded before the wait too, so that after it the row's q, k and
    # v are loaded at once, as the first thing: loaded where they were used, each load after a reduction's barrier
    # was a round trip of its own on the critical path (table after the kernel).
    GROUP: tl.constexpr = N_HEADS // N_KV
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)                # step inputs: copied in before the step's first kernel
    start, end = _slice_bounds(ctx, 0, split, num_splits, BLOCK_N, MIN_PART)
    bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride
    g = tl.arange(0, BLOCK_G)
    heads, gmask = kv_head * GROUP + g, g < GROUP                                        # (BLOCK_G,)
    d = tl.arange(0, HEAD_DIM)
    if NEW_TOKEN:
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < end
        kv_off = _kv_offsets(bt_row, offs_n, in_range, kv_head, N_KV, HEAD_DIM, BLOCK_SIZE)   # (BLOCK_N, HEAD_DIM)
        older = (in_range & (offs_n < ctx - 1))[:, None]
        k0 = tl.load(k_cache_ptr + kv_off, mask=older, other=0.0)
        v0 = tl.load(v_cache_ptr + kv_off, mask=older, other=0.0)
        # the norm weights, cos / sin and the slot too (weights and step inputs): after the wait only the row's loads
        q_w, q_wp = _norm_w(q_norm_w_ptr, HEAD_DIM)
        k_w, k_wp = _norm_w(k_norm_w_ptr, HEAD_DIM)
        cos, sin = _cos_sin(cos_sin_ptr + tl.load(positions_ptr + b) * HEAD_DIM, HEAD_DIM)
        slot = tl.load(slot_mapping_ptr + b)
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = q_ptr + b.to(tl.int64) * q_stride
    if NEW_TOKEN:
        newest_here = (start < ctx) & (end == ctx)     # this program writes the newest token's K/V, first
        kv_heads = kv_head + tl.arange(0, 1)           # one row: the newest k / v head (the table after the kernel)
        # newest_here as a mask (the scalars broadcast first: the interpreter rejects scalar & tensor masks)
        kv_mask = (kv_heads * 0 + start < ctx) & (kv_heads * 0 + end == ctx)
        x, xp = _load_heads(row, heads, gmask & (g * 0 + start < end), HEAD_DIM)   # the row's q, k and v, at once
        kx, kxp = _load_heads(row + N_HEADS * HEAD_DIM, kv_heads, kv_mask, HEAD_DIM)
        v_new = tl.load(row + (N_HEADS + N_KV) * HEAD_DIM + kv_heads[:, None] * HEAD_DIM + d[None, :],
                        mask=kv_mask[:, None], other=0.0)
        if SKIP_EMPTY:                  # many slices, most of them empty on short contexts: skip their math
            q = tl.zeros((BLOCK_G, HEAD_DIM), q_ptr.dtype.element_ty)
            if start < end:
                q = _rope_heads(x, xp, q_w, q_wp, cos, sin, eps, HEAD_DIM).to(q_ptr.dtype.element_ty)
        else:                           # straight-line code
            q = _rope_heads(x, xp, q_w, q_wp, cos, sin, eps, HEAD_DIM).to(q_ptr.dtype.element_ty)
        if newest_here:
            _store_kv(_rope_heads(kx, kxp, k_w, k_wp, cos, sin, eps, HEAD_DIM), v_new, kv_heads, kv_mask, slot,
                      k_cache_ptr, v_cache_ptr, N_KV, HEAD_DIM)
            tl.debug_barrier()          # the stores are visible to all of this program's threads before the loads
            newest = (offs_n == ctx - 1)[:, None]      # in the first tile when the slice is one tile long
            k0 = tl.where(newest, tl.load(k_cache_ptr + kv_off, mask=newest, other=0.0), k0)
            v0 = tl.where(newest, tl.load(v_cache_ptr + kv_off, mask=newest, other=0.0), v0)
        q = _widen(q, k_cache_ptr, q_ptr)
        m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
        if start < end:
            acc, l_i, m_i = _attend_tile(q, k0, v0, in_range[None, :], acc, l_i, m_i, qk_scale)
        if start + BLOCK_N < end:      # a one-tile slice skips the pipelined loop's prologue and drain entirely
            acc, l_i, m_i = _decode_tiles(q, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start + BLOCK_N, end,
                                          qk_scale, acc, l_i, m_i, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
    else:
        q = tl.load(row + heads[:, None] * HEAD_DIM + d[None, :], mask=gmask[:, None], other=0.0)
        acc, l_i, m_i = _decode_slice(_widen(q, k_cache_ptr, q_ptr), k_cache_ptr, v_cache_ptr, bt_row, kv_head,
                                      start, end, qk_scale, N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
    out_row = b.to(tl.int64) * N_HEADS + heads                                           # rows of (B*H)
    if SPLIT:
        _store_partial(part_o_ptr, part_lse_ptr, out_row * num_splits + split, gmask, acc, l_i, m_i, HEAD_DIM)
    if (start == 0) & (end == ctx):
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])


# The row's loads at once after the wait, the rest before it (H200, 2026-12-04; 28 fused decode calls + reduce in a
# CUDA graph with PDL): 16/8 heads, B=1, 4.67 -> 4.09 us per layer at 128 tokens, 7.17 -> 6.49 at 2,048; `bench.py
# decode-1` qwen3-0.6b 0.69 -> 0.67 ms/token (HISTORY.md, thirtieth session). Dropped: the newest k / v as a
# 16-row tile (197 registers: B=8 at 2,048 tokens 26.5 -> 31.7 us) and the q, k and v heads as rows of one tile
# (decode-8 1.08 -> 1.10-1.11 ms/step, decode-1 not faster across three calls; thirty-first session).


@triton.jit
def _decode_rows_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, context_lens_ptr, lead_ptr,
                        out_ptr, part_o_ptr, part_lse_ptr, qk_scale, num_splits, N_HEADS: tl.constexpr,
                        N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                        USE_GDC: tl.constexpr = False):
    # grid (B, N_KV, num_splits) over decode rows, of which some are consecutive tokens of one sequence (a
    # speculative verify pass: one block table, each row attending to its own context, the next row's one longer).
    # Program b works only where row b leads a group (lead[b] = n > 0: rows b .. b+n-1, n <= ROWS): their
    # n x GROUP query rows take the M dimension of each tile's dots together, so the sequence's K/V are read once
    # for the group, not once per row. Each row keeps its own slice of its own context (_slice_bounds of its
    # length, whole tiles) and masks the rest of the group's tiles: a fully masked tile leaves a row's state exactly
    # as it was, so a row's arithmetic is what it would be alone, whatever the group (a token computed as the
    # first or the fifth row of a pass gets the same logits: random weights' near-tied argmax flips otherwise).
    # A row whose slice is empty keeps l = 0 (lse = -inf: the reduce skips it); a row whose whole context is its
    # slice 0 gets its output written here (the reduce leaves rows with one live slice alone).
    GROUP: tl.constexpr = N_HEADS // N_KV
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n = tl.load(lead_ptr + b)
    if n > 0:
        m = tl.arange(0, BLOCK_M)
        j = m // GROUP                                 # query row m: head m % GROUP of row b + j
        live = (j < n) & (j < ROWS)
        ctx_m = tl.load(context_lens_ptr + b + j, mask=live, other=0)                     # (BLOCK_M,)
        start_m, end_m = _slice_bounds(ctx_m, 0, split, num_splits, BLOCK_N, MIN_PART)   # each row's own slice
        lo = tl.min(tl.where(live, start_m, 2147483647), axis=0)
        hi = tl.max(tl.where(live, end_m, 0), axis=0)
        out_row = (b + j).to(tl.int64) * N_HEADS + kv_head * GROUP + m % GROUP          # rows of (B*H)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + out_row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
        q = _widen(q, k_cache_ptr, q_ptr)
        # a finite floor, not -inf: a row's tiles before its slice (all masked) then leave it at exactly 0, where
        # -inf - -inf would be NaN
        m_i = tl.full((BLOCK_M,), -1e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride
        for n0 in range(lo, hi, BLOCK_N):              # slices start on whole tiles: lo is a tile's first token
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_range = offs_n < hi
            kv_off = _kv_offsets(bt_row, offs_n, in_range, kv_head, N_KV, HEAD_DIM, BLOCK_SIZE)
            k = tl.load(k_cache_ptr + kv_off, mask=in_range[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=in_range[:, None], other=0.0)
            mine = (offs_n[None, :] >= start_m[:, None]) & (offs_n[None, :] < end_m[:, None])   # (BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _attend_tile(q, k, v, mine, acc, l_i, m_i, qk_scale)
        if SPLIT:
            _store_partial(part_o_ptr, part_lse_ptr, out_row * num_splits + split, live, acc, l_i, m_i, HEAD_DIM)
        whole = live & (start_m == 0) & (end_m == ctx_m)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], (acc / l_safe[:, None]).to(
            out_ptr.dtype.element_ty), mask=whole[:, None])


@triton.jit
def _prefill_tiles(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, start, end, qk_scale,
                   N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, RAGGED: tl.constexpr = False):
    """Online softmax over key tiles [start, end) of one sequence; CAUSAL masks key j > q_pos of each row,
    RAGGED masks keys past end (needed when end - start is not a whole number of tiles, and not causal). The loop
    of prefill.py's kernel, and of the cascade kernel's shared prefix (a tile of rows from many sequences)."""
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
def _shared_prefix_slice(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, bt_stride, ref_row_ptr, prefix_len_ptr,
                         shared_lens_ptr, part_o_ptr, part_lse_ptr, qk_scale, B, kv_head, chunk, tile, num_chunks,
                         num_slots, first_slot, N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cascade attention's first level: the prefix_len tokens that many sequences share (the blocks of row
    ref_row's table) are cut into num_chunks slices, and one program attends slice `chunk` for BLOCK_M query
    rows, each a (sequence, q head of this kv head) pair: a prefill tile whose queries come from different
    sequences (_prefill_tiles, above). The prefix's K/V are read once per step instead of once per sequence.
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
    _store_partial(part_o_ptr, part_lse_ptr, row * num_slots + first_slot + chunk, live, acc,
                   tl.where(takes, l_i, 0.0), m_i, HEAD_DIM)      # l_i = 0: lse = -inf, the reduce skips it


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
        p = pid - n_prefix                             # sequence b, kv head, slice: its tokens after the prefix
        b, kv_head, split = p // (N_KV * num_splits), (p // num_splits) % N_KV, p % num_splits
        g = tl.arange(0, BLOCK_G)
        heads, gmask = kv_head * (N_HEADS // N_KV) + g, g < N_HEADS // N_KV
        row = b.to(tl.int64) * N_HEADS + heads
        q = tl.load(q_ptr + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], mask=gmask[:, None], other=0.0)
        start, end = _slice_bounds(tl.load(context_lens_ptr + b), tl.load(shared_lens_ptr + b), split, num_splits,
                                   BLOCK_N, BLOCK_N)
        acc, l_i, m_i = _decode_slice(_widen(q, k_cache_ptr, q_ptr), k_cache_ptr, v_cache_ptr,
                                      block_tables_ptr + b.to(tl.int64) * bt_stride, kv_head, start, end, qk_scale,
                                      N_KV, HEAD_DIM, BLOCK_SIZE, BLOCK_N)
        _store_partial(part_o_ptr, part_lse_ptr, row * num_slots + split, gmask, acc, l_i, m_i, HEAD_DIM)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, out_ptr, num_slots, HEAD_DIM: tl.constexpr,
                          BLOCK_S: tl.constexpr, MIN_LIVE: tl.constexpr, USE_GDC: tl.constexpr = False):
    # grid (B * N_HEADS,): weigh each live slice's output (lse > -inf) by exp2(lse_slice - lse_max). Bytes:
    # HEAD_DIM fp32 per slice of each head (dead ones too, then zeroed), small against the slices' KV bytes.
    # Rows with fewer than MIN_LIVE live slices are left alone: with MIN_LIVE = 2 (plain decode) a lone slice
    # wrote the output itself.
    if USE_GDC:                                        # programmatic dependent launch: see `pdl`
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * num_slots + s, mask=s < num_slots, other=float("-inf"))   # (BLOCK_S,)
    # loaded beside lse, not behind the test on it: one round trip, not two (dead slices' rows are zeroed below)
    o = tl.load(part_o_ptr + (row * num_slots + s[:, None]) * HEAD_DIM + d[None, :],
                mask=(s < num_slots)[:, None], other=0.0)    # (BLOCK_S, HEAD_DIM)
    live = lse > float("-inf")                               # slice 0 always holds >= 1 token: one is live
    if tl.sum(live.to(tl.int32), axis=0) >= MIN_LIVE:
        w = tl.exp2(lse - tl.max(lse, axis=0))
        out = tl.sum(w[:, None] * tl.where(live[:, None], o, 0.0), axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


# The partial outputs loaded beside their lse's and 1-4 warps by slices (H200, 2026-12-04; the chain above): 16/8
# heads B=1 4.03 -> 3.87 us per layer at 128 tokens, 6.37 -> 5.92 at 2,048, B=8 5.26 -> 4.84, B=64 within 1%;
# `bench.py decode-1` qwen3-0.6b decode-8 7,363 -> 7,497 tok/s (every shape: HISTORY.md, thirty-first session).

# Decode tuning, H100, bf16, head_dim 128 (swept: BLOCK_N 32/64/128, 2-8 warps, 2-4 stages; min partition
# 64/128/256; 2/4/8 programs per SM). 64-token slices lift B=1 ctx=2048 from 600 to 800 GB/s; past 4 programs
# per SM, B=64 ctx=2048 splits in two and loses 3%.
DECODE_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)   # BLOCK_N: tokens per K/V tile
# A bf16 cache's tile by programs (sequences x kv heads x slices) per SM (decode_config). Registers a thread (ptxas,
# sm_90, Triton 3.6, compiled on the CPU) decide the programs resident per SM: the kernel making its own q (up to
# FUSED_MAX_BATCH sequences) 167-168 with four warps, 255 with two (3 / 4 per SM; groups of 2-8 alike); given q (more
# sequences) 93-109 / 164-168 (4 / 6 per SM; 93, i.e. 5 per SM, for groups of 4 without slices). Two warps win
# where they need fewer rounds of resident programs than four, e.g. 512 programs (3.9 per SM, 1 round against 2),
# and lose where the rounds are equal (1,024 programs given q: 2 rounds either way). `bench.py timeline` (H200,
# 2026-12-04; prompts of 800 / 600 tokens), the decode kernel's us per call four -> two warps (the step's span in us,
# sampled), programs per SM in brackets:
#   qwen3-0.6b, 800 | 32 (3.9) 41.2 -> 32.4 (2,152 -> 1,921) | 64 (3.9) 73.0 -> 57.6 (3,060 -> 2,636)
#                   | 96 (5.8) 102.2 -> 81.0 (3,945 -> 3,350) | 128 (7.8) 110.5 -> 115.1 (4,209 -> 4,350)
#                   | 192 (11.6) 168.0 -> 157.1 (5,951 -> 5,655) | 256 (15.5) 226.0 -> 214.3 (7,642 -> 7,322)
#   qwen3-0.6b, 600 | 56 (3.4) 55.3 -> 42.0 (2,583 -> 2,233) | 128 85.9 -> 89.8 | 160 (9.7) 101.7 -> 102.9
#   qwen3-8b, 600   | 64 (3.9) 58.5 -> 47.1 (6,855 -> 6,513) | 128 (7.8) 92.1 -> 98.6 (8,663 -> 8,961)
#                   | 256 (15.5) 179.4 -> 165.4 (13,821 -> 13,134)
#   qwen3-30b-a3b   | 64 (3.9) 34.8 -> 28.3 | 128 (3.9) 45.5 -> 54.3 | 256 (7.8) 85.9 -> 93.7
#   (2026-12-04, later: prompts of 700 / 600 tokens, sampled; the previous rule (two warps at 3-7 and past 10 per SM
#   for groups of up to 4) -> counting rounds)
#   qwen3-0.6b, 700 | 112 (6.8, given q) two -> four warps 101.5 -> 96.1 (3,993 -> 3,843)
#                   | 144 (8.7, given q) four -> two warps 111.3 -> 121.8 (4,320 -> 4,815)
#   qwen3-30b-a3b   | 64 (3.9, makes q) four -> two 34.7 -> 28.3 (18,079 -> 17,813)
#                   | 160 (4.8, given q) four -> two 65.8 -> 60.3 (20,350 -> 20,107)
# 16 and 48 sequences (2.9 per SM) were the same either way. Counting rounds predicts all of these but 144 and 160
# sequences of the 0.6b (8-10 per SM given q: two warps take 2 rounds against 3, yet lose 9% / 1%), so the ranges
# below follow the measurements: the kernel making its q takes two warps where they need one round against two (3-4
# per SM, as far as Qwen3's 4 and 8 kv heads take it at FUSED_MAX_BATCH); given q, where two warps need one round
# against two (4-6 per SM) and past 10 per SM; any group (a group of 8 spills 40-56 bytes with two warps, and gains).
DECODE_CONFIG_MANY = dict(BLOCK_N=64, num_warps=2, num_stages=3)   # two warps where DECODE_MANY_PER_SM says
DECODE_MANY_PER_SM = {True: ((3, 4),), False: ((4, 6), (10, float("inf")))}   # makes its q -> (lo, hi] per SM
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
# Why the FP8 kernel is slower per byte (SASS, Triton 3.6, sm_90a, 16/8 heads, 64/2/3): its loop is 1,270
# instructions per warp per 64-token tile (bf16 cache: 496, at twice the warps), 128 per thread 1-byte shared loads
# of V, the second dot's B operand (8-bit operands have no transposing ldmatrix on sm_90). Tried and dropped (H200,
# HISTORY.md's fifteenth to twenty-first sessions): warps on token sub-tiles, P kv heads per program, a register double
# buffer, V as int16 pairs, V stored transposed, head-major K/V, 5 stages, maxnreg 128, block ids loaded ahead; the
# buffers pay only for one long context with few programs per SM (32/8 heads, 32k tokens: 38.3 -> 28.9 us).
# A kv head's q rows: a 16-bit cache's tile has just the group's rows (2 / 4 / 8 q heads; Triton 3.6 pads the
# tensor-core product itself), not 16 padded ones, so the softmax and the rescaling run on 2-8 rows. The fused decode
# kernel + reduce, 28 layers in a CUDA graph with PDL (H200, 2026-12-04, contexts all at ctx), us per layer, 16 rows
# -> the group's, two runs each:
#   heads, B, ctx   | bf16 cache                   | FP8 cache
#   16/8,   1,  128 |   4.01 /  3.80 ->  3.55 /  3.61 |   5.02 /  5.07 ->  4.73 /  4.79
#   16/8,   1, 2048 |   5.82 /  5.90 ->  5.77 /  5.86 |   9.70 /  7.19 ->  7.88 /  7.78
#   16/8,   8, 2048 |  23.65 / 23.52 -> 22.39 / 22.37 |  23.78 / 23.84 -> 22.99 / 22.95
#   16/8,  64, 1024 |  86.48 / 86.08 -> 84.07 / 84.16 |  50.74 / 50.78 -> 53.80 / 53.93
#   16/8, 256, 1024 | 278.74 / 279.01 -> 273.63 / 274.75 | 199.90 / 198.77 -> 201.69 / 200.88
#   32/8,   1, 2048 |   6.29 /  6.32 ->  6.09 /  6.15 |   7.05 /  7.24 ->  8.31 /  7.90
#   32/8, 256, 1024 | 279.96 / 279.99 -> 274.82 / 274.89 | 197.13 / 197.21 -> 199.22 / 198.72
#   32/4,   1,  256 |   4.01 /  4.00 ->  3.73 /  3.72 |   5.39 /  5.44 ->  5.15 /  5.13
#   32/4,   8, 2048 |  18.94 / 19.54 -> 17.40 / 17.38 |  19.99 / 19.76 -> 19.61 / 19.62
#   32/4, 256, 1024 | 144.91 / 145.28 -> 142.04 / 142.00 | 123.09 / 123.27 -> 118.76 / 118.59
# The bf16 cache gains everywhere; the FP8 cache loses where its offline workload runs (16/8, 64-256 sequences) and
# keeps 16 rows. (The verify passes' rows kernel and the cascade kernel keep 16: not measured.)
DECODE_FP8_ROWS = 16          # an FP8 cache's decode tile: a kv head's q rows padded to this many
# Fewest tokens a context slice is given. Longer minimum slices let short contexts finish in one slice and skip
# the reduce, but one program then walks every tile: us per layer step (the fused kernel, B=1, as in the table
# at FUSED_MAX_BATCH; H200, 2026-12-02), and `bench.py decode-1` on qwen3-0.6b 0.75 ms/token at 64, 0.93 at 256:
#   heads, ctx    |   64  |  128  |  256  |  512
#   16/8,  256    | 13.59 | 15.32 | 18.67 | 18.65
#   16/8, 1024    | 14.59 | 16.45 | 20.93 | 27.37
#   16/8, 8192    | 22.88 | 22.81 | 25.53 | 34.10
#   32/8, 1024    | 39.20 | 41.04 | 44.81 | 52.22
DECODE_MIN_PARTITION = 64     # one tile
# Programs per SM the slices aim for. One layer's attention step as the decode graph runs it (norm + qkv GEMV,
# fused decode attention, reduce, o GEMV; 28 layers chained in a CUDA graph with PDL; H200, bf16, 2026-12-02,
# scratch harness), us per layer at 4 / 3 / 2 programs per SM (64 slices at most; contexts all at ctx):
#   heads, B    | ctx 256            | ctx 2048           | ctx 16384
#   16/8,  1    | 14.1 / 14.6 / 14.0 | 17.7 / 17.6 / 16.2 |  38.3 /  31.9 /  34.5
#   16/8,  2    | 21.2 / 21.1 / 21.0 | 29.6 / 26.5 / 25.7 |  65.3 /  54.4 /  57.9
#   16/8,  4    | 22.5 / 23.6 / 21.2 | 33.1 / 29.5 / 29.9 | 101.7 /  84.5 /  91.7
#   16/8,  8    | 24.5 / 24.4 / 23.2 | 44.0 / 38.3 / 39.6 | 182.0 / 148.6 / 162.1
#   32/8,  1    | 32.2 / 34.5 / 31.8 | 36.3 / 36.1 / 34.5 |  56.7 /  50.8 /  52.7
#   32/8,  8    | 43.3 / 42.8 / 41.5 | 62.9 / 56.3 / 58.0 | 200.8 / 166.9 / 180.3
#   32/4,  2    | 29.6 / 32.6 / 28.7 | 33.7 / 32.4 / 31.9 |  54.2 /  47.1 /  49.2
#   32/4,  8    | 32.3 / 33.0 / 30.1 | 44.5 / 41.0 / 39.1 | 113.6 /  97.7 / 101.4
# (32/4 at B=1 keeps 64 slices either way.) Two per SM is best or within noise at short and middle contexts and
# beats four everywhere; three wins past 16k tokens but loses at 256. The H100 sweep above had chosen four. The
# engine, two per SM (rounded up: 17-33 sequences of 8 kv heads keep 2 slices) against four, one GPU call:
# `bench.py timeline --timeline-batches 1 8 --timeline-prompt 8000` (qwen3-0.6b) 1,050 / 3,017 us per step against
# 1,154 / 3,425; `bench.py decode-1` 0.72 ms/token both, decode-8 1.21 against 1.24 ms/step; offline within the
# runs' spread (24,264-25,162 tok/s sampled against 23,709-24,709).
DECODE_WAVES = 2              # split until B * n_kv * splits reaches at least this many programs per SM
DECODE_MAX_SPLITS = 64        # the reduce kernel holds all slices of a head in registers
# Large batches keep one slice. Decode attention alone at 1 / 2 / 4 slices (H200, 2026-12-03, scratch harness,
# contexts drawn from [ctx/2, ctx]), us per call, FP8 cache (bf16 cache beside):
#   heads, B, ctx    | FP8                   | bf16
#   16/8, 256, 1024  | 157.7 / 156.5 / 173.5 | 207.9 / 221.9 / 241.9
#   16/8, 256,  512  |  90.9 /  96.9 / 115.3 | 116.4 / 132.4 / 155.8
#   32/4, 256, 1024  |  99.0 /  99.1 / 114.3 | 117.2 / 133.1 / 151.3
#   16/8, 128, 2048  | 189.0 / 162.3 / 159.7 | 217.6 / 223.6 / 226.4
# bf16 loses with every extra slice. FP8 at 128 sequences gains 14% from two: 1,024 programs are 1.3 rounds of its
# 6 resident per SM (registers: 168 per thread, 2 warps), the last round mostly idle; two slices make 2.6 rounds.
# In the engine (qwen3-0.6b, 8 kv heads, `bench.py timeline --kv-cache-dtype fp8 --timeline-prompt 1000`, H200,
# 2026-12-03, two calls, each with the one-slice tree beside), us per step, batch (rounds of one slice's programs):
#   one slice -> two | 96 (0.97) 3,116 -> 3,106 (*) | 104 (1.05) 3,928 -> 3,670 | 112 (1.13) 4,025 -> 3,817
#                    | 128 (1.29) 4,189 -> 3,995    | 144 (1.45) 4,438 -> 4,250 | 160 (1.62) 4,600 -> 4,781
#                    | 192 (1.94) 5,065 -> 5,298    | 208 (2.10) 5,889 -> 5,734 | 224 (2.26) 5,998 -> 6,001
#                    | 240 (2.42) 6,363 -> 6,290    | 256 (2.59) 6,390 -> 6,377 (one slice both: the control)
# (* the rule below keeps one slice there; three slices, 12 programs per SM, were 3,450.) Two slices pay where the
# last round is at most half full, as counting rounds predicts (r rounds take ceil(r); 2r take ceil(2r)), and lose
# past it. `bench.py offline --kv-cache-dtype fp8`, one slice -> the rule: 27,797 -> 28,770 and 27,558 -> 28,249
# tok/s sampled (two calls), greedy 28,225 -> 29,037 and 28,077 -> 27,876.
DECODE_RESIDENT_FP8 = 6       # FP8 decode programs resident per SM (DECODE_CONFIG_FP8)
# The same rule for the bf16 cache (4 resident per SM) won at 72-96 sequences alone (3,937 -> 3,556 us per step at 72)
# and lost at 160, but kept to 66-99 sequences `bench.py offline` did not follow (sampled 24,385 -> 25,084 tok/s,
# greedy 24,546 -> 23,709; HISTORY.md's eighteenth session). The bf16 cache keeps one slice.
# Tried and dropped (H200, 2026-12-02): no reduce launch, the last slice of each (sequence, kv head) to finish
# merging them (an atomic counter per pair). `bench.py decode-1` got slower: qwen3-0.6b 0.90 ms/token (0.85 with
# the reduce kernel), qwen3-8b 4.75 (4.66): that merge takes longer than the reduce launch it saves under PDL.


def decode_num_splits(batch: int, n_kv: int, max_ctx: int, device, fp8: bool = False) -> int:
    """How many slices to cut each context into. Shapes only (never the context lengths): graph-capturable.
    The kernel sizes the slices per sequence, so a context shorter than max_ctx still fills every slice.
    fp8: the cache is FP8 (two slices where one would leave its last round of programs mostly idle)."""
    sms, programs, tiles = _num_sms(device), batch * n_kv, triton.cdiv(max_ctx, DECODE_MIN_PARTITION)
    resident = DECODE_RESIDENT_FP8 * sms
    if fp8 and programs > resident and 0 < programs % resident <= resident // 2:   # last round <= half full
        return min(2, tiles)
    want = triton.cdiv(DECODE_WAVES * sms, programs)                    # at least DECODE_WAVES per SM
    return max(1, min(want, tiles, DECODE_MAX_SPLITS))


def decode_config(programs: int, new_token: bool, fp8: bool, device) -> dict:
    """_decode_attention_kernel's tile for this many programs, making its own q or given it (new_token), over a
    cache of FP8 or 16-bit values."""
    if fp8:
        return DECODE_CONFIG_FP8
    per_sm = programs / _num_sms(device)
    many = any(lo < per_sm <= hi for lo, hi in DECODE_MANY_PER_SM[new_token])
    return DECODE_CONFIG_MANY if many else DECODE_CONFIG


# Decode rows that are consecutive tokens of one sequence (a speculative verify pass, a draft model's catch-up)
# are attended in groups of up to group_rows rows (_decode_rows_kernel), their query rows sharing each K/V tile,
# so that a context is read once per group, not once per row.
GROUP_MAX_M = 32              # query rows (tokens x heads of a kv head) of one group's tiles at most


def group_rows(n_heads: int, n_kv: int, most: int) -> int:
    """Rows of one sequence a program attends at once: up to `most`, within GROUP_MAX_M query rows."""
    return max(1, min(most, GROUP_MAX_M // (n_heads // n_kv)))


def row_groups(seq_rows: list[int], rows: int) -> list[int]:
    """Per decode row, the rows it leads (0: another row's group holds it), when the rows are seq_rows[i]
    consecutive tokens of sequence i in turn, cut into groups of up to `rows`."""
    lead = []
    for n in seq_rows:
        for at in range(0, n, rows):
            g = min(rows, n - at)
            lead += [g] + [0] * (g - 1)
    return lead


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


class NewTokens(NamedTuple):
    """A decode batch's new tokens before qk_norm_rope_store (its arguments, kernels.qk_norm_rope_store_ref): given
    these, the decode kernel does that op's work itself."""
    qkv: torch.Tensor            # (B, (n_heads + 2 * n_kv) * head_dim): the qkv projection's output
    q_norm_w: torch.Tensor       # (head_dim,)
    k_norm_w: torch.Tensor
    cos_sin: torch.Tensor        # the rope_cos_sin table
    positions: torch.Tensor      # (B,)
    slot_mapping: torch.Tensor   # (B,): the cache slot of each new token's K/V
    eps: float


def decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, shared=None, num_splits=None,
                            num_chunks=None, new: NewTokens | None = None, groups=None, rows: int = 1):
    """Same contract as decode_attention_ref. shared: a SharedPrefix plan (cascade attention), or None.
    num_splits / num_chunks: None picks by shape (decode_num_splits / shared_prefix_chunks).
    new (no shared prefix): q is None, and the kernel makes q from new.qkv and writes the new K/V first.
    groups (neither): (B,) int32, the rows each row leads (row_groups), up to `rows` each: _decode_rows_kernel."""
    _, block_size, n_kv, hd = k_cache.shape
    if new is not None:
        assert q is None and shared is None and new.qkv.stride(1) == 1 and new.q_norm_w.shape == (hd,)
        assert new.q_norm_w.dtype == new.k_norm_w.dtype == new.qkv.dtype and new.cos_sin.dtype == torch.float32
        B, n_heads = new.qkv.shape[0], new.qkv.shape[1] // hd - 2 * n_kv
        src, dtype = new.qkv, new.qkv.dtype
    else:
        (B, n_heads, _), src, dtype = q.shape, q, q.dtype
        assert q.is_contiguous() and q.shape[2] == hd
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.dtype == v_cache.dtype in (dtype, torch.float8_e4m3fn), "the cache: q's dtype or FP8"
    assert n_heads % n_kv == 0 and hd & (hd - 1) == 0, "n_heads must be a multiple of n_kv; head_dim a power of 2"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.stride(1) == 1
    assert context_lens.shape == (B,)
    max_ctx = block_tables.shape[1] * block_size                 # M = block_tables.shape[1]: fixed per graph
    programs = B if groups is None else triton.cdiv(B, rows)    # (groups: as if every group were full)
    fp8 = k_cache.dtype.itemsize == 1
    splits = num_splits or decode_num_splits(programs, n_kv, max_ctx, src.device, fp8)
    block_m = SHARED_BLOCK_M if src.is_cuda else 16              # a small tile: a quick CPU interpreter
    chunks = 0 if shared is None else num_chunks or shared_prefix_chunks(B, n_heads, n_kv, splits, block_m,
                                                                         src.device)
    slots = splits + chunks      # partial results per (sequence, head): the context's slices, the prefix's
    out = torch.empty(B, n_heads, hd, dtype=dtype, device=src.device)
    part_o = torch.empty(B, n_heads, slots, hd, dtype=torch.float32, device=src.device) if slots > 1 else None
    part_lse = torch.empty(B, n_heads, slots, dtype=torch.float32, device=src.device) if slots > 1 else None
    group = triton.next_power_of_2(n_heads // n_kv)
    if groups is not None:
        assert shared is None and new is None and groups.shape == (B,)
        cfg = DECODE_CONFIG_FP8 if fp8 else DECODE_CONFIG
        _decode_rows_kernel[(B, n_kv, splits)](
            q, k_cache, v_cache, block_tables, block_tables.stride(0), context_lens, groups, out, part_o, part_lse,
            scale * LOG2E, splits, N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_SIZE=block_size,
            BLOCK_M=max(16, triton.next_power_of_2(rows * (n_heads // n_kv))), MIN_PART=DECODE_MIN_PARTITION,
            ROWS=rows, SPLIT=splits > 1, **cfg, **pdl(src))
    elif shared is None:
        cfg = decode_config(B * n_kv * splits, new is not None, fp8, src.device)
        assert DECODE_MIN_PARTITION % cfg["BLOCK_N"] == 0
        n = new or NewTokens(*[src] * 6, 0.0)                    # without `new`, its pointers are never read
        _decode_attention_kernel[(B, n_kv, splits)](
            src, src.stride(0), k_cache, v_cache, block_tables, block_tables.stride(0), context_lens, out, part_o,
            part_lse, scale * LOG2E, splits, n.q_norm_w, n.k_norm_w, n.cos_sin, n.positions, n.slot_mapping, n.eps,
            N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_SIZE=block_size,
            BLOCK_G=max(DECODE_FP8_ROWS if fp8 else 2, group),             # (2: one-row dots unmeasured)
            MIN_PART=DECODE_MIN_PARTITION, SPLIT=splits > 1, NEW_TOKEN=new is not None,
            SKIP_EMPTY=splits > FUSED_SKIP_EMPTY_SPLITS, **cfg, **pdl(src))
    else:
        grid = (n_kv * chunks * triton.cdiv(B * (n_heads // n_kv), block_m) + B * n_kv * splits,)
        _cascade_attention_kernel[grid](
            q, k_cache, v_cache, block_tables, block_tables.stride(0), context_lens, shared.ref_row,
            shared.prefix_len, shared.shared_lens, part_o, part_lse, scale * LOG2E, B, splits, chunks,
            N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_SIZE=block_size, BLOCK_G=max(16, group), BLOCK_M=block_m,
            **DECODE_CONFIG)
    if slots > 1:
        # One warp per 4 slices (1-4 warps): a small tile needs no cross-warp reductions, i.e. no barriers (SASS).
        block_s = triton.next_power_of_2(slots)
        _decode_reduce_kernel[(B * n_heads,)](part_o, part_lse, out, slots, HEAD_DIM=hd, BLOCK_S=block_s,
                                              MIN_LIVE=1 if shared is not None else 2,
                                              num_warps=min(4, max(1, block_s // 4)), **pdl(src))
    return out


# ----------------------------------------------------------------------------------------------------------
# Dispatchers: what model.py calls
# ----------------------------------------------------------------------------------------------------------

# 16/8 heads x 128 | B=1 ctx=128 | B=1 ctx=2048 | B=8 ctx=512 | B=64 ctx=2048 | B=256 ctx=1024 | B=1 ctx=32768
# triton           |   0.0061    |    0.0101    |   0.0127    |    0.1934     |     0.3735     |    0.0563
# torch            |   0.0414    |    0.0937    |   0.1322    |    3.2640     |     6.3863     |    1.5417
def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, shared: SharedPrefix | None = None,
                     groups: torch.Tensor | None = None, rows: int = 1):
    """shared (cascade attention) and groups (rows of one sequence attended together, up to `rows` at once: see
    row_groups) change how the Triton kernels split the work, never the result: the reference ignores them."""
    if _use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, shared=shared,
                                       groups=groups, rows=rows)
    return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


# One layer's attention step as the decode graph runs it, us: the qkv GEMV (with its RMSNorm), then either two
# kernels (qk_norm_rope_store, decode attention) or the fused one, then the o GEMV; CUDA graph with PDL, contexts
# at ctx, tables 40,960 tokens wide as the engine's (H200, bf16, 2026-12-02, scratch A/B). "fused, straight" has
# no SKIP_EMPTY branch, "fused, skip" has it:
#   heads, B, ctx  | two kernels | fused, straight | fused, skip
#   16/8,   1,  256 |    14.27    |      13.63      |    12.94        (64 slices, 4 of them with tokens)
#   16/8,   1, 1024 |    15.91    |      14.75      |    14.25
#   16/8,   8,  512 |    28.46    |      26.70      |    28.71        (8 slices, all with tokens)
#   16/8,  64, 1024 |    88.81    |      87.57      |                 (one slice; an earlier run)
#   16/8, 256,  512 |   160.51    |     165.66      |   166.40
#   32/8,   1,  256 |    36.05    |      38.17      |    34.24
#   32/8,   1, 1024 |    37.86    |      39.27      |    36.37
#   32/8,   8,  512 |    49.24    |      46.21      |    48.75
#   32/8,  64, 1024 |   106.13    |     104.69      |                 (an earlier run)
#   32/8, 256,  512 |   185.12    |     189.30      |   189.73
# So: fused up to 64 sequences (beyond, each program's extra serial work shows: 256 rows are 3% slower), with
# the branch when there are more than 8 slices. (Tried, slower everywhere: an early `return` for empty slices,
# 15.7 us at 16/8 B=1, which seems to cost the loop its pipelining; the newest token from registers: below.)
# A slice of one tile (short contexts, or few sequences over many slices) skips the loop over its further tiles
# altogether: the software-pipelined loop's prologue and drain cost about as much as the tile itself. Measured
# (H200, 2026-12-03) with the chain of the table above plus the MLP's two GEMVs (qkv GEMV, attention, reduce, o GEMV;
# 28 layers in a CUDA graph with PDL; qwen3-0.6b shapes), us per layer, loop always entered -> skipped when empty
# (num_stages=1, i.e. no pipelining at all, beside it):
#   B, ctx   |     64        |    256        |    2048       |    8192       | B=8, 256      | B=8, 2048
#   skip     | 21.79 -> 20.90 | 21.85 -> 21.25 | 24.67 -> 23.40 | 32.24 -> 32.35 | 35.57 -> 32.91 | 47.16 -> 47.36
#   1 stage  |     20.59     |    21.28      |    23.49      |    33.53      |    32.91      |    49.49
# `bench.py decode-1` (qwen3-0.6b), the previous commit's tree beside, two A/B pairs in one call: 0.72 / 0.72 ->
# 0.69 / 0.69 ms/token greedy, 0.73 / 0.73 -> 0.72 / 0.70 sampled; decode-8 1.12 -> 1.11 ms/step (qwen3-30b-a3b,
# another call: decode-1 2.45 -> 2.42 ms/token); `bench.py offline` 24,044 -> 24,548 tok/s sampled, 24,293 ->
# 25,263 greedy (one run each). Measured and not taken (tables in HISTORY.md's twentieth, twenty-first and thirtieth
# sessions): the newest token's K/V attended from registers (three ways, 0.70-0.75 against 0.69 ms/token), 8 warps,
# attention's slices merged in the o GEMV's prologue instead of a reduce launch (even), the products on CUDA cores.
# Again with two warps (2026-12-04): the fused kernel up to 132 sequences, two warps at 6-8 programs per SM (2 rounds
# of its 4 resident, as the given-q kernel's 4-warp 2 rounds), against today's given q + qk_norm_rope_store (3.0-3.9
# us). `bench.py timeline`, attention us per layer (step span in us, sampled / greedy): qwen3-0.6b, prompts of 700, 112
# sequences 95.5 + 3.0 -> 91.0 (3,809 / 3,767 -> 3,651 / 3,629), 128 100.6 + 3.0 -> 100.2 (3,953 / 3,906 -> 3,916 /
# 3,887); qwen3-8b, 600, 128 88.4 + 3.9 -> 88.9 (8,412 / 8,354 -> 8,458 / 8,323). Up to 4% of a step at 100-132
# sequences of the 0.6b alone (at 4-6 per SM the given-q kernel's one round of two warps stays better): not taken.
FUSED_MAX_BATCH = 64
FUSED_SKIP_EMPTY_SPLITS = 8


def decode_attention_qkv(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping,
                         n_heads: int, n_kv_heads: int, eps: float, block_tables, context_lens, scale):
    """kernels.qk_norm_rope_store then decode_attention (without a shared prefix), in one kernel on the GPU up
    to FUSED_MAX_BATCH sequences: one launch fewer per layer of a decode step. Otherwise the two ops."""
    if _use_triton(qkv) and qkv.shape[0] <= FUSED_MAX_BATCH:
        return decode_attention_triton(None, k_cache, v_cache, block_tables, context_lens, scale,
                                       new=NewTokens(qkv, q_norm_w, k_norm_w, cos_sin, positions, slot_mapping, eps))
    q = qk_norm_rope_store(qkv, q_norm_w, k_norm_w, cos_sin, positions, k_cache, v_cache, slot_mapping, n_heads,
                           n_kv_heads, eps)
    return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
