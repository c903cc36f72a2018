"""Mixture of experts for Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the router, the fused expert kernels,
and their PyTorch reference.

In a MoE layer the MLP is replaced by E experts, each a small SwiGLU MLP of width I (moe_intermediate_size),
and a router that sends every token to k of them:

    x (T, H) -> router logits (T, E) -> softmax in fp32 -> top-k: weights (T, k), expert ids (T, k)
             -> (renormalized to sum 1 when norm_topk_prob) -> sum_j weight_j * expert_{id_j}(x)    (T, H)

`moe_ref` is that, one expert at a time, as transformers computes it; it is the CPU path and the definition.
On the GPU four steps run, none of which waits for the host (so decode runs inside CUDA graphs):
  1. `route`: softmax + top-k + renormalization in one Triton program per token.
  2. `align`: the T*k (token, expert) pairs grouped by expert, each expert's run padded to a multiple of
     BLOCK_M with a sentinel, so that every tile of BLOCK_M rows belongs to one expert (two small kernels:
     each pair counts itself into its expert with an atomic add, then takes its place; align_ref in torch).
  3. two grouped-GEMM launches of `_expert_gemm_kernel`, one program per (row tile, column tile): gate/up with
     silu(gate) * up in the epilogue -> (T*k, I), then down with each pair's routing weight -> (T*k, H).
     A tile of padding (blocks past the last expert's run) exits before it loads anything, so a decode step
     reads only the experts its tokens were routed to.
     A few pairs (a lone decode: k of them) skip steps 2-3's sorting: `_expert_gemv_kernel` streams each pair's
     expert rows as a matrix-vector product, one launch for gate/up and one for down, which also does step 4.
  4. the k rows of each token summed.
(This is the design of vLLM's fused-MoE kernel: one grouped GEMM over tokens sorted by expert.)

Bytes and FLOPs, what bench.py counts: a decode step reads 3 x H x I x 2 bytes per distinct expert routed to,
per MoE layer; a prefill token costs 2 x 3 x H x I x k FLOPs in the experts (the active parameters).

Checkpoint keys: `mlp.gate.weight` (E, H) is the router; `mlp.experts.<e>.{gate,up,down}_proj.weight` are
stacked on load into `mlp.experts.gate_up_proj` (E, 2I, H; gate rows first) and `mlp.experts.down_proj`
(E, H, I), the names transformers uses for its own stacked experts (model.py's loader has the table).

FP8 experts (Qwen's FP8 MoE checkpoints, or --quantization fp8; quant.py): the stacked weights are
float8_e4m3fn with `gate_up_proj_scale_inv` (E, 2I, ceil(H/128)) and `down_proj_scale_inv` (E, H, ceil(I/128)),
one scale per row and 128 columns, as quant.Fp8Linear keeps them. The kernels widen each weight tile to the
activations' dtype and apply the scale of its 128-column block (W8A16), so a decode step reads 1 byte per weight.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import gemv
import quant
from kernels import _use_triton, pdl, tl, triton


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------

class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))   # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))          # (E, H, I)
        self.register_parameter("gate_up_proj_scale_inv", None)     # FP8 experts only (quant.experts_to_fp8)
        self.register_parameter("down_proj_scale_inv", None)


class SparseMoeBlock(nn.Module):
    """Drop-in for model.MLP in the layers that have experts."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num_experts, bias=False)                 # the router
        self.experts = Experts(num_experts, hidden, intermediate)

    # Tried and dropped (H200, 2026-12-02): for one token, the router's GEMV applying the post-attention norm and
    # the route kernel writing norm(h) for the experts, one norm launch fewer per MoE layer. `bench.py decode-1
    # --model qwen3-30b-a3b` in one command: 2.53 ms/token with the norm kernel, 2.55 without (PDL hides the
    # norm's launch; the route kernel's extra work sits on the critical path).
    # Tried and dropped (H200, 2026-12-02): one kernel for the add + norm, the router's GEMV and route (each
    # program norms the row as gemv's norm GEMV does, program 0 writes norm(h) for the experts, and the last
    # program to finish, found by an atomic counter, routes). A CUDA graph of 48 such steps, us per layer:
    # hidden 2048, three kernels 3.88, one kernel 4.77 at its best tile (4 rows x 2048 columns; 5.25-7.96 with
    # others); hidden 4096, 5.11 vs 6.38. `bench.py decode-1 --model qwen3-30b-a3b`, same call: 2.56 ms/token
    # against 2.45: the counter's round trip and the serial route at the end cost more than two PDL launches.
    # Tried and dropped (H200, 2026-12-04): the norm made twice instead, by the router's norm GEMV and inside the
    # gate/up expert GEMV (squares summed beside the products), no norm launch. Same command, two pairs: 2.31 ->
    # 2.47 ms/token, decode-8 8.10 -> 9.69 ms/step (FP8 experts 2.21 -> 2.22).
    def forward(self, x):
        logits = gemv.linear(x, self.gate.weight)                          # (T, E) in the model's dtype
        weights, ids = route(logits, self.top_k, self.norm_topk_prob)         # (T, k) each
        ex = self.experts
        return fused_moe(x, ex.gate_up_proj, ex.down_proj, weights, ids, ex.gate_up_proj_scale_inv,
                         ex.down_proj_scale_inv)                               # (T, H)


