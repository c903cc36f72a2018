"""Tensor parallelism: one process per GPU, each holding 1/N of every layer (Megatron-style), rank 0 in charge.

    llm = LLM(EngineArgs(model="Qwen/Qwen3-32B", tensor_parallel_size=2))
    python serve.py --model ./Qwen3-32B --tensor-parallel-size 2
    python bench.py decode-1 --model qwen3-32b --tensor-parallel-size 2

The split (`shard_config`, `shard_slice`): rank r's model is a Qwen3 with 1/N of the query heads, of the K/V
heads (each replicated on N / num_key_value_heads ranks when N exceeds them), of the MLP's intermediate
width (each expert's too, in MoE layers) and of the vocabulary. So
  - q/k/v and gate/up (and the experts' gate/up) are column-parallel: each rank computes its heads' and its
    intermediate columns' outputs from the whole hidden state, with no communication;
  - o_proj and down_proj (and the experts' down) are row-parallel: each rank multiplies its slice of the input
    and the partial sums are added by one all-reduce (two per layer, model.DecoderLayer's hooks);
  - embed_tokens and lm_head hold 1/N of the vocabulary's rows: an embedding row is looked up on the rank
    that owns it (zeros elsewhere, then an all-reduce) and the logits are all-gathered, so every rank ends
    with the whole (B, vocab) row block. The router, the norms and the RoPE table are replicated.
The loader reads only the rank's slice of each checkpoint tensor (safetensors' get_slice).

Processes (`start`, `join`): rank 0 is the caller's process (the `LLM`); it spawns ranks 1..N-1 itself
(multiprocessing spawn, no torchrun), which build their shard of the model and then replay every call rank
0's `runner.Runner` makes on the model: rank 0 pickles the call's host-side inputs (token ids, block tables)
down one pipe per rank, and all ranks run the same forward pass, meeting in the collectives. The scheduler,
the KV block tables and the sampler live on rank 0 only; the sampled tokens reach the others by a broadcast
on the device (no host sync). Collectives: NCCL on GPUs (rank r uses cuda:r), gloo on the CPU (tests).

Failure: a rank that dies makes rank 0 print why and exit at once (a collective with a dead peer never
returns, so waiting would hang); the server then fails every request and reports the engine dead. A rank
whose parent dies exits too. Not here yet: a custom one-shot all-reduce for small messages (decode), to be
measured against NCCL's on a 2-GPU machine.
"""
import atexit
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

import kernels


@dataclass
class Group:
    """This process's place in the tensor-parallel group. Rank 0 holds a pipe to every other rank and their
    processes; the others hold their pipe to rank 0."""
    rank: int
    size: int
    conns: list = field(default_factory=list)
    procs: list = field(default_factory=list)
    closing: bool = False


# ----------------------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------------------

def check(cfg, n: int, device_type: str):
    """A clear error for a split that cannot work, before any process starts."""
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    if device_type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs; this machine has {torch.cuda.device_count()}")
    kv, q_cols = cfg.num_key_value_heads, cfg.num_attention_heads * cfg.head_dim
    divides = "be divisible by"
    rules = [("num_attention_heads", cfg.num_attention_heads, cfg.num_attention_heads % n == 0, divides),
             ("num_key_value_heads", kv, kv % n == 0 or n % kv == 0, "divide or be a multiple of"),
             ("vocab_size", cfg.vocab_size, cfg.vocab_size % n == 0, divides),
             ("intermediate_size", cfg.intermediate_size, cfg.intermediate_size % n == 0, divides),
             ("moe_intermediate_size", cfg.moe_intermediate_size, cfg.moe_intermediate_size % n == 0, divides)]
    if cfg.quantization == "fp8":       # an FP8 checkpoint's 128-column scale blocks must not straddle two ranks
        blocks = "give each rank a multiple of 128 columns (FP8 blocks) when divided by"
        rules += [(name, value, value // n % 128 == 0, blocks) for name, value in (
            ("intermediate_size", cfg.intermediate_size), ("moe_intermediate_size", cfg.moe_intermediate_size),
            ("num_attention_heads x head_dim", q_cols))]
    for name, value, ok, how in rules:
        if not ok:
            raise ValueError(f"tensor_parallel_size {n}: the model's {name} ({value}) must {how} it")


