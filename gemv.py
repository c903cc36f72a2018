"""The projections of the forward pass, y = x @ weight^T, for the few-token shapes of decoding.

    y = gemv.linear(x, weight)                        # what model.Linear calls
    y, h = gemv.norm_linear(x, residual, norm_w, eps, weight)   # add + RMSNorm, then the projection
    a = gemv.linear(x, gate_up_w, silu_mul=True)      # the MLP's gate_up projection, then SiLU(gate) * up
    h, _ = gemv.linear_add(x, weight, residual)       # the projection, then the residual add

A lone decode step is all small matrix-vector products, where cuBLAS's GEMM kernels leave bandwidth unused, so
one token goes through a Triton GEMV (`_gemv_kernel`), which can also make its input on the fly (the RMSNorm
before it), apply the MLP's SiLU(gate) * up to its output and add the residual after it: a decoder layer's
norms, activation and adds need no kernels of their own. The same GEMV streams FP8 weights (quant.py's
format, `linear_triton(..., scales=)`: W8A16, a quant.Fp8Linear's one token) with the same norm, SiLU and add.
From 2 to 16 tokens (small decode batches, speculative verify passes) a skinny GEMM (`_skinny_gemm_kernel`,
with the same norm, SiLU(gate) * up and add) reads each weight once for all rows of every projection but
lm_head; beyond that, and on the CPU, cuBLAS / PyTorch (`linear_ref`, the definition). As in kernels.py: a
reference, Triton kernels, dispatchers with their measured tables; QWEN3_KERNELS and programmatic dependent
launch (`kernels.pdl`) apply here too.
"""
import torch
import torch.nn.functional as F

import kernels
from kernels import _num_sms, _use_triton, add_rms_norm, pdl, rms_norm, tl, triton


