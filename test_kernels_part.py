"""Each Triton kernel of kernels.py against its PyTorch reference, on the CPU through the Triton interpreter.

    python -m pytest -q -s test_kernels_part.py      # -s shows the max abs diff of every comparison

Inputs are fresh random tensors at awkward shapes (1, 3, 17, 130 tokens; contexts ending mid-block; shuffled
block tables; GQA ratios 1, 2, 4, 8; prefill after a cached prefix that is not block-aligned). Every torch.empty
is poisoned with NaN while a test runs, so an output element the kernel forgot to write shows up as non-finite.
fp32 and fp16 only: the interpreter's tl.dot on bf16 inputs is wrong on this CPU (the GPU checks bf16).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # read when triton.jit wraps the kernels, so before kernels.py is imported

import pytest
import torch

import kernels

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def kt_triton_poisoned(monkeypatch):
    """Force the Triton path and fill every new float tensor with NaN (outputs must be fully written)."""
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def kt_tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)


def kt_check(name, out, ref, dtype):
    """Every element finite and close to the reference; prints the max abs diff."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), f"{name}: non-finite output (unwritten element?)"
    diff = (out.float() - ref.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    torch.testing.assert_close(out, ref, **kt_tol(dtype), msg=lambda m: f"{name}: {m}")


def kt_paged_cache(context_lens, block_size, n_kv, hd, dtype, extra_blocks=3):
    """Random K/V caches and a block table whose block ids are shuffled (never 0: the scratch block).
    Unused table entries are 0, as the scheduler leaves them. Returns k_cache, v_cache, block_tables."""
    n_blocks = [-(-c // block_size) for c in context_lens]
    num_blocks = 1 + sum(n_blocks) + extra_blocks
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    M = max(n_blocks) + 1                                    # one spare column: tables are wider than needed
    block_tables = torch.zeros(len(context_lens), M, dtype=torch.int32)
    for b, n in enumerate(n_blocks):
        block_tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd).to(dtype)
    return k_cache, v_cache, block_tables


# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 17, 130])
@pytest.mark.parametrize("N", [64, 100])
def test_kt_rms_norm(T, N, dtype):
    torch.manual_seed(T * 1000 + N)
    x, res = torch.randn(T, N).to(dtype), torch.randn(T, N).to(dtype)
    w = (1 + 0.1 * torch.randn(N)).to(dtype)
    kt_check(f"rms_norm T={T} N={N} {dtype}", kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_ref(x, w, 1e-6), dtype)
    out, new_res = kernels.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = kernels.add_rms_norm_ref(x, res, w, 1e-6)
    kt_check(f"add_rms_norm T={T} N={N} {dtype}", out, ref_out, dtype)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)    # the same rounded sum, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 17, 130])
@pytest.mark.parametrize("I", [96, 1500])
def test_kt_silu_mul(T, I, dtype):
    torch.manual_seed(T * 1000 + I)
    gate_up = (2 * torch.randn(T, 2 * I)).to(dtype)
    kt_check(f"silu_mul T={T} I={I} {dtype}", kernels.silu_mul(gate_up), kernels.silu_mul_ref(gate_up), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 17, 130])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2), (8, 1), (6, 3)])