def shard_config(cfg, n: int):
    """The shape of one rank's model: 1/N of the heads, K/V heads (at least one), intermediate and vocab."""
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                   num_key_value_heads=max(1, cfg.num_key_value_heads // n),
                   intermediate_size=cfg.intermediate_size // n, moe_intermediate_size=cfg.moe_intermediate_size // n,
                   vocab_size=cfg.vocab_size // n)


COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")   # split rows (dim 0)
ROW = ("o_proj", "down_proj")                                                               # split columns (dim 1)


def shard_slice(key: str, local_shape: tuple, rank: int, n: int, kv_heads: int) -> tuple[int, int] | None:
    """Where rank's part of checkpoint tensor `key` starts: (dim, start), its length being local_shape[dim];
    None for a replicated tensor. The ranks' parts tile the tensor in rank order, except K/V heads when n
    exceeds them: each head is then read by n / kv_heads ranks in a row (rank r reads head r * kv_heads // n).
    FP8 block scales (weight_scale_inv, widened to one per row) split with their weight: rows, or 128-column
    blocks."""
    module = key.rsplit(".", 2)[-2]                     # ...self_attn.k_proj.weight -> k_proj
    if module not in COLUMN + ROW:
        return None
    dim = 0 if module in COLUMN else 1
    parts = kv_heads if module in ("k_proj", "v_proj") and n > kv_heads else n
    return dim, rank * parts // n * local_shape[dim]


# ----------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------

def start(n: int, device_type: str, build, *args) -> Group:
    """Rank 0: spawn ranks 1..n-1, each running `worker` (which calls build(group, *args) for its runner), and
    join the group with them. `wait_ready` then waits for their shards."""
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:                          # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device_type == "cuda" else "gloo"
    group = Group(0, n)
    for rank in range(1, n):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=worker, args=(rank, n, port, backend, theirs, build, *args), name=f"qwen3-tp{rank}",
                        daemon=True)
        p.start()
        theirs.close()
        group.conns.append(ours)
        group.procs.append(p)
    # before multiprocessing's own exit handler (which kills daemon processes): a clean stop, not a "death"
    atexit.register(close, group)
    threading.Thread(target=watch, args=(group,), name="tp-watchdog", daemon=True).start()
    init(0, n, port, backend)
    return group


def init(rank: int, n: int, port: int, backend: str):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)


def wait_ready(group: Group):
    """Rank 0, after building its own shard: every other rank's "ready", or the error it died with."""
    for rank, (conn, p) in enumerate(zip(group.conns, group.procs), start=1):
        multiprocessing.connection.wait([conn, p.sentinel])
        msg = conn.recv() if conn.poll() else ("failed", f"exited with code {p.join(5) or p.exitcode}")
        if msg[0] != "ready":
            close(group)
            raise RuntimeError(f"tensor-parallel rank {rank} could not start: {msg[1]}")


def watch(group: Group):
    """Rank 0's watchdog: a rank that dies (not at close) leaves collectives that never return, so say which
    and exit now; the server (engine_process.py) then fails its requests instead of hanging."""
    ready = multiprocessing.connection.wait([p.sentinel for p in group.procs])
    if group.closing:
        return
    dead = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(group.procs) if p.sentinel in ready]
    print(f"tensor parallelism: {', '.join(dead)} died; stopping the engine", file=sys.stderr, flush=True)
    os._exit(1)


def exit_with_parent():
    """Ranks 1..n-1: exit when rank 0's process is gone (its pipe may never close if it was killed)."""
    parent = os.getppid()

    def poll():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=poll, name="tp-parent-watch", daemon=True).start()


def send(group: Group | None, name: str, *args):
    """Rank 0: have every other rank make the same call (serve_calls replays it). No-op on other ranks."""
    if group is None or group.rank != 0:
        return
    msg = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
    for conn in group.conns:
        conn.send_bytes(msg)