def linear_ref(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N): the projections (no biases in Qwen3). out: write there instead."""
    return F.linear(x, weight) if out is None else torch.matmul(x, weight.t(), out=out)


@triton.jit
def _gemv_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, cols, col_mask, first, NORM: tl.constexpr,
                HAS_RES: tl.constexpr):
    # One BLOCK_K chunk of _gemv_kernel's input in fp32, and (NORM) the squares of h for its rstd.
    dtype = x_ptr.dtype.element_ty
    if NORM:
        h = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        if HAS_RES:
            h = (h.to(tl.float32) + tl.load(res_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + cols, h, mask=col_mask & first)
        h = h.to(tl.float32)
        sq = h * h
        x = h * tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        sq = x * 0.0
    return x, sq


@triton.jit
def _silu_mul_out(gate, up, dtype: tl.constexpr):
    """silu(gate) * up from fp32 products, rounded as silu_mul_ref rounds the projection's output."""
    gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
    return (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up


@triton.jit
def _block_scales(s_ptr, w_rows, k0, KB, row_mask, R: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    """FP8 (SCALED): the (R, BLOCK_K // 16) scales of weight rows w_rows, columns k0 .. k0 + BLOCK_K in groups
    of 16 (a group lies in one 128-column block; KB scales a row); else nothing (a zero)."""
    if SCALED:
        blocks = (k0 + 16 * tl.arange(0, BLOCK_K // 16)) // 128
        return tl.load(s_ptr + w_rows[:, None] * KB + blocks[None, :],
                       mask=row_mask[:, None] & (blocks < KB)[None, :], other=0.0)
    else:
        return 0.0


@triton.jit
def _products(w, x, s, R: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    """A chunk's products w * x in fp32, (R, BLOCK_K) (x: the chunk's input, broadcast to w's shape); SCALED: summed
    by 16 columns, times their scales s, (R, BLOCK_K // 16). moe.py's expert GEMV uses it too."""
    p = w.to(tl.float32) * x
    if SCALED:
        p = tl.sum(tl.reshape(p, (R, BLOCK_K // 16, 16)), axis=2) * s
    return p


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, res_ptr, norm_w_ptr, res_out_ptr, eps, add_ptr, s_ptr, KB,
                 NORM: tl.constexpr, HAS_RES: tl.constexpr, ADD: tl.constexpr, SILU_MUL: tl.constexpr,
                 SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False):
    # One token (M = 1, a lone decode): out[n] = sum_k x[k] * w[n, k]. Bytes: the weight, N*K elements read
    # once; 2 FLOPs per element is nothing, so the floor is weight bytes / bandwidth. cuBLAS's GEMM kernels
    # reach less of it at M = 1 on Qwen3's small matrices (table at `linear`). Each program owns BLOCK_N rows
    # of w and streams them in BLOCK_K chunks; products pile up in an (R, BLOCK_K) fp32 tile that is reduced
    # once at the end, so the loop body is loads and FMAs only.
    # SILU_MUL: w is gate_up (2N rows, gate rows first) and out is silu(gate) * up (N wide): the program's tile
    # holds gate rows n and, below them, up rows N + n (R = 2 * BLOCK_N), so each activation is made once, here,
    # and the down projection reads a plain input (no activation kernel, no activation redone by its programs).
    # NORM: the input is rms_norm(h) * norm_w with h = x (+ res when HAS_RES), in one pass: the products
    # use h * norm_w, the squares of h are summed beside them, and the row sums are scaled by rstd at the end
    # (rms_norm_ref rounds h * rstd to the dtype first; here it stays fp32, so the results differ by about one
    # rounding). Every program reads the whole row (K elements, from L2) and program 0 writes h to res_out (the
    # residual stream onward). That is one kernel instead of two per norm.
    # ADD: out = (x @ w^T) + add, the product rounded to the dtype before the add as a separate add would round
    # it: o_proj and down_proj add the residual stream here, so the norm GEMV after them reads one row (h) and
    # not two (the product and the residual).
    # SCALED: w is FP8 (quant.py's format: w[n, k] * s[n, k // 128], KB scales a row): each 16 products are summed
    # before their block's scale multiplies them (`_products`), so a weight costs a convert and an FMA, as bf16's.
    # USE_GDC (programmatic dependent launch, see `pdl`): the first weight chunk is loaded before waiting for
    # the kernel before (no kernel writes weights), so it streams while that kernel finishes.
    pid = tl.program_id(0)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    R: tl.constexpr = 2 * BLOCK_N if SILU_MUL else BLOCK_N
    r = tl.arange(0, R)
    if SILU_MUL:
        rows = pid * BLOCK_N + r % BLOCK_N             # output rows; tile rows BLOCK_N.. read the up rows
        w_row_ids = rows + (r // BLOCK_N) * N
    else:
        rows = pid * BLOCK_N + r
        w_row_ids = rows
    w_rows = w_ptr + w_row_ids[:, None].to(tl.int64) * K
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    col_mask = cols < K
    w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    s = _block_scales(s_ptr, w_row_ids, 0, KB, row_mask, R, BLOCK_K, SCALED)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    if ADD:     # loaded now, used after the reduction: issued there, its round trip came after the barriers (SASS)
        add = tl.load(add_ptr + rows, mask=row_mask).to(tl.float32)
    first = cols * 0 + pid == 0                        # program 0 writes the residual (a tensor mask)
    x, ss = _gemv_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, cols, col_mask, first, NORM, HAS_RES)
    acc = _products(w, x[None, :], s, R, BLOCK_K, SCALED)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        # the weights before the input: FP8's input changes layout through shared memory (a barrier), and loads
        # issued before it fly across it (an 8b FP8 layer 58.4 -> 56.8 us; bf16 layers the same or 1% faster)
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        s = _block_scales(s_ptr, w_row_ids, k0, KB, row_mask, R, BLOCK_K, SCALED)
        x, sq = _gemv_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, cols, col_mask, first, NORM, HAS_RES)
        ss += sq
        acc += _products(w, x[None, :], s, R, BLOCK_K, SCALED)
    out = tl.sum(acc, axis=1)                                                            # (R,)
    if NORM:
        out = out * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if SILU_MUL:
        gate, up = tl.split(tl.trans(tl.reshape(out, (2, BLOCK_N))))                     # (BLOCK_N,) each
        out = _silu_mul_out(gate, up, out_ptr.dtype.element_ty)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
    if ADD:
        out = out.to(out_ptr.dtype.element_ty).to(tl.float32) + add
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)


# Swept on an H100 (BLOCK_N 2-32, BLOCK_K 128-1024, 2-8 warps) over the 0.6b and 8b shapes: two rows per
# program and the longest K chunks were best or within 8% of the best on every shape (narrow rows = many
# programs); chunks past 1,024 columns were first tried later (the second table).
# With the norm each program also reads the whole input row, so fewer, wider programs win. H200, bf16, us per
# call (weights rotated past L2), BLOCK_N/BLOCK_K/warps:
#   K -> N            |       | 2/1024/4 | 4/1024/4 | 8/1024/4 | 8/512/4 | 16/512/8 | 1/1024/4
#   0.6b qkv 1024->4096   | plain |   4.2    |   4.6    |   4.6    |   6.2   |   6.2    |   5.0
#                         | norm  |   6.4    |   5.8    |   5.4    |   5.4   |   5.9    |   7.0
#   0.6b gate_up 1024->6144 plain |   5.5    |   6.7    |   7.1    |   6.8   |   6.8    |   6.2
#                         | norm  |   8.2    |   8.4    |   7.5    |   6.6   |   7.1    |   9.0
#   8b qkv 4096->6144     | plain |  15.0    |  18.5    |  19.1    |  19.1   |  19.4    |  15.5
#                         | norm  |  21.7    |  22.8    |  18.5    |  17.8   |  18.0    |  22.5
#   8b gate_up 4096->24576| plain |  51.0    |  57.5    |  60.1    |  65.5   |  68.1    |  52.3
#                         | norm  |  64.8    |  67.0    |  54.6    |  56.2   |  57.2    |  72.7
# The norm costs 1-4 us per call and saves an RMSNorm launch (1.5-2 us) and its gap: decode-1 1.00 -> 0.95 ms
# (0.6b), 4.90 -> 4.87 ms (8b); with 4 rows per program it was 5.55 ms on the 8b.
# Without the norm, chunks as long as the row (up to 4096; BLOCK_K is cut to the row's power of two) put a
# program's whole weight slice in flight at once, before gdc_wait: H200, 2026-12-02, us per call in a PDL chain
# of calls (CUDA graph, weights rotated past L2), BLOCK_N/BLOCK_K/warps:
#   K -> N                      | 2/1024/4 | 2/2048/4 | 2/4096/4 | 2/2048/8 | 4/2048/8 | 4/4096/8 | 1/4096/4
#   0.6b o      2048->1024      |    2.9   |    2.3   |    2.3   |    2.4   |    2.3   |    2.3   |    2.5
#   0.6b down   3072->1024 silu |    5.1   |    5.5   |    4.3   |    5.4   |    5.1   |    3.8   |    5.7
#   0.6b lm_head 1024->151936   |   95.5   |   95.6   |   95.5   |  107.2   |   92.1   |   92.2   |  185.6
#   1.7b o      2048->2048      |    3.7   |    3.6   |    3.6   |    4.5   |    3.6   |    3.6   |    4.2
#   1.7b down   6144->2048 silu |   13.3   |   11.1   |   12.9   |   10.8   |    9.0   |   10.4   |   18.5
#   8b o        4096->4096      |   10.6   |   10.9   |   10.4   |   10.1   |   11.0   |   10.9   |   10.2
#   8b down    12288->4096 silu |   37.5   |   38.6   |   37.8   |   31.8   |   31.9   |   30.5   |   56.9
# The same run with the norm (qkv, gate_up) kept 8/1024/4: 8/512/4 was 0.8 us slower on 0.6b qkv (5.0 vs 4.2)
# and 0.6 faster on its gate_up, 4/4096/8 and 8/4096/8 were slower on every shape. `bench.py decode-1`, 2/1024/4
# -> 4/4096/8 in one command: qwen3-0.6b 0.85 -> 0.79 ms/token, qwen3-8b 4.65 -> 4.40 ms/token.
# lm_head alone (H200, 2026-12-02, same harness), 1024 -> 151,936: 4/4096/8 92.2 us, 8/1024/8 87.9, 8/1024/4
# 75.1, 16/1024/8 84.6; at 2,048 and 4,096 columns 4/4096/8 stays best (147.7, 286.3 us; 8/1024/4 154.2, 301.7).
# Yet 8/1024/4 for qwen3-0.6b's lm_head left `bench.py decode-1` where it was (0.754 ms/token against 0.746-0.751
# in four runs before), so one config serves every plain GEMV.
# The norm GEMV again once o_proj and down_proj add the residual (linear_add; it reads h and the norm weight):
# 8/1024/4 best or within 0.3 us on every shape (0.6b qkv 3.8 us, gate_up 5.7; 1.7b gate_up 13.9; 8b qkv 15.0,
# gate_up 51.0) against 4/4096/8, 4/2048/8, 8/2048/8, 4/1024/4 and 8/512/4 (up to 1.7x slower on the 8b).
# SiLU(gate) * up moved from the down projection's input (each of its programs redid the whole row's activation)
# to the gate_up projection's output (H200, 2026-12-02, same harness, us per call; BLOCK_N/BLOCK_K/warps):
#   gate_up + norm + SiLU  | 2/1024/4 | 4/1024/4 | 4/2048/4 | 4/2048/8 | 2/2048/4 | 4/512/4 | (norm alone, 8/1024/4)
#   8b   4096->24576       |   58.1   |   51.1   |   59.1   |   90.0   |   55.6   |  54.3   |   50.8
#   0.6b 1024->6144        |    5.7   |    5.7   |    5.7   |    6.8   |    5.7   |   5.6   |
# (tile rows: the BLOCK_N gate rows, then their up rows; gate and up rows alternating was 2.6 us slower on the 8b).
# The plain GEMV again, now that no projection makes its input (o_proj, down_proj with the residual add; lm_head):
#   K -> N                 | 4/4096/8 | 2/4096/4 | 2/4096/8 | 1/4096/4 | 4/2048/4
#   8b   down 12288->4096  |   28.7   |   26.3   |   37.3   |   29.1   |   26.0
#   8b   o     4096->4096  |   12.1   |   11.6   |   12.3   |   11.4   |   10.0
#   30b  o     4096->2048  |    6.6   |    6.6   |    7.1   |    6.7   |    5.6
#   0.6b o     2048->1024  |    2.8   |    2.7   |    2.6   |    2.7   |    2.8
#   0.6b lm_head 1024->151936 | 91.9  |   95.4   |  107.1   |  185.4   |   74.9
#   8b   lm_head 4096->151936 | 286.4 |  281.0   |  296.2   |  279.9   |  280.0
# (the old down with the activation on its input: 30.5 us on the 8b at 4/4096/8, 3.8 on the 0.6b.) Both changes,
# `bench.py decode-1` in one GPU call, the old tree beside: qwen3-0.6b 0.73 -> 0.72 ms/token (decode-8 1.30 ->
# 1.24 ms/step: no silu_mul launch), qwen3-8b 4.22 -> 4.00, qwen3-30b-a3b 2.54 -> 2.51.
# Is a lone GEMV bound by DRAM? The same calls with the weight in L2 (H200, 2026-12-03, 24 calls chained with PDL
# in a CUDA graph, us per call: weights rotated past L2 / one weight, hot in L2 / rotated, each call also asking
# the L2 for the next call's weight with Hopper's bulk prefetch, cp.async.bulk.prefetch.L2):
#   0.6b o       2048 -> 1024, + add           | 2.11 / 1.88 / 2.15
#   0.6b down    3072 -> 1024, + add           | 3.07 / 2.46 / 3.12
#   0.6b qkv     1024 -> 4096, + norm          | 3.52 / 2.83 / 3.74
#   0.6b gate_up 1024 -> 6144, + norm, SiLU    | 5.28 / 4.02 / 5.74
# From L2 it is only 11-24% faster: its time is its latency chain (wait, load, reduce, store). So pulling weights
# into L2 ahead of use (each decode-chain kernel prefetching a later kernel's weight as it starts) lost in the
# engine, `bench.py decode-1`: qwen3-0.6b 0.72 -> 0.73-0.77 ms/token over six schedules (attention prefetching
# o_proj, gate_up or both; each GEMV the next weight; capped at 4 MB), qwen3-1.7b 1.19 -> 1.61 and qwen3-8b 4.01
# -> 5.68 (weights beyond L2's 50 MB, read twice). Not taken.
# Tried and dropped (H200, 2026-12-04): warps along the rows instead of along K (a (rows, BLOCK_K / 256, 256) tile,
# the input loaded at that shape with a zero row stride), so that every reduction stays inside a warp (one barrier
# in the compiled kernel, against 5-6 here). Same harness, us per call, today's kernel -> the best of 6-7 tiles:
# 0.6b qkv 3.85 -> 4.32, o 2.71 -> 2.42, gate_up 5.83 -> 6.46, down 3.56 -> 3.51; 1.7b qkv 5.20 -> 7.24, o 3.67 ->
# 3.43, down 7.33 -> 11.13; 8b qkv 14.98 -> 18.12, o 9.95 -> 10.70, gate_up 51.04 -> 65.93, down 25.56 -> 29.67. A
# layer's four projections in one graph (each at its best tile), us per layer: 0.6b 13.4 -> 14.7, 1.7b 27.8 ->
# 38.6, 8b 93.7 -> 115.5.
GEMV_CONFIG = dict(BLOCK_N=4, BLOCK_K=2048, num_warps=4)
NORM_GEMV_CONFIG = dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)
NORM_SILU_GEMV_CONFIG = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4)   # gate_up: 2 x BLOCK_N weight rows per program
# FP8 weights (SCALED, quant.Fp8Linear at one token). Before, FP8 had a GEMV of its own in quant.py that applied
# each weight's scale before its FMA (a multiply and an FMA per weight) and took no norm, SiLU or add, so a layer
# ran 7 kernels (two add + RMSNorm and a silu_mul beside the 4 GEMVs). H200, 2026-12-04, us per call in a PDL
# chain (CUDA graph, weights rotated past L2), the old path (its GEMV + the kernels it needed) -> this kernel at
# BLOCK_N/BLOCK_K/warps (chosen: 8/1024/4 with the norm, 4/2048/4 with SiLU, 4/2048/4 with the add or plain):
#   K -> N                       | old   | 4/1024/4 | 8/1024/4 | 4/2048/4 | 8/2048/4 | 4/4096/4 | 16/1024/8
#   8b   qkv 4096->6144 +norm    | 11.59 |          |   9.09   |          |  10.90   |  11.66   |  10.01
#   8b   o   4096->4096 +add     |  7.88 |   6.72   |          |   5.47   |   5.61   |   7.19   |
#   8b   gate_up ->24576 +silu   | 38.18 |  32.14   |  31.71   |  30.99   |          |  36.43   |
#   8b   down 12288->4096 +add   | 19.51 |  16.96   |          |  14.56   |  14.96   |  15.80   |
#   1.7b qkv 2048->4096 +norm    |  6.07 |          |   4.69   |          |   4.45   |   5.32   |   5.01
#   1.7b gate_up ->12288 +silu   | 14.25 |   9.49   |  10.24   |  10.18   |          |  10.17   |
#   1.7b down 6144->2048 +add    |  6.15 |   8.29   |          |   5.47   |   5.90   |   5.25   |
#   0.6b qkv 1024->4096 +norm    |  4.68 |          |   2.99   |          |   2.99   |   3.26   |   2.92
#   0.6b gate_up ->6144 +silu    |  7.97 |   3.77   |   3.36   |   3.79   |          |   3.79   |
#   0.6b down 3072->1024 +add    |  3.38 |   3.62   |          |   3.36   |   3.52   |   2.66   |
# Also swept for the 8b, slower everywhere: 2 warps (4/2048/2, 2/2048/2, 4/1024/2, ...), 8 warps (8/2048/8,
# 8/1024/8, 4/4096/8), 16 rows. And a deep prefetch that holds chunks in shared memory instead of registers,
# plain FP8 GEMV (no norm / add), us per call: today's loads 5.5 (8b o) / 14.6 (down) / 26.9 (gate_up) / 8.4
# (qkv); the loop pipelined by Triton (`tl.range(num_stages=3..8)`: cp.async into shared memory) at best 12.9 /
# 28.4 / 58.5 / 17.0 over 10 tiles; TMA descriptor loads (boxes of at most 256 columns, 4-8 stages) at best 17.0
# / 41.1 / 62.0 / 25.2. Not taken. A layer's four, 36 / 28 layers in one graph, us per layer, old -> these configs:
# 8b 73.7 -> 56.9 (192.9 MB of FP8 weights: 3.4 TB/s, where bf16's GEMVs stream 3.9-4.1), 1.7b 28.0 -> 21.2,
# 0.6b 16.9 -> 10.1 (each model's best tiles: 56.8 / 20.1 / 9.3). Per weight the loop issues a convert
# (e4m3 pair -> f16 pair, f16 -> fp32) and an FMA: ~4.2 instructions in all (SASS), bf16 ~3.9 for twice the bytes.
# `bench.py decode-1 --model qwen3-8b --quantization fp8`: 3.10 -> 2.45 ms/token.
FP8_GEMV_CONFIG = dict(BLOCK_N=4, BLOCK_K=2048, num_warps=4)
FP8_NORM_GEMV_CONFIG = dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)
FP8_NORM_SILU_GEMV_CONFIG = dict(BLOCK_N=4, BLOCK_K=2048, num_warps=4)


def linear_triton(x, weight, config=None, silu_mul=False, out=None, norm=None, add=None, scales=None):
    """x (1, K), weight (N, K), both contiguous -> (1, N) (into out, if given). silu_mul: weight is gate_up
    (N = 2I rows, gate rows first) and the output is silu_mul_ref(x @ weight^T), (1, I). norm: (residual or
    None, norm weight, eps): the product is of add_rms_norm_ref(x, residual, ...)'s (rms_norm_ref's) output;
    returns (out, x + residual). add: (1, N), added to the product (rounded to the dtype first, as a separate
    add would see it). scales: weight is float8_e4m3fn and these its (N, ceil(K / 128)) fp32 block scales
    (quant.py's format; the product is x @ quant.dequantize(weight, scales)^T)."""
    N, K = weight.shape
    assert x.shape == (1, K) and x.is_contiguous() and weight.is_contiguous()
    if scales is None:
        assert x.dtype == weight.dtype
        configs = (GEMV_CONFIG, NORM_GEMV_CONFIG, NORM_SILU_GEMV_CONFIG)
    else:
        assert weight.dtype == torch.float8_e4m3fn and scales.shape == (N, -(-K // 128)) and scales.is_contiguous()
        configs = (FP8_GEMV_CONFIG, FP8_NORM_GEMV_CONFIG, FP8_NORM_SILU_GEMV_CONFIG)
    if silu_mul:
        assert N % 2 == 0 and add is None
        N //= 2
    cfg = dict(config or configs[0 if norm is None else 2 if silu_mul else 1])
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], triton.next_power_of_2(K))    # no chunk wider than the row
    if scales is not None:
        cfg["BLOCK_K"] = max(cfg["BLOCK_K"], 16)                          # FP8 sums products in 16s
    out = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (1, N) and out.is_contiguous() and out.dtype == x.dtype
    res, norm_w, eps = norm or (None, None, 0.0)
    res_out = None
    if norm is not None:
        assert norm_w.shape == (K,) and norm_w.dtype == x.dtype
        if res is not None:
            assert res.shape == x.shape and res.dtype == x.dtype and res.is_contiguous()
            res_out = torch.empty_like(x)
    if add is not None:
        assert add.shape == (1, N) and add.dtype == x.dtype and add.is_contiguous()
    _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, weight, out, N, K, res, norm_w, res_out, eps, add, scales,
                                                    0 if scales is None else scales.shape[1], NORM=norm is not None,
                                                    HAS_RES=res is not None, ADD=add is not None, SILU_MUL=silu_mul,
                                                    SCALED=scales is not None, **cfg, **pdl(x))
    return out if norm is None else (out, x if res is None else res_out)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, norm_w_ptr, eps, add_ptr, NORM: tl.constexpr,
                        ADD: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # A few tokens (M <= BLOCK_M, 8 or 16: small decode batches, a speculative verify pass): out = x @ w^T with the
    # weight read once for all M rows, like the GEMV. Each program owns BLOCK_N rows of w and streams them
    # in BLOCK_K chunks through one tensor-core product per chunk (x padded to BLOCK_M rows with zeros).
    # SILU_MUL: w is gate_up (2N rows), and the program also streams the up rows N + n of its gate rows n, so
    # out is silu(gate) * up (N wide) and the MLP needs no activation kernel.
    # NORM: the input is rms_norm(x) * norm_w. rstd is one number per token row, so it factors out of the
    # product, as in the GEMV: the chunks multiply x * norm_w, and each output row is scaled by its rstd at the
    # end. The squares of x are summed by a tensor-core product too (x * x against ones): summed on the CUDA
    # cores instead, the kernel took up to 3x as long (table below).
    # ADD: out = (x @ w^T) + add, the product rounded to the dtype first as a separate add would round it (o_proj
    # and down_proj add the residual stream here, so the norm after them reads one tensor).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M, 16), dtype=tl.float32)                    # 16 equal columns: each row's sum of squares
    out_mask = (ms[:, None] < M) & (rows[None, :] < N)
    if ADD:                                            # loaded first (as in the GEMV), used after the K loop
        add = tl.load(add_ptr + ms[:, None] * N + rows[None, :], mask=out_mask, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=(ms[:, None] < M) & (cols[None, :] < K), other=0.0)
        if NORM:
            x32 = x.to(tl.float32)
            sq = x32 * x32
            if dtype == tl.bfloat16:                         # (fp16 squares could overflow: they stay fp32)
                sq = sq.to(tl.bfloat16)
            ss = tl.dot(sq, tl.full((BLOCK_K, 16), 1.0, sq.dtype), ss)
            x = (x32 * tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]).to(dtype)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        w_mask = (rows[:, None] < N) & (cols[None, :] < K)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs, mask=w_mask, other=0.0)), acc)
        if SILU_MUL:
            acc_up = tl.dot(x, tl.trans(tl.load(w_ptrs + N * K, mask=w_mask, other=0.0)), acc_up)
    if NORM:
        rstd = tl.rsqrt(tl.max(ss, axis=1) / K + eps)[:, None]                            # (BLOCK_M, 1)
        acc, acc_up = acc * rstd, acc_up * rstd
    if SILU_MUL:
        acc = _silu_mul_out(acc, acc_up, dtype)
    if ADD:
        acc = acc.to(dtype).to(tl.float32) + add
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], acc.to(dtype), mask=out_mask)