# ----------------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------------

def route_ref(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(T, E) router logits -> (T, k) weights in the logits' dtype, (T, k) int64 expert ids (transformers' order:
    softmax in fp32, top-k, renormalize, then cast)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(logits.dtype), ids


def moe_ref(x, gate_up, down, weights, ids, gate_up_scales=None, down_scales=None):
    """x (T, H), gate_up (E, 2I, H), down (E, H, I), weights / ids (T, k) -> (T, H): each expert once, on the
    tokens routed to it (it looks up which on the host: the CPU path). FP8 experts: their scales (the module's
    docstring); each expert is dequantized when used."""
    out = torch.zeros_like(x)
    w = lambda ws, s, e: ws[e] if s is None else quant.dequantize(ws[e], s[e], x.dtype)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        h = F.linear(x[tok], w(gate_up, gate_up_scales, e))                  # (n, 2I)
        g, u = h.chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, w(down, down_scales, e)) * weights[tok, slot, None]   # (n, H)
        out.index_add_(0, tok, y.to(x.dtype))
    return out


# ----------------------------------------------------------------------------------------------------------
# Routing and alignment
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _route_kernel(logits_ptr, w_ptr, id_ptr, E, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False):
    """One program per token: softmax over its E logits, then k rounds of "take the largest, mask it out"
    (the lowest index wins a tie, as torch.topk does in practice)."""
    if USE_GDC:                                        # programmatic dependent launch: see kernels.pdl
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + row * E + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    p = tl.where(offs < E, p, -1.0)
    slots = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        at = tl.min(tl.where(p == best, offs, BLOCK_E), 0)
        w = tl.where(slots == j, best, w)
        ids = tl.where(slots == j, at.to(tl.int64), ids)
        p = tl.where(offs == at, -1.0, p)
    if RENORM:
        w = w / tl.sum(w, 0)
    tl.store(w_ptr + row * TOP_K + slots, w.to(w_ptr.dtype.element_ty), mask=slots < TOP_K)
    tl.store(id_ptr + row * TOP_K + slots, ids, mask=slots < TOP_K)


# One warp per token: the 2 + 2k reductions over E = 128 logits stay in warp shuffles, with no shared-memory round
# trip and barrier each, as with the default 4 warps. `bench.py decode-1 --model qwen3-30b-a3b`, H200, 2026-12-02,
# one GPU call, two runs each, 4 -> 2 -> 1 warps: 2.50 / 2.50 -> 2.49 / 2.49 -> 2.45 / 2.45 ms/token (decode-8
# 8.36 / 8.37 -> 8.34 / 8.35 -> 8.31 / 8.31 ms/step).
ROUTE_WARPS = 1