def serve_calls(obj, conn):
    """Ranks 1..n-1: replay rank 0's calls on obj until it says "close" or goes away."""
    while True:
        try:
            name, args = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if name == "close":
            return
        getattr(obj, name)(*args)


def worker(rank: int, n: int, port: int, backend: str, conn, build, *args):
    """The main of ranks 1..n-1: join the group, build(rank, group, *args) (the rank's runner), say ready, then
    replay calls. An error is printed and ends the process (rank 0's watchdog takes it from there)."""
    exit_with_parent()
    if backend == "gloo":                               # n processes share the CPU's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    try:
        init(rank, n, port, backend)
        group = Group(rank, n, [conn])
        obj = build(group, *args)
    except Exception as e:
        traceback.print_exc()
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        serve_calls(None, conn)                         # alive until rank 0 has read why, and closes
        return
    conn.send(("ready",))
    try:
        with torch.inference_mode():
            serve_calls(obj, conn)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    dist.destroy_process_group()


def close(group: Group | None):
    """Rank 0: stop the other ranks and leave the group (the LLM can then be dropped, or another made)."""
    if group is None or group.closing:
        return
    group.closing = True
    for conn in group.conns:
        try:
            conn.send_bytes(pickle.dumps(("close", ())))
        except OSError:
            pass
    for p in group.procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# Collectives (the model's hooks; each is the identity without tensor parallelism)
# ----------------------------------------------------------------------------------------------------------

def all_reduce(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Sum x over the ranks, in place: the partial outputs of a row-parallel projection."""
    if group is not None:
        dist.all_reduce(x)
    return x


def embed(ids: torch.Tensor, weight: torch.Tensor, group: Group | None, pending: tuple | None = None) -> torch.Tensor:
    """Vocab-parallel embedding: weight holds rows [rank * V/N, (rank + 1) * V/N); a token outside them gets
    zeros here and its row from the rank that has it, summed by the all-reduce. pending: (last_tokens, gather)
    for ids that hold tokens still on the device (kernels.resolve_pending)."""
    if group is None:
        return kernels.embed(ids, weight, *(pending or ()))
    if pending is not None:
        ids = kernels.resolve_pending(ids, *pending)
    rows = weight.shape[0]
    local = ids - group.rank * rows
    inside = (local >= 0) & (local < rows)
    x = torch.nn.functional.embedding(torch.where(inside, local, 0), weight)   # (T, hidden)
    x = x * inside[:, None].to(x.dtype)
    return all_reduce(x, group)


# all_gather_single is all_gather_into_tensor's new name (torch 2.13 warns on the old one; older torch lacks it)
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_vocab(logits: torch.Tensor, group: Group | None, out: torch.Tensor | None) -> torch.Tensor:
    """(B, V/N) logits of this rank's vocabulary slice -> (B, V) on every rank (into out if given)."""
    if group is None:
        return logits if out is None else out.copy_(logits)
    B, v = logits.shape
    parts = torch.empty(group.size * B, v, dtype=logits.dtype, device=logits.device)  # rank r's rows r*B..
    ALL_GATHER(parts, logits.contiguous())
    full = parts.view(group.size, B, v).permute(1, 0, 2).reshape(B, group.size * v)     # (B, V)
    return full if out is None else out.copy_(full)


def broadcast(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Rank 0's x to every rank, in place (the sampled tokens)."""
    if group is not None:
        dist.broadcast(x, src=0)
    return x


def all_min(value: int, group: Group | None, device) -> int:
    """The smallest of every rank's value (KV blocks that fit: every rank allocates the same number)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def time_all_reduce(numels: list[int], dtype: torch.dtype, device, group: Group, reps: int = 50) -> list[float]:
    """Seconds per all-reduce of each size, back to back (bench.py allreduce; every rank makes the calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for n in numels:
        x = torch.zeros(n, dtype=dtype, device=device)
        for _ in range(5):
            dist.all_reduce(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        sync()
        times.append((time.perf_counter() - t0) / reps)
    return times