# H200, bf16, us per call (weights rotated past L2) at M = 2 / 8 tokens; BLOCK_N/BLOCK_K/warps/stages:
#   K -> N                 |   cuBLAS    | 16/512/4/3  | 32/256/4/4  | 64/128/4/4
#   0.6b qkv 1024->4096    |  5.1 /  5.5 |  5.7 /  6.0 |  5.4 /  5.4 |  5.8 /  5.8
#   0.6b o 2048->1024      | 12.9 /  6.1 |  5.6 /  5.6 |  6.5 /  7.0 |  7.6 /  7.6
#   0.6b down 3072->1024   |  7.7 /  7.7 |  6.9 /  6.9 |  8.5 /  8.5 | 10.1 / 10.1
#   8b qkv 4096->6144      | 16.7 / 16.4 | 17.9 / 17.8 | 16.4 / 16.3 | 16.9 / 17.0
#   8b o 4096->4096        | 13.8 / 13.8 | 13.3 / 13.2 | 12.2 / 12.3 | 14.5 / 14.7
#   8b gate_up 4096->24576 | 51.9 / 56.8 | 63.4 / 62.2 | 53.3 / 53.7 | 51.8 / 52.0
#   8b down 12288->4096    | 31.6 / 31.8 | 32.9 / 32.6 | 29.8 / 29.8 | 38.1 / 38.2
#   8b lm_head 4096->151936| 297  / 299  | 353  / 347  | 288  / 292  | 286  / 289
# (M = 4 and 16 alike.) cuBLAS is about as fast on the wide projections (N > K); on the tall ones (o and down,
# where it splits K and adds a reduce kernel) the skinny kernel wins by 3-55%: 16/512 up to N = 1024, 32/256
# above. The skinny kernel takes the wide ones too (not lm_head); then (with PDL, since reverted: below) cuBLAS
# broke the chain: `bench.py decode-1`'s batch 8 (H200, 2026-12-02), cuBLAS -> skinny for qkv and gate_up: qwen3-8b
# 5.09-5.19 -> 4.92 ms/step, qwen3-0.6b 1.30 -> 1.31.
# Tried and dropped (2026-12-02): the skinny kernel making its input as the GEMV does (norm, SiLU * up) and adding
# the residual, so 2-16 tokens would run six kernels per layer too. Every program then redoes the input for all
# 16 (padded) token rows of the whole K: H200, M = 8, us per call: 0.6b o 2048->1024 plain 5.2, with the norm
# 18.1, SiLU * up + add 51.2; 8b down 12288->4096 plain 30.3, norm 119.8, SiLU * up + add 250.0 (the add alone
# +0.4-3). `bench.py decode-1`'s batch 8: qwen3-0.6b 1.30 -> 3.95 ms/step, qwen3-8b 5.19 -> 17.8 ms/step.
# Again (2026-12-03), without redoing the input: rstd factored out of the product as the GEMV does, and the
# residual added in the epilogue of o_proj and down_proj, so 2-16 tokens run six kernels per layer as one token
# does. First with the squares summed across threads (tl.sum) in every chunk: the skinny launches averaged 8.0 us
# against ~5.4, decode-8 qwen3-0.6b 1.22 -> 1.37 ms/step, qwen3-8b 4.65 -> 6.99. Which part costs, H200, us per
# call at M = 8 (2 and 16 alike; weights rotated past L2), the committed RMSNorm kernel + plain skinny GEMM beside:
#   K -> N             | norm + plain | plain | tl.sum per chunk | squares in a tile | x * norm_w only | squares dot
#   0.6b qkv 1024->4096       |  7.5  |  5.4  |      10.8        |      10.5         |      5.7        |    5.9
#   0.6b gate_up 1024->6144 silu  8.4 |  6.2  |      10.8        |      10.4         |      6.4        |    6.9
#   8b qkv 4096->6144         | 19.0  | 16.4  |      50.1        |      49.9         |     17.5        |   18.1
#   8b gate_up 4096->24576 silu  54.9 | 52.5  |      85.5        |      84.1         |     54.7        |   55.1
# Multiplying x by the norm weight costs little; summing its squares on the CUDA cores, per chunk or once after the
# loop, costs 5-35 us. Through the tensor cores (x * x against a column of ones, the kernel's `ss`) it is cheap,
# and that is the kernel now. A decode layer's chain of projections (o + add, norm + gate_up, down + add, norm +
# qkv; CUDA graph), unfused (the RMSNorm kernels between) -> fused, us, M = 2 / 8 / 16: qwen3-0.6b 25.0 / 27.4 /
# 26.9 -> 23.6 / 25.1 / 24.8, qwen3-1.7b 47.2 / 47.5 / 47.1 -> 45.9 / 46.2 / 46.5, qwen3-8b 112.4 / 113.9 / 114.2 ->
# 112.2 / 112.9 / 116.4. Relative error against fp32 (bf16, M = 8), fused / unfused: qkv 2.3e-3 / 2.9e-3,
# gate_up 4.3e-3 / 4.8e-3 (the normed input is rounded once, not twice), o + add 2.2e-3 both. `bench.py decode-1`,
# the previous commit's tree beside, one GPU call, decode-8 ms/step greedy (sampled): qwen3-0.6b 1.21 / 1.21 (1.23 /
# 1.22) -> 1.12 / 1.12 (1.13 / 1.13), 1.69x -> 1.55x decode-1; qwen3-1.7b 1.83 (1.84) -> 1.77 (1.78); qwen3-8b 4.70
# (4.72) -> 4.66 (4.69); decode-1 unchanged (0.72, 1.19, 4.00 ms/token).
# Tried and dropped (H200, 2026-12-02): programmatic dependent launch for the plain skinny kernel (its first weight
# chunk loaded before gdc_wait) and for silu_mul. `bench.py decode-1`'s batch 8, without -> with, same command:
# triggering the next launch at the kernel's start, qwen3-0.6b 1.399 -> 1.267 ms/step but qwen3-8b 5.065 -> 5.781;
# triggering it after the K loop, 1.397 -> 1.329 and 5.055 -> 5.387. The 8b's skinny launches are several waves
# deep (gate_up: 768 programs); unprofiled, the guess is that a dependent grid's early programs hold shared memory
# while they wait. Again (2026-12-02), the kernel waiting first, with no weight chunk before the wait, and letting
# the next launch at its start / after its K loop / at its start only when the grid is at most 264 programs
# (two per SM); one engine per variant, timed as `bench.py decode-1` times: decode-8 ms/step, qwen3-0.6b 1.240
# without -> 1.255 / 1.257 / 1.258, qwen3-8b 4.889 -> 5.445 / 5.020 / 4.881 (decode-1 unchanged: 0.719, 4.010).
# Again (2026-12-03) on the fused kernel, for grids of at most one program per SM (every 0.6b projection; the 8b's
# o and down): the next launch let in at the start, the first weight chunk (and its up rows) loaded before the
# wait, the rest of the K loop as before. `bench.py decode-1`, the previous tree beside, one GPU call, decode-8
# ms/step greedy (sampled): qwen3-0.6b 1.11 / 1.11 (1.12 / 1.12) -> 1.18 / 1.18 (1.19 / 1.19), qwen3-8b 4.63
# (4.65) -> 4.92 (4.93); decode-1 unchanged. Nothing gained: PDL stays off here.
# Once more (2026-12-04), after `kernels.pdl_pair` changed how a stream of PDL launches runs: wait first, let the next
# launch in at the start, grids of at most one program per SM. `bench.py decode-1` (qwen3-0.6b), two pairs in one call:
# decode-8 0.95 / 0.95 -> 1.02 / 1.02 ms/step greedy, 0.97 / 0.97 -> 1.03 / 1.03 sampled. Off it stays.
# Not yet measured in the engine since `pdl_pair`: the late trigger (wait first, let the next launch in after the K
# loop). A scratch chain (H200, 2026-12-04; qwen3-0.6b's four projections of a layer at M = 8 with today's tiles, 28
# layers of distinct weights in a CUDA graph, us per layer): no PDL 21.6 / 22.8 (two runs), early trigger 26.2, late
# trigger 20.2; one program per SM forced by shared memory (tiles of 126-147 KB) 28.7 without PDL, 25.8-25.9 with
# it. The next measurement is `bench.py decode-1`'s decode-8 on qwen3-0.6b and qwen3-8b with the late trigger for grids
# of at most one program per SM (the device was taken back before that call ran).
# The tiles again by grid size (H200, 2026-12-02, M = 8, us per call, same harness; BLOCK_N/BLOCK_K/warps/stages,
# 32 tiles of 16-64 x 128-512 x 4-8 warps x 3-4 stages swept; 32/256/4/4 was the only wide tile):
#   K -> N (programs of 32 rows)  | 32/256/4/4 | 32/512/4/4 | 32/128/4/3 | best of the sweep
#   8b   qkv 4096->6144 (192)     |    15.9    |     -      |     -      | 64/256/4/4 15.3
#   8b   o 4096->4096 (128)       |    11.9    |    11.2    |            | 32/512/4/4
#   8b   down 12288->4096 (128)   |    28.7    |    26.4    |            | 32/512/4/4
#   8b   gate_up silu (384)       |    51.9    | (smem)     |    48.8    | 32/128/4/3
#   0.6b qkv 1024->4096 (128)     |     5.2    |     5.1    |            | 32/128/4/4 5.1
#   0.6b gate_up silu (96)        |     5.9    | (smem)     |     6.8    | 32/256/4/4
#   0.6b o, down (N <= 1024)      | 6.3, 8.3   |            |            | 16/512/4/3 5.2, 6.5 (the narrow tile)
# A grid of at most one program per SM holds one 196 KB tile per SM: the longer chunk keeps more bytes in
# flight. A grid of more than two per SM (the SiLU tile: two weight tiles per chunk) fits three programs per SM
# with shorter chunks and three stages. `bench.py decode-1`, the previous commit's tree beside, one GPU call:
# qwen3-8b decode-8 4.92 -> 4.72 / 4.72 ms/step (1.24x -> 1.19x decode-1; decode-1 3.96 -> 3.95 / 3.96 ms),
# qwen3-0.6b 1.25 -> 1.25 (its wide projections keep their tiles or tie); others: qwen3-30b-a3b 8.31 -> 8.24,
# qwen3-1.7b 1.96 -> 1.86 (decode-1 1.19 both).
# Tried and dropped (H200, 2026-12-03): the tall projections split along K (2-8 splits; the last program of a column
# tile sums the partials in a fixed order), us per call at M = 8, today's tiles -> the best split: 0.6b o 5.37 ->
# 4.87, 0.6b down 6.72 -> 5.79, 1.7b down 11.99 -> 9.86, 8b o 11.58 -> 11.82 (slower at every split on the 8b): about
# 1.4 us per 0.6b layer, ~3% of a decode-8 step, for an atomic counter and a partials buffer. HISTORY.md has the table.
SKINNY_CONFIG = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
SKINNY_CONFIG_ONE_WAVE = dict(BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=4)    # plain, <= 1 program per SM
SKINNY_CONFIG_MANY = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)        # SiLU, > 2 programs per SM
SKINNY_CONFIG_NARROW = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3)   # N <= 1024
SKINNY_MAX_N = 32768                                   # wider (lm_head, 151,936 rows): cuBLAS
# Up to 8 tokens the token rows of the product are 8 (BLOCK_M), not 16: Triton 3.6 takes dots narrower than 16 rows
# (it pads the tensor-core tile itself), so the input tile, its shared buffers and the norm's sum-of-squares
# product are half as large. H200, bf16, 2026-12-04, M = 8, us per call (CUDA-graph chain, weights rotated past L2),
# each projection as a decoder layer runs it, today's tile (BLOCK_M 16) -> BLOCK_M 8 with a tile of the sweep
# (BLOCK_N 8-32 x BLOCK_K 128-1024 x 2-4 warps x 2-4 stages, 11 tiles at each BLOCK_M):
#   K -> N                    | BLOCK_M 16, today  | BLOCK_M 8: 32/256/4/4 | 16/512/4/3 | 16/256/4/4 | best of BLOCK_M 8
#   0.6b qkv + norm 1024->4096 |  5.61 (32/512)    |  5.44 |       |       | 32/256/4/4
#   0.6b o + add 2048->1024    |  5.74 (16/512/4/3) |  5.57 |  5.55 |  5.55 | 8/256/2/4 5.48
#   0.6b gate_up + SiLU 1024->6144 | 6.98 (32/256) |  7.28 |       |  7.43 | 32/512/4/4 7.18
#   0.6b down + add 3072->1024 |  7.07 (16/512/4/3) |  6.91 |  6.80 |  6.94 | 8/512/4/3 6.69
#   1.7b qkv 2048->4096        |  8.26 (32/512)    |  7.62 |  8.47 |  9.53 | 32/256/4/4
#   1.7b o 2048->2048          |  6.41 (32/512)    |  6.03 |  6.16 |  6.04 | 8/256/2/4 5.95
#   1.7b gate_up 2048->12288   | 19.13 (32/256)    | 18.27 | 20.88 | 16.88 | 16/256/4/4
#   1.7b down 6144->2048       | 12.04 (32/512)    | 11.92 | 11.65 | 11.94 | 8/512/2/3 11.60
#   8b qkv 4096->6144          | 18.24 (32/256)    | 16.58 | 18.01 | 19.55 | 32/256/4/4
#   8b o 4096->4096            | 11.79 (32/512)    | 11.53 | 11.98 | 11.79 | 32/256/4/4
#   8b gate_up 4096->24576     | 54.57 (32/128/4/3) | 57.56 |      | 57.26 | 32/128/4/3 54.13
#   8b down 12288->4096        | 28.44 (32/512)    | 28.86 | 29.09 | 29.22 | 32/256/4/4 28.86
# (M = 2 alike; 16 tokens keep BLOCK_M 16.) With 8 rows the one-wave tile's longer chunk no longer pays: 32/256/4/4
# for every plain projection wider than 1,024 rows; SiLU keeps its tiles but for grids of one to two programs per
# SM (1.7b), which take 16/256/4/4. A layer of four (28 in one graph, as the table) at M = 8, us per layer, today
# -> the best tiles: 0.6b 24.3 -> 23.3, 1.7b 44.1 -> 40.0, 8b 106.3 -> 104.1.
SKINNY_CONFIG_SILU_8 = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4)   # <= 8 tokens, 1-2 programs per SM