def test_kt_qk_norm_rope_store(T, n_heads, n_kv, dtype):
    torch.manual_seed(T * 100 + n_heads * 10 + n_kv)
    hd, block_size, num_blocks, max_pos = 32, 8, 40, 500
    qkv = torch.randn(T + 2, (n_heads + 2 * n_kv) * hd).to(dtype)[1:T + 1]    # a row slice, as from a matmul
    q_w, k_w = (1 + 0.1 * torch.randn(hd)).to(dtype), (1 + 0.1 * torch.randn(hd)).to(dtype)
    cos_sin = kernels.rope_cos_sin(hd, max_pos, 1e6)
    positions = torch.randint(0, max_pos, (T,))
    slots = torch.randperm(num_blocks * block_size)[:T]                        # scattered, out of order
    caches = [torch.full((num_blocks, block_size, n_kv, hd), float("nan"), dtype=dtype) for _ in range(4)]
    args = (cos_sin, positions)
    q = kernels.qk_norm_rope_store(qkv, q_w, k_w, *args, caches[0], caches[1], slots, n_heads, n_kv, 1e-6)
    q_ref = kernels.qk_norm_rope_store_ref(qkv, q_w, k_w, *args, caches[2], caches[3], slots, n_heads, n_kv, 1e-6)
    name = f"qk_norm_rope_store T={T} heads={n_heads}/{n_kv} {dtype}"
    kt_check(name + " q", q, q_ref, dtype)
    for which, out, ref in (("k", caches[0], caches[2]), ("v", caches[1], caches[3])):
        out, ref = out.view(-1, n_kv, hd), ref.view(-1, n_kv, hd)
        kt_check(f"{name} {which} slots", out[slots], ref[slots], dtype)
        untouched = torch.ones(out.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert out[untouched].isnan().all(), f"{name}: {which} written outside its slots"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size,context_lens,num_splits", [
    (16, [1], None),                         # one token
    (4, [1, 17, 5], None),                   # contexts ending mid-block, tiny blocks
    (16, [130, 3, 64, 47], None),
    (16, [300, 1, 77], 3),                   # split path; slices past short contexts are empty
    (32, [700], None),                       # long enough for the shape heuristic to split it
])
def test_kt_decode_attention(dtype, group, block_size, context_lens, num_splits):
    torch.manual_seed(len(context_lens) * 100 + group + block_size)
    n_kv, hd = 2, 16
    k_cache, v_cache, block_tables = kt_paged_cache(context_lens, block_size, n_kv, hd, dtype)
    q = torch.randn(len(context_lens), n_kv * group, hd).to(dtype)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    scale = hd ** -0.5
    out = kernels.decode_attention_triton(q, k_cache, v_cache, block_tables, ctx, scale, num_splits=num_splits)
    ref = kernels.decode_attention_ref(q, k_cache, v_cache, block_tables, ctx, scale)
    kt_check(f"decode ctx={context_lens} bs={block_size} group={group} splits={num_splits} {dtype}", out, ref, dtype)
    if num_splits is None:   # the dispatcher takes the same path
        torch.testing.assert_close(kernels.decode_attention(q, k_cache, v_cache, block_tables, ctx, scale), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size,q_lens,prefixes", [
    (16, [1], [0]),
    (16, [130], [0]),                        # several query tiles of one sequence
    (4, [3, 17, 1, 40], [5, 0, 13, 30]),     # packed, cached prefixes not block-aligned
    (16, [33, 70], [19, 0]),
])
def test_kt_prefill_attention(dtype, group, block_size, q_lens, prefixes):
    torch.manual_seed(sum(q_lens) + group + block_size)
    n_kv, hd = 2, 32
    context_lens = [q + p for q, p in zip(q_lens, prefixes)]
    k_cache, v_cache, block_tables = kt_paged_cache(context_lens, block_size, n_kv, hd, dtype)
    q = torch.randn(sum(q_lens), n_kv * group, hd).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    scale = hd ** -0.5
    out = kernels.prefill_attention(q, k_cache, v_cache, cu, ctx, block_tables, scale, max_seqlen_q=max(q_lens))
    ref = kernels.prefill_attention_ref(q, k_cache, v_cache, cu, ctx, block_tables, scale)
    kt_check(f"prefill q_lens={q_lens} prefixes={prefixes} bs={block_size} group={group} {dtype}", out, ref, dtype)
    if q_lens == [1]:   # max_seqlen_q read from the device when not given
        out2 = kernels.prefill_attention_triton(q, k_cache, v_cache, cu, ctx, block_tables, scale)
        torch.testing.assert_close(out2, out)


def test_kt_dispatch(monkeypatch):
    """auto takes PyTorch on the CPU; torch forces it; a bad value is an error."""
    x, w = torch.randn(3, 64), torch.ones(64)
    calls = []
    monkeypatch.setattr(kernels, "rms_norm_triton", lambda *a, **k: calls.append(1))
    for mode in ("auto", "torch"):
        monkeypatch.setenv("QWEN3_KERNELS", mode)
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_ref(x, w, 1e-6))
    assert not calls
    monkeypatch.setenv("QWEN3_KERNELS", "triton")
    kernels.rms_norm(x, w, 1e-6)
    assert calls == [1]
    monkeypatch.setenv("QWEN3_KERNELS", "fast")
    with pytest.raises(ValueError):
        kernels.rms_norm(x, w, 1e-6)