def route_triton(logits: torch.Tensor, top_k: int, renormalize: bool):
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits.contiguous(), weights, ids, E, TOP_K=top_k, RENORM=renormalize,
                            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                            num_warps=ROUTE_WARPS, **pdl(logits))
    return weights, ids


def align_ref(ids: torch.Tensor, num_experts: int, block_m: int):
    """(T, k) expert ids -> (sorted_pairs, block_expert): sorted_pairs (P,) holds pair indices (token * k + j)
    grouped by expert, each expert's run padded to a multiple of block_m with the sentinel T*k; block_expert
    (P / block_m,) is the expert of each tile, num_experts for tiles past the last run. P is the most the
    padding can need, so the sizes are fixed by T alone (CUDA graphs) and nothing is read back to the host.
    Within a run the pairs are in token order here; any order serves (a tile's rows are computed apart)."""
    n = ids.numel()
    flat = ids.flatten()                                                   # (T*k,) expert of each pair
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))                                    # (E,) pairs per expert
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)                                                # (E,) end of each expert's run
    order = torch.argsort(flat, stable=True)                               # pairs by expert, in token order
    e_sorted = flat[order]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[e_sorted]   # place in its run
    sorted_pairs = torch.full((align_size(n, num_experts, block_m),), n, dtype=torch.int64, device=ids.device)
    sorted_pairs[(ends - padded)[e_sorted] + rank] = order
    tile_start = torch.arange(0, sorted_pairs.numel(), block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, tile_start, right=True)        # num_experts past the last run
    return sorted_pairs, block_expert