def skinny_config(M: int, N: int, silu_mul: bool, device) -> dict:
    """The skinny GEMM's tile (BLOCK_M included) for M tokens and N output columns (the tables above)."""
    programs, sms = triton.cdiv(N, SKINNY_CONFIG["BLOCK_N"]), _num_sms(device)
    few = M <= 8 and (programs > sms or not silu_mul or N <= 1024)   # a one-wave SiLU grid (0.6b) keeps 16 rows
    if N <= 1024:
        cfg = SKINNY_CONFIG_NARROW
    elif silu_mul:
        cfg = SKINNY_CONFIG_MANY if programs > 2 * sms else SKINNY_CONFIG_SILU_8 if few else SKINNY_CONFIG
    else:
        cfg = SKINNY_CONFIG if few or programs > sms else SKINNY_CONFIG_ONE_WAVE
    return dict(cfg, BLOCK_M=8 if few else 16)


def skinny_linear_triton(x, weight, config=None, out=None, silu_mul=False, norm=None, add=None):
    """x (M, K) with M <= 16, weight (N, K), both contiguous -> (M, N) (into out, if given). silu_mul: as in
    linear_triton, (M, N / 2) out. norm: (norm weight, eps): the product is of rms_norm_ref(x, ...)'s output.
    add: (M, N), added to the product (rounded to the dtype first)."""
    (M, K), N = x.shape, weight.shape[0]
    assert M <= 16 and weight.shape[1] == K and x.is_contiguous() and weight.is_contiguous()
    assert x.dtype == weight.dtype and not (silu_mul and N % 2) and not (silu_mul and add is not None)
    N = N // 2 if silu_mul else N
    cfg = dict(config or skinny_config(M, N, silu_mul, x.device))
    cfg.setdefault("BLOCK_M", 16)
    assert M <= cfg["BLOCK_M"]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.is_contiguous() and out.dtype == x.dtype
    norm_w, eps = norm or (None, 0.0)
    if norm is not None:
        assert norm_w.shape == (K,) and norm_w.dtype == x.dtype
    if add is not None:
        assert add.shape == (M, N) and add.dtype == x.dtype and add.is_contiguous()
    _skinny_gemm_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, weight, out, M, N, K, norm_w, eps, add,
                                                           NORM=norm is not None, ADD=add is not None,
                                                           SILU_MUL=silu_mul, **cfg)
    return out


# One token, K -> N, bf16, us per call (bench.py kernels: CUDA-graph replays, weights rotated past L2), H100:
#            | 1024->4096 | 3072->1024 | 1024->151936 | 4096->24576 | 12288->4096
# triton     |    5.2     |    4.9     |    106       |    69.9     |    38.5
# cuBLAS     |    6.1     |    8.0     |    117       |    76.4     |    41.2
# Triton wins at one token on every Qwen3 shape; the kernel is for one token only (more tokens would re-read
# the weight once each). From 2 to 16 tokens the skinny kernel takes the tall projections (its table), and
# cuBLAS the rest.
# Past 16 tokens cuBLAS stays: a plain Triton tiling (the skinny kernel with tiles over the token rows too; 12 tiles
# of 32-128 x 32-128 x 64-128, 4-8 warps, 3-5 stages, split K 1/2/4) against it, H200, bf16, 2026-12-03, us per
# call (CUDA-graph chains, weights rotated past L2), cuBLAS / best tile, at 32 / 64 / 128 / 256 tokens:
#   0.6b qkv 1024->4096     | 5.4/5.8 | 5.4/5.9 | 5.7/6.7 |  6.9/8.3
#   0.6b o 2048->1024       | 5.9/7.4 | 5.9/7.5 | 6.2/7.5 |  6.6/7.7
#   0.6b gate_up 1024->6144 | 6.5/7.2 | 6.6/7.3 | 6.7/8.6 |  8.0/11.9
#   0.6b down 3072->1024    | 7.7/8.5 | 8.0/8.7 | 8.3/9.1 |  7.8/10.2
# In the engine (up to 256 tokens, 64 x 64 x 128 tiles): `bench.py offline` 24,849 -> 23,514 tok/s sampled.
def _skinny(x, weight) -> bool:
    """Whether x @ weight^T takes the skinny GEMM: 2..16 tokens, on the GPU, every projection but lm_head."""
    return 2 <= x.shape[0] <= 16 and weight.shape[0] <= SKINNY_MAX_N and _use_triton(x) and x.is_contiguous()