def align_size(n: int, num_experts: int, block_m: int) -> int:
    """P: n pairs, and up to block_m - 1 rows of padding for each expert that has any, in whole tiles."""
    return -(-(n + min(n, num_experts) * (block_m - 1)) // block_m) * block_m


# Pair counts are not specialized (do_not_specialize): Triton compiles a kernel again for each class of an int
# argument's value (1, a multiple of 16, other), and a prefill's pair count is any number, so the first prompts
# of a served MoE model each waited on compiles that its start-up had not made: 0.3-1.8 s apiece, 8.5 s over a
# dozen prompts (H200, qwen3-30b-a3b shapes, 2026-12-04). The counts only bound masks.
@triton.jit(do_not_specialize=["n"])
def _align_count_kernel(ids_ptr, counts_ptr, rank_ptr, n, BLOCK: tl.constexpr):
    """Each pair takes the next free place in its expert's run (an atomic add on the expert's count; the
    order within a run is whichever pair came first, which does not matter)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    tl.store(rank_ptr + offs, tl.atomic_add(counts_ptr + e, 1, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["n", "num_tiles"])
def _align_place_kernel(ids_ptr, counts_ptr, rank_ptr, pairs_ptr, block_expert_ptr, n, num_tiles, E,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """From the counts (complete: the launch before made them), every program works out where each expert's
    padded run starts, then writes its BLOCK pairs into their places and the experts of its BLOCK tiles."""
    ex = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)                                                    # (BLOCK_E,)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    start = tl.sum(tl.where(ex[None, :] < e[:, None], padded[None, :], 0), axis=1)     # (BLOCK,) its run's start
    tl.store(pairs_ptr + start + tl.load(rank_ptr + offs, mask=mask, other=0), offs.to(tl.int64), mask=mask)
    tile_start = offs * BLOCK_M                     # the program's tiles: the experts whose runs end at or before
    after = tl.where(ex[None, :] < E, ends[None, :] <= tile_start[:, None], False)      # (BLOCK, BLOCK_E)
    tl.store(block_expert_ptr + offs, tl.sum(after.to(tl.int64), axis=1), mask=offs < num_tiles)


def align_triton(ids: torch.Tensor, num_experts: int, block_m: int, block: int = 128):
    """align_ref in two small kernels (count, place) and two fills instead of a dozen torch ops around a sort:
    H200, 16,384 / 65,536 pairs (2,048 / 8,192 tokens), 119 / 141 us -> 19 / 44 us; `bench.py offline --model
    qwen3-30b-a3b` (a decode step of 256 tokens aligns 2,048 pairs per layer) 5,444 -> 6,115 tok/s greedy."""
    n = ids.numel()
    flat = ids.flatten()                                                   # (T*k,), contiguous
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    rank = torch.empty(n, dtype=torch.int32, device=ids.device)
    pairs = torch.full((align_size(n, num_experts, block_m),), n, dtype=torch.int64, device=ids.device)
    num_tiles = pairs.numel() // block_m
    block_expert = torch.empty(num_tiles, dtype=torch.int64, device=ids.device)
    if n == 0:
        return pairs, block_expert
    _align_count_kernel[(triton.cdiv(n, block),)](flat, counts, rank, n, BLOCK=block)
    _align_place_kernel[(triton.cdiv(max(n, num_tiles), block),)](
        flat, counts, rank, pairs, block_expert, n, num_tiles, num_experts, BLOCK_M=block_m,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK=block)
    return pairs, block_expert


# ----------------------------------------------------------------------------------------------------------
# The grouped GEMM
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _dequantize_tile(w, s_ptrs, mask, dtype: tl.constexpr):
    """An FP8 weight tile (BLOCK_K, BLOCK_N) in one 128-column scale block, times each column's scale, rounded to
    the activations' dtype: quant.dequantize's weights. Scaling the tile, not the product, lets the dots chain on
    one accumulator, which the tensor cores pipeline. H200, 2026-12-02, `bench.py offline --model qwen3-30b-a3b
    --quantization fp8 --repeat 1`: 5,258 tok/s sampled when each k step's product was scaled (below the bf16
    model's 6,216 that session), 6,584 with the tile scaled."""
    return (w.to(tl.float32) * tl.load(s_ptrs, mask=mask, other=0.0)[None, :]).to(dtype)


@triton.jit(do_not_specialize=["num_pairs"])
def _expert_gemm_kernel(a_ptr, w_ptr, s_ptr, out_ptr, pairs_ptr, block_expert_ptr, weights_ptr, N, K, KB,
                        num_pairs, num_experts, stride_a, stride_we, stride_wn, stride_se, stride_out,
                        A_ROWS_PER_PAIR: tl.constexpr, GATE_UP: tl.constexpr, WEIGHTED: tl.constexpr,
                        SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program m * n_tiles + n: the BLOCK_M pairs of tile m, all routed to one expert e, times columns n of e's
    weight.
    Row r of A is pair // A_ROWS_PER_PAIR (k: the token's hidden state; 1: the pair's own intermediate row).
    GATE_UP: the weight holds 2N rows (gate, then up): two accumulators, out = silu(gate) * up.
    WEIGHTED: out *= the pair's routing weight. SCALED: FP8 weights, s_ptr their (E, rows, KB) scales; a k step
    (BLOCK_K divides 128) lies in one scale block, so each column of its weight tile takes one scale."""
    # Programs in launch order walk a row tile's column tiles first: the tile's A rows (gathered token rows, or
    # the pairs' intermediate rows, which outgrow L2 at prefill sizes) are read from memory once and then hit in
    # L2, and an expert's weight columns are shared by its few row tiles, which run in the same wave. H200,
    # 30b-a3b, us at 65,536 / 16,384 pairs, column tiles first vs row tiles first (a 2-D grid): gate/up 946 vs
    # 973 / 325 vs 332, down 520 vs 556 / 186 vs 234.
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:                       # a tile of padding past the last expert's run
        return
    pairs = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = tl.where(valid, pairs // A_ROWS_PER_PAIR, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + offs_k[None, :]                                # (BM, BK)
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]   # (BK, BN)
    s_row = s_ptr + e.to(tl.int64) * stride_se + offs_n * KB                                  # (BN,)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
        if SCALED:
            w = _dequantize_tile(w, s_row + k0 // 128, offs_n < N, a.dtype)
        acc += tl.dot(a, w)
        if GATE_UP:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
            if SCALED:
                w_up = _dequantize_tile(w_up, s_row + N * KB + k0 // 128, offs_n < N, a.dtype)
            acc_up += tl.dot(a, w_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _expert_gemv_kernel(a_ptr, w_ptr, s_ptr, out_ptr, ids_ptr, weights_ptr, N, K, KB, stride_a, stride_we,
                        stride_se, PAIRS: tl.constexpr, PAIRS_P2: tl.constexpr, A_ROWS_PER_PAIR: tl.constexpr,
                        GATE_UP: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        USE_GDC: tl.constexpr = False):
    """The few-token path (a lone decode): program (p, n) multiplies input rows by rows n of their experts'
    weights, no sorting and no tiles of padding. Two pairs on one expert read it twice, which costs less than
    aligning while pairs are few (table at moe_config). Products pile up in an fp32 tile reduced once, as
    gemv._gemv_kernel does.
    GATE_UP (PAIRS = 1): p is a pair; its token's row (A_ROWS_PER_PAIR = k pairs per token) times the expert's
    gate and up rows, silu(gate) * up out. Otherwise (down, PAIRS = k): p is a token, and the program's tile
    holds rows n of all k experts of its pairs (PAIRS_P2 * BLOCK_N rows: every expert's chunk in flight at
    once), each times its pair's input scaled by the routing weight, so the weighted sum over the experts comes
    out of one accumulator (no (T*k, H) rows, no summing kernel). SCALED: FP8 weights; each 16 products are
    summed before their 128-column block's scale multiplies them, as in gemv._gemv_kernel (BLOCK_K >= 16).
    USE_GDC (see kernels.pdl): launched early; nothing is loaded before the wait, since the router's output
    names the expert whose weights are read."""
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    R: tl.constexpr = PAIRS_P2 * BLOCK_N
    r = tl.arange(0, R)                                # tile row r: pair r // BLOCK_N, weight row n0 + r % BLOCK_N
    j = r // BLOCK_N
    rows = tl.program_id(1) * BLOCK_N + r % BLOCK_N
    row_mask = (rows < N) & (j < PAIRS)
    pair = tl.program_id(0) * PAIRS + j                                                  # (R,)
    e = tl.load(ids_ptr + pair, mask=row_mask, other=0).to(tl.int64)
    a_rows = a_ptr + (pair // A_ROWS_PER_PAIR).to(tl.int64)[:, None] * stride_a          # (R, 1)
    w_rows = w_ptr + e[:, None] * stride_we + rows[:, None].to(tl.int64) * K
    s_experts = s_ptr + e[:, None] * stride_se                                           # (R, 1): FP8 scales
    route_w = 1.0
    if not GATE_UP:
        route_w = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    ACC_K: tl.constexpr = BLOCK_K // 16 if SCALED else BLOCK_K     # FP8: products summed by 16 (gemv._products)
    acc = tl.zeros((R, ACC_K), dtype=tl.float32)
    acc_up = tl.zeros((R, ACC_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0)
        s = gemv._block_scales(s_experts, rows, k0, KB, row_mask, R, BLOCK_K, SCALED)
        x = tl.load(a_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * route_w   # (R, BLOCK_K), L1 hits
        acc += gemv._products(w, x, s, R, BLOCK_K, SCALED)
        if GATE_UP:
            w = tl.load(w_rows + N * K + cols[None, :], mask=mask, other=0.0)
            s = gemv._block_scales(s_experts, rows + N, k0, KB, row_mask, R, BLOCK_K, SCALED)
            acc_up += gemv._products(w, x, s, R, BLOCK_K, SCALED)
    y = tl.sum(tl.reshape(tl.sum(acc, axis=1), (PAIRS_P2, BLOCK_N)), axis=0)                 # (BLOCK_N,)
    if GATE_UP:
        y = y / (1.0 + tl.exp(-y)) * tl.sum(acc_up, axis=1)
    out_rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + tl.program_id(0) * N + out_rows, y.to(out_ptr.dtype.element_ty), mask=out_rows < N)


# ms per fused MoE call, E=128, k=8, bf16, H200 (bench.py kernels; graph replays, weights past L2; the gemv rows
# are the few-token kernel before its 2026-12-02 rework, below):
#   pairs (tokens x 8) |   8    |   16   |   32   |   64   |  2048  | 16384  | 65536
#   30b-a3b  gemv      | 0.0353 | 0.0577 | 0.0987 | 0.1734 |        |        |
#            sorted    | 0.0675 | 0.0948 | 0.1275 | 0.1741 | 0.397  | 0.702  | 1.990
#   235b     gemv      | 0.0983 | 0.1722 | 0.3212 | 0.5852 |        |        |
#            sorted    | 0.1316 | 0.1989 | 0.3202 | 0.5040 | 1.266  | 2.313  | 6.693
# "sorted" at each size is the best of a sweep of tiles (BLOCK_M 16-128, BLOCK_N 64-256, BLOCK_K 64-128, 4-8
# warps, 3-4 stages); the tiles below are those winners (within 5%). At 2048 pairs 64x128x64 gave 0.416 / 1.358,
# at 16384 and 65536 it gave 0.780 / 2.104 (30b) and 2.644 / 7.873 (235b). 8-row tiles (Triton pads the product
# itself) at 72-1,024 pairs, 30b-a3b, H200, 2026-12-04: within 2% of 16 (e.g. 128 pairs 207.6 vs 208.9 us): not taken.
# Prefill (past 4096 pairs) again with the launches apart, H200, 2026-12-02, us at 16384 / 65536 pairs (30b-a3b),
# BLOCK_M/N/K/warps/stages; until then both launches used 128/128/64/8/3 (gate/up 372 / 1010, down 239 / 690):
#   gate/up: 128/128/64/8/4 351 / 1005 | 128/64/128/8/3 404 / 1230 | 128/128/32/8/5 451 / 1039
#   down:    128/256/64/8/3 221 /  570 | 128/256/64/8/4 219 /  583 | 128/128/128/8/3 254 / 746 | 64/256/64/4/3 264 / 773
# (the down GEMM's K is only I = 768 deep: wider tiles halve the programs that each fill and drain a pipeline).
# Beside them: align 119 / 141 us as torch ops (align_ref), 19 / 44 us in align_triton; the sum over k 30 / 100.
# The few-token path, H200, 2026-12-02, us per fused call (graph replays of PDL launches, weights past L2), before
# -> after (gate/up 1/1024/4, i.e. BLOCK_N/BLOCK_K/warps; down summing a token's k experts in one tile of k rows,
# 1/128/4; PDL; no summing kernel). Before: 4/512/4 for both, one down program per pair, then a torch sum:
#   tokens        |      1       |       2       |       4
#   30b-a3b bf16  | 35.7 -> 26.0 |  59.0 -> 41.9 |  97.6 ->  72.1
#   30b-a3b FP8   | 29.0 -> 24.3 |  47.3 -> 39.1 |  79.3 ->  70.3
#   235b bf16     | 99.0 -> 76.5 | 168.1 -> 135.7 | 314.8 -> 254.3
#   235b FP8      | 74.5 -> 62.7 | 126.9 -> 115.2 | 239.3 -> 219.8
# Each launch alone, 30b-a3b, 1 token: gate/up 1/1024/4 17.6 us, 2/512/4 18.6, 1/1024/2 19.6, 1/2048/4 20.6,
# 4/512/4 23.4; down 1/128/4 12.1, 1/128/8 13.4, 1/64/4 14.0, 1/128/2 14.1, 1/256/2 14.2, 2/256/4 14.0, 4/256/4 14.7,
# and 19.2 with 4/512/4 looping over the pairs one expert at a time (one chunk in flight per program). The
# winners are the same at 2 and 4 tokens and on 235b. Nothing is loaded before gdc_wait: the router's output
# names the expert. (Tried and dropped, H200, 2026-12-02: gate/up signalling the down launch only after its own
# wait, so that down reads the ids (.cg loads) and its first weight chunk before its wait, the K loop peeled for
# it: `bench.py decode-1 --model qwen3-30b-a3b` 2.61 / 2.62 ms/token against 2.45 in the same call, decode-8
# 8.96 against 8.35 ms/step.) `bench.py decode-1 --model qwen3-30b-a3b`: 3.28 ms/token before, 3.11 with PDL and the
# in-kernel sum at 4/512/4, 2.60 with these tiles.
# Where the few-token path stops paying, same harness, us per call: pairs  |  32   |  48   |  64
#   30b-a3b gemv (before: 97.2 / 135.5 / 175.2)                            |  73.0 | 100.8 | 129.5
#           sorted tiles                                                  | 114.3 | 154.1 | 175.8
#   235b    gemv (before: 312.5 / 463.0 / 583.3)                           | 250.8 | 378.9 | 462.0
#           sorted tiles                                                  | 303.3 | 432.1 | 482.8
# so 8 decoding tokens (64 pairs) take it too: qwen3-30b-a3b's decode-8 row went 10.57 -> 8.37 ms/step.
GEMV_MAX_PAIRS = 64
# Tried and dropped (H200, 2026-12-04; scratch chains of 16 MoE layers, router GEMV -> route -> gate/up -> down, in a
# CUDA graph with PDL, 30b-a3b shapes, us per layer): (1) gate/up with a token's k experts in one program (the down
# launch's layout: (T, I / BLOCK_N) programs, the token's row loaded once): 1 token 24.8 today against 26.3-29.9
# over 18 tiles (BLOCK_N 1-4 x BLOCK_K 256-1024 x 4-8 warps); 8 tokens 114.7 -> 103.9 (2/256/4), yet `bench.py
# decode-1 --model qwen3-30b-a3b`'s decode-8 only 8.16 -> 8.05 ms/step and decode-1 2.25 -> 2.32 ms/token with it at
# one token too; FP8 experts, 1 token, 20.8 -> 19.1 at best. (2) The route made inside that gate/up launch (each
# program takes its token's top-k from the 128 logits; program (t, 0) writes them for the down launch), no route
# launch: 24.7 -> 27.5-66.2 us per layer; decode-1 2.24 / 2.24 -> 2.37 / 2.37 ms/token (two pairs, one call): the
# top-k's reductions sit in every program before its first weight load, where the route launch costs less.


def moe_config(num_pairs: int) -> dict:
    """Tile sizes by the number of (token, expert) pairs: a lone decode streams each pair's expert (gemv); decode
    batches have a few pairs per expert, so small row tiles waste little on padding; prefill fills 128-row tiles."""
    if num_pairs <= GEMV_MAX_PAIRS:
        return dict(GEMV=True, BLOCK_N=1, BLOCK_K=1024, num_warps=4, DOWN=dict(BLOCK_N=1, BLOCK_K=128, num_warps=4))
    if num_pairs <= 1024:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    if num_pairs <= 4096:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4,
                DOWN=dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3))


def moe_triton(x, gate_up, down, weights, ids, gate_up_scales=None, down_scales=None, config: dict | None = None):
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    I, k = two_i // 2, ids.shape[1]
    n = T * k
    cfg = dict(config or moe_config(n))
    gemv_path = cfg.pop("GEMV", False)
    down_tiles = cfg.pop("DOWN", {})
    down_cfg = {**cfg, **down_tiles}                   # the down launch's own tiles, where the config has them
    if not x.is_cuda:                          # the CPU interpreter: tl.dot wants tiles of 16 and up, no stages
        cfg.pop("num_stages", None)
        down_cfg.pop("num_stages", None)
    x, weights, ids = x.contiguous(), weights.contiguous(), ids.contiguous()
    scaled = gate_up_scales is not None
    su, sd = (gate_up_scales, down_scales) if scaled else (gate_up, down)   # unused pointers when not scaled
    if gemv_path:
        inter = torch.empty(n, I, dtype=x.dtype, device=x.device)                   # (T*k, I)
        _expert_gemv_kernel[(n, triton.cdiv(I, cfg["BLOCK_N"]))](
            x, gate_up, su, inter, ids, weights, I, H, su.shape[-1], x.stride(0), gate_up.stride(0), su.stride(0),
            PAIRS=1, PAIRS_P2=1, A_ROWS_PER_PAIR=k, GATE_UP=True, SCALED=scaled, **cfg, **pdl(x))
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)                     # (T, H): summed in the kernel
        _expert_gemv_kernel[(T, triton.cdiv(H, down_cfg["BLOCK_N"]))](
            inter, down, sd, out, ids, weights, H, I, sd.shape[-1], inter.stride(0), down.stride(0), sd.stride(0),
            PAIRS=k, PAIRS_P2=triton.next_power_of_2(k), A_ROWS_PER_PAIR=1, GATE_UP=False, SCALED=scaled,
            **down_cfg, **pdl(x))
        return out
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    down_cfg.pop("BLOCK_M")                            # the tiles of rows are align's, the same for both
    dn_n, dn_k = down_cfg.pop("BLOCK_N"), down_cfg.pop("BLOCK_K")
    assert not scaled or 128 % bk == 0 and 128 % dn_k == 0, "FP8 experts: BLOCK_K must divide the 128-column blocks"
    pairs, block_expert = align_triton(ids, E, bm)
    inter = torch.empty(n, I, dtype=x.dtype, device=x.device)                       # (T*k, I)
    _expert_gemm_kernel[(block_expert.numel() * triton.cdiv(I, bn),)](
        x, gate_up, su, inter, pairs, block_expert, weights, I, H, su.shape[-1], n, E, x.stride(0),
        gate_up.stride(0), gate_up.stride(1), su.stride(0), inter.stride(0), A_ROWS_PER_PAIR=k, GATE_UP=True,
        WEIGHTED=False, SCALED=scaled, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **cfg)
    out = torch.empty(n, H, dtype=x.dtype, device=x.device)                         # (T*k, H)
    _expert_gemm_kernel[(block_expert.numel() * triton.cdiv(H, dn_n),)](
        inter, down, sd, out, pairs, block_expert, weights, H, I, sd.shape[-1], n, E, inter.stride(0),
        down.stride(0), down.stride(1), sd.stride(0), out.stride(0), A_ROWS_PER_PAIR=1, GATE_UP=False,
        WEIGHTED=True, SCALED=scaled, BLOCK_M=bm, BLOCK_N=dn_n, BLOCK_K=dn_k, **down_cfg)
    return out.view(T, k, H).sum(1)


# ----------------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------------

def route(logits, top_k: int, renormalize: bool):
    return route_triton(logits, top_k, renormalize) if _use_triton(logits) else route_ref(logits, top_k, renormalize)


def fused_moe(x, gate_up, down, weights, ids, gate_up_scales=None, down_scales=None):
    """On CUDA always the Triton path: the reference asks the host which experts were hit (a sync per layer,
    no CUDA graphs), so it cannot win inside a decode step. The scales: FP8 experts (None: unquantized)."""
    f = moe_triton if _use_triton(x) else moe_ref
    return f(x, gate_up, down, weights, ids, gate_up_scales, down_scales)