def linear(x, weight, out=None, silu_mul=False):
    """x @ weight^T; silu_mul: weight is gate_up (gate rows first) and the result silu(gate) * up, made in the
    GEMV's or skinny GEMM's epilogue where they run, else by kernels.silu_mul."""
    if x.shape[0] == 1 and _use_triton(x):
        return linear_triton(x, weight, out=out, silu_mul=silu_mul)
    if _skinny(x, weight):
        return skinny_linear_triton(x, weight, out=out, silu_mul=silu_mul)
    assert out is None or not silu_mul
    return kernels.silu_mul(linear_ref(x, weight)) if silu_mul else linear_ref(x, weight, out=out)


def one_token(x, norm_w=None) -> bool:
    """Whether x takes the one-token GEMV (linear_triton): one row, on the GPU, a norm weight in its dtype."""
    return x.shape[0] == 1 and _use_triton(x) and (norm_w is None or norm_w.dtype == x.dtype)


def norm_linear(x, residual, norm_w, eps, weight, silu_mul=False, scales=None):
    """(linear(rms_norm(h), weight, silu_mul=...), h) with h = x + residual (x when residual is None): a norm and
    the projection after it, in one kernel up to 16 tokens (a decode step is made of launches). scales: FP8
    weights (as in linear_triton), one token only."""
    if one_token(x, norm_w):
        return linear_triton(x, weight, norm=(residual, norm_w, eps), silu_mul=silu_mul, scales=scales)
    assert scales is None, "FP8 past one token: quant.Fp8Linear"
    if residual is None and _skinny(x, weight) and norm_w.dtype == x.dtype:
        return skinny_linear_triton(x, weight, silu_mul=silu_mul, norm=(norm_w, eps)), x
    if residual is None:
        return linear(rms_norm(x, norm_w, eps), weight, silu_mul=silu_mul), x
    normed, residual = add_rms_norm(x, residual, norm_w, eps)
    return linear(normed, weight, silu_mul=silu_mul), residual


def linear_add(x, weight, residual, scales=None):
    """(linear(x) + residual, None) where one kernel does the add after the product (up to 16 tokens: the GEMV's
    or skinny GEMM's epilogue), else (linear(x), residual) for the norm after it to add (add_rms_norm), so no
    path spends a launch on the add. residual None: (linear(x), None). scales: FP8 weights, one token only."""
    if residual is not None and one_token(x):
        return linear_triton(x, weight, add=residual, scales=scales), None
    assert scales is None, "FP8 past one token: quant.Fp8Linear"
    if residual is not None and _skinny(x, weight) and residual.is_contiguous():
        return skinny_linear_triton(x, weight, add=residual), None
    return linear(x, weight), residual
