"""The model on its device: weights, KV cache, CUDA graphs and the forward passes of one rank.

    runner = Runner(args, device, dtype)          # engine.LLM makes one; the scheduler and sampler are LLM's
    runner.allocate(runner.fit_blocks(max_model_len, defaults))
    hidden = runner.forward(ids, pending, cu, ctx, tables, logits_idx, max_seqlen_q, is_decode)
    logits = runner.logits(0, len(logits_idx))

`Runner` holds what a forward pass needs and nothing about requests: the model, the KV cache tensor, the
decode graphs (on rank 0 the sampler's graphs too), `last_tokens` (the tokens the previous step sampled, still
on the device) and the hidden states of the last eager pass. Its inputs are host lists (`scheduler.pack` makes
them). A sampled decode step is one graph replay: the graph ends in the sampler and writes the tokens into
`last_tokens` itself.

Under tensor parallelism (parallel.py) every rank holds a Runner over its shard of the model. The methods in
the "calls" section are the ones every rank makes: on rank 0 each first sends itself, with its arguments, to
the other ranks (`parallel.send`), which replay it (`parallel.serve_calls`), so all ranks run the same pass
and meet in its collectives. So their arguments are host data only.
"""
import array
import types

import torch

import attention
import cache
import kernels
import parallel
from model import AttnMeta, build_model
from penalty import Penalties
from sample import SamplerGraphs, SamplingParams, SamplingTensors, resolve, sample, token_logprobs


class Runner:
    def __init__(self, args, device: torch.device, dtype: torch.dtype, group: parallel.Group | None = None):
        """args: engine.EngineArgs; group: this rank's tensor-parallel group, or None."""
        self.args, self.device, self.dtype, self.group = args, device, dtype, group
        # config: the whole model's; self.model.config: this rank's shard of it (the same without TP)
        self.model, self.config, self.ckpt = build_model(args.model, args.random_weights, dtype, device,
                                                         args.weight_seed, args.quantization, group, args.rope_scaling)
        self.kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype   # the cache's elements
        self.kv_cache = self.graphs = self.sampler = self.hidden = None
        spec = args.num_speculative_tokens if args.speculative_method == "draft" else 0   # a verify pass's drafts too
        self.last_tokens = torch.zeros(args.max_num_seqs * (1 + spec), dtype=torch.int64, device=device)

    def send(self, name: str, *args):
        parallel.send(self.group, name, *args)

    # ---- calls (every rank makes them; see the file's docstring) ------------------------------------------
    def fit_blocks(self, max_model_len: int, defaults: dict, extra_bytes_per_block: int = 0) -> int:
        """KV blocks that fit in the memory left, the same number on every rank (the smallest).
        extra_bytes_per_block: another cache with the same blocks (a draft model's)."""
        self.send("fit_blocks", max_model_len, defaults, extra_bytes_per_block)
        n = kv_blocks_that_fit(self, max_model_len, defaults, extra_bytes_per_block)
        return parallel.all_min(n, self.group, self.device)

    def allocate(self, num_blocks: int):
        self.send("allocate", num_blocks)
        self.kv_cache = cache.allocate_kv_cache(self.model.config, num_blocks, self.args.block_size, self.kv_dtype,
                                                self.device)

    def capture(self, max_blocks: int, sampling: bool = False):
        """The decode graphs; sampling (rank 0 of the target model): the sampler's graphs too (self.sampler)."""
        self.send("capture", max_blocks)
        self.graphs, self.sampler = capture_decode(self, self.kv_cache, max_blocks, sampling=sampling)

    def group_rows(self) -> int:
        """Rows of one sequence attended at once in a verify pass (attention.group_rows): its K + 1 tokens."""
        cfg = self.model.config
        return attention.group_rows(cfg.num_attention_heads, cfg.num_key_value_heads,
                                    self.args.num_speculative_tokens + 1)

    def forward(self, ids, pending, cu, ctx, tables, logits_idx, max_seqlen_q: int, is_decode: bool,
                seq_rows: list[int] | None = None) -> torch.Tensor:
        """The forward pass of a batch that is not replayed from a graph: inputs through pinned memory (a copy
        from pageable memory would first wait for the GPU to go idle); returns (and keeps, for `logits`) the
        hidden states of the rows in logits_idx. pending: (packed row, last_tokens row) of each input token
        still on the device. seq_rows (decode rows): each sequence's rows in turn, when rows are consecutive tokens
        of one sequence (AttnMeta.row_groups)."""
        self.send("forward", ids, pending, cu, ctx, tables, logits_idx, max_seqlen_q, is_decode, seq_rows)
        pin = self.device.type == "cuda"
        t = lambda xs, dt: (host_tensor(xs, dt).pin_memory() if pin else host_tensor(xs, dt)).to(
            self.device, non_blocking=True)
        meta = AttnMeta(cu_seqlens_q=t(cu, torch.int32), context_lens=t(ctx, torch.int32),
                        block_tables=t([b for row in tables for b in row], torch.int32).view(len(tables), -1),
                        slot_mapping=None, logits_indices=t(logits_idx, torch.int64), is_decode=is_decode,
                        max_seqlen_q=max_seqlen_q)
        pos, meta.slot_mapping = positions_and_slots(meta.cu_seqlens_q, meta.context_lens, meta.block_tables,
                                                     self.args.block_size, len(ids))
        if seq_rows is not None:
            meta.group_rows = self.group_rows()
            meta.row_groups = t(attention.row_groups(seq_rows, meta.group_rows), torch.int32)
        elif is_decode and len(tables) >= attention.CASCADE_MIN_BATCH and shares_first_block(tables):
            meta.shared_prefix = attention.plan_shared_prefix(meta.block_tables, meta.context_lens,
                                                            self.args.block_size)
        input_ids = t(ids, torch.int64)
        if pending:                                # tokens sampled last step, still on the device
            at, rows = t([i for i, _ in pending], torch.int64), t([r for _, r in pending], torch.int64)
            input_ids[at] = self.last_tokens[rows]
        self.hidden = self.model(input_ids, pos, meta, self.kv_cache)
        return self.hidden

    def logits(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, vocab) logits of rows start:stop of the last forward's hidden states."""
        self.send("logits", start, stop)
        return self.model.compute_logits(self.hidden[start:stop])

    def decode(self, ids, pending, ctx, tables, shared: bool, seq_rows: list[int] | None = None,
               steps: list[int] | None = None, sampled: bool = False) -> torch.Tensor:
        """A decode batch through its CUDA graph: (len(ids), vocab) logits (a view of the graphs' buffer).
        steps, sampled: DecodeGraphs.prepare's."""
        return self.replay(*self.graphs.prepare(ids, pending, ctx, tables, shared, seq_rows, steps, sampled))

    def decode_rows(self, ids, pending, ctx, tables, shared: bool, seq_rows: list[int] | None = None) -> torch.Tensor:
        """A decode batch through its CUDA graph when one holds it, else eagerly: (len(ids), vocab) logits."""
        if self.graphs is not None and len(ids) <= self.graphs.max_batch:
            return self.decode(ids, pending, ctx, tables, shared, seq_rows)
        n = len(ids)
        self.forward(ids, pending, list(range(n + 1)), ctx, tables, list(range(n)), 1, True, seq_rows)
        return self.logits(0, n)

    def replay(self, key: tuple, n: int, i64: array.array, i32: array.array) -> torch.Tensor:
        self.send("replay", key, n, i64, i32)
        return self.graphs.replay(key, n, i64, i32)

    def set_last_tokens(self, tokens: torch.Tensor):
        """Rank 0: this step's sampled tokens, on the device, become the next step's PENDING inputs."""
        self.last_tokens[:len(tokens)].copy_(tokens)
        self.publish_tokens(len(tokens))

    def publish_tokens(self, n: int):
        self.send("publish_tokens", n)
        parallel.broadcast(self.last_tokens[:n], self.group)    # TP: rank 0's sampled tokens to every rank


    def all_reduce_times(self, numels: list[int]) -> list[float]:
        self.send("all_reduce_times", numels)
        return parallel.time_all_reduce(numels, self.dtype, self.device, self.group)


def build_rank(group: parallel.Group, args, device_type: str, dtype: torch.dtype) -> Runner:
    """Ranks 1..N-1 of tensor parallelism (parallel.worker calls it): rank r's Runner, on cuda:r."""
    device = torch.device("cuda", group.rank) if device_type == "cuda" else torch.device("cpu")
    return Runner(args, device, dtype, group)


def kv_blocks_that_fit(runner: Runner, max_model_len: int, defaults: dict, extra_bytes_per_block: int = 0) -> int:
    """KV blocks for the GPU memory left: profile the largest forward pass and the largest sampling step (every
    filter, penalties, top-20 logprobs for every row) on a throwaway cache, then size the real one. With CUDA
    graphs the largest batch's decode and sampler graphs are captured too: their private memory pool stays
    reserved beside the KV cache for good (smaller batches' graphs reuse it), so the budget must hold it."""
    args, cfg = runner.args, runner.model.config
    probe_bytes = cache.kv_bytes_per_block(cfg, args.block_size, runner.kv_dtype)
    bytes_per_block = probe_bytes + extra_bytes_per_block
    if runner.device.type != "cuda":
        return max(2, min(4096, 2**31 // bytes_per_block))   # CPU: at most 2 GiB of cache by default
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    reserved0, allocated0 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    kv = probe_cache(runner)
    warmup(runner, kv, max_model_len, defaults)
    graphs = samplers = None
    if args.cuda_graphs:
        graphs, samplers = capture_decode(runner, kv, -(-max_model_len // args.block_size), [args.max_num_seqs],
                                          runner.group is None or runner.group.rank == 0)   # only rank 0 samples
    # what the engine needs besides its KV cache: the reserved peak (the allocator's rounding and fragmentation
    # too) less the probe cache; but a probe that fit in free space of a segment reserved before (one that an
    # earlier tensor still pins, e.g. cuBLAS's workspace inside a big buffer's segment) never raised that peak, so
    # also count what was reserved before plus the live bytes the profile added beside the probe
    probe = kv.numel() * kv.element_size()
    need = max(torch.cuda.max_memory_reserved() - probe,
               reserved0 + torch.cuda.max_memory_allocated() - allocated0 - probe)
    del kv, graphs, samplers
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(runner.device).total_memory
    n = int((total * args.gpu_memory_utilization - need) // bytes_per_block)
    if n < 2:
        raise RuntimeError(f"no GPU memory left for the KV cache (the rest needs {need / 2**30:.1f} GiB of "
                           f"{total / 2**30:.1f} GiB); lower max_num_batched_tokens or raise gpu_memory_utilization")
    return n


def capture_decode(runner: Runner, kv, max_blocks: int, sizes: list[int] | None = None, sampling: bool = False):
    """(DecodeGraphs over kv, SamplerGraphs or None). sampling: rank 0 of the target model, which samples. Then,
    without tensor parallelism, the decode graphs can sample too (sample_tail): a sampled step is one replay.
    (Under TP each rank would need the sampler's settings.)"""
    args = runner.args
    sampler = SamplerGraphs(runner.config.vocab_size, args.max_num_seqs, runner.device) if sampling else None
    tail = None
    if sampling and runner.group is None:                           # the sampler on the rows' settings
        tail = lambda logits, steps, out: sample(logits, sampler.tensors(len(out), steps), out=out)
    graphs = DecodeGraphs(runner.model, kv, runner.last_tokens, args.max_num_seqs, max_blocks, sizes,
                          runner.group_rows() if args.speculative_method else 0, tail)
    if sampler is not None:
        steps_of = lambda b: graphs.inputs(b)[DecodeGraphs.INPUTS.index("steps")]
        sampler.capture(graphs.logits, graphs.sizes, graphs.pool, steps_of, plain=tail is None)
    return graphs, sampler


def probe_cache(runner: Runner) -> torch.Tensor:
    """A throwaway KV cache that holds warmup's forward pass (max_num_batched_tokens tokens, after block 0)."""
    args = runner.args
    blocks = 1 + -(-args.max_num_batched_tokens // args.block_size)
    return cache.allocate_kv_cache(runner.model.config, blocks, args.block_size, runner.kv_dtype, runner.device)


@torch.inference_mode()
def warmup(runner: Runner, kv, max_model_len: int, defaults: dict):
    """One forward pass of max_num_batched_tokens prompt tokens, then the sampler on max_num_seqs rows with
    every filter, penalties and top-20 logprobs, and greedy's argmax, with the decode graphs' logits buffer held
    (memory profile). Every kernel a step can launch eagerly is compiled here, not in a user's request."""
    args, model = runner.args, runner.model
    T, bs, dev, B, V = (args.max_num_batched_tokens, args.block_size, runner.device, args.max_num_seqs,
                        runner.config.vocab_size)
    n_blocks = -(-T // bs)
    meta = AttnMeta(cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=dev),
                    context_lens=torch.tensor([T], dtype=torch.int32, device=dev),
                    block_tables=torch.arange(1, n_blocks + 1, dtype=torch.int32, device=dev)[None],
                    slot_mapping=torch.arange(bs, bs + T, device=dev),
                    logits_indices=torch.tensor([T - 1], device=dev), is_decode=False, max_seqlen_q=T)
    ids = torch.zeros(T, dtype=torch.int64, device=dev)
    model.compute_logits(model(ids, torch.arange(T, device=dev) % max_model_len, meta, kv))
    logits = torch.randn(B, V, device=dev).to(runner.dtype)
    kinds = [dict(temperature=0.0), dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
             dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.01)]       # greedy, plain, filtered: every kernel
    params = [resolve(SamplingParams(**kinds[i % 3]), defaults) for i in range(B)]
    penalized = SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, logit_bias={0: 1.0})
    penalties = Penalties(V, dev)          # B rows' slots: the memory profile holds them
    x = penalties.apply(logits.float(), [types.SimpleNamespace(request_id=i, params=penalized, prompt=set(range(64)))
                                         for i in range(B)])
    tokens = sample(x, SamplingTensors.build(params, list(range(B)), [0] * B, V, dev))
    penalties.count(tokens)
    token_logprobs(logits, tokens, 20)
    kernels.argmax(logits)


def gpu_event(device) -> torch.cuda.Event | None:
    """A timing event queued on the GPU now (None on the CPU): the engine's GPU-busy seconds run between two."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def to_device(xs: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A list to the device without waiting for it: through pinned memory (torch.tensor(xs, device=cuda) copies
    synchronously, and the host would stop running ahead of the GPU)."""
    t = host_tensor(xs, dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy into pinned host memory, queued (a copy to pageable memory would wait for the GPU
    right here): read it once an event recorded after it has completed. On the CPU: a plain copy."""
    pin = t.device.type == "cuda"
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)


def host_tensor(xs: list, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor from a list of ints (or floats for float32), through the buffer protocol: for the 16k-token
    lists of a large prefill, torch.tensor(list) costs milliseconds, this a fraction of that."""
    if not xs:
        return torch.empty(0, dtype=dtype)
    code = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}[dtype]
    return torch.frombuffer(array.array(code, xs), dtype=dtype)


def shares_first_block(tables: list[list[int]]) -> bool:
    """Whether two sequences of a decode batch start with the same cache block: the prefix cache shared it,
    so cascade attention can read their common prefix once (attention.plan_shared_prefix picks it)."""
    return len({row[0] for row in tables}) < len(tables)


def positions_and_slots(cu_seqlens, context_lens, block_tables, block_size: int, num_tokens: int):
    """Each packed token's position and KV-cache slot, (T,) int64 each, computed on the device: sequence b's
    n_b new tokens sit at positions ctx_b - n_b .. ctx_b - 1, and position p lives in slot
    block_table[p // block_size] * block_size + p % block_size. No host sync (num_tokens is T)."""
    n = cu_seqlens[1:] - cu_seqlens[:-1]                                                # (B,) new tokens
    rows = torch.arange(n.shape[0], device=n.device)
    seq = torch.repeat_interleave(rows, n, output_size=num_tokens)                      # (T,) sequence of each
    pos = torch.arange(num_tokens, device=n.device) - cu_seqlens[seq] + (context_lens - n)[seq]
    slots = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    return pos, slots


class DecodeGraphs:
    """CUDA graphs of the decode forward pass (model + lm_head) for a ladder of batch sizes. A decode batch
    is padded up to the next captured size: padding rows write their K/V into reserved block 0 and their
    logits are dropped. Replaying a graph launches the whole forward pass at once, which is what makes small
    batches fast (a 0.6B model step is ~300 kernels).

    Each size is captured for two block-table widths: the full one, and a short one (SHORT_CONTEXT tokens).
    Decode attention splits each context into slices by the table width, so the short graphs give a short
    context one 64-token tile per slice instead of several in a row (decode-1 on qwen3-0.6b, H100: 1.29 ->
    1.09 ms/token). From attention.CASCADE_MIN_BATCH rows on, each is captured once more with cascade attention
    (a shared prefix read once for all the rows that hold it), replayed when rows share their first block. With
    group_rows (speculative decoding), each is captured once more for passes whose rows are consecutive tokens of
    one sequence, attended group_rows at a time (AttnMeta.row_groups; never the fused decode kernel).

    With a sample_tail (an engine without tensor parallelism), each plain graph is captured once more ending in
    the sampler on SamplerGraphs' settings, which writes the step's tokens into last_tokens itself: a sampled
    step is one host-to-device copy of its inputs and one replay, not a second graph for the sampler and a copy
    of the tokens between them (qwen3-0.6b, H200, sampled: 666 -> 628 us per step at batch 1, 1,052 -> 1,034
    at 8, 1% at 128). Greedy batches keep the argmax after the graph.
    """
    SHORT_CONTEXT = 2048

    def __init__(self, model, kv_cache, last_tokens, max_batch: int, max_blocks: int, sizes: list[int] | None = None,
                 group_rows: int = 0, sample_tail=None):
        """sizes: the batch sizes to capture (default: the ladder up to max_batch). group_rows: 0, or the rows of
        one sequence a verify pass attends together (Runner.group_rows). sample_tail: None, or fn(logits, steps,
        out) that samples a plain (not grouped) graph's logits into out, last_tokens (the next step's PENDING
        inputs): each plain graph is then captured twice, ending at the logits and ending in it (`sampled`)."""
        self.sizes = sorted({1, 2, 4, 8, *range(16, max_batch + 16, 16)})
        self.sizes = sizes or [b for b in self.sizes if b < max_batch] + [max_batch]
        self.max_batch, self.sample_tail = max_batch, sample_tail
        dev = kv_cache.device
        i32 = dict(dtype=torch.int32, device=dev)
        # a step's int64 inputs, one host-to-device copy: size b's graphs read rows of b at the front (`inputs`)
        self.i64 = torch.zeros(len(self.INPUTS) * max_batch, dtype=torch.int64, device=dev)
        self.group_rows = group_rows
        self.i32 = torch.zeros(max_batch, 1 + max_blocks, **i32)
        self.i32[:, 0] = 1
        self.tables = self.i32[:, 1:]                    # (max_batch, max_blocks), row stride 1 + max_blocks
        self.ctx = torch.ones(max_batch, **i32)          # contiguous copy of column 0 (kernels want it dense)
        self.cu = torch.arange(max_batch + 1, **i32)
        self.short_blocks = min(max_blocks, -(-self.SHORT_CONTEXT // kv_cache.shape[3]))
        self.graphs = {}
        # every graph writes its logits here: a graph's output outlives its capture, so outputs of its own
        # would keep one (batch x vocab) fp32 block per graph alive (GBs for the whole ladder)
        self.logits = torch.empty(max_batch, model.lm_head.weight.shape[0], dtype=model.lm_head.weight.dtype,
                                  device=dev)
        pool = None
        self.block_size = block_size = kv_cache.shape[3]
        for b in reversed(self.sizes):          # largest first, so smaller graphs reuse its memory pool
            ids, pos, slots, gather, lead, steps = self.inputs(b)
            self.i64.zero_()                    # captured on harmless inputs: padding rows' (groups of one row)
            lead.fill_(1)
            for width in sorted({max_blocks, self.short_blocks}):
                kinds = [(False, False, False)]              # (cascade, grouped, sampled)
                if b >= attention.CASCADE_MIN_BATCH:
                    kinds.append((True, False, False))
                if group_rows:
                    kinds.append((False, True, False))
                if sample_tail:
                    kinds += [(cascade, False, True) for cascade, grouped, _ in kinds if not grouped]
                for cascade, grouped, sampled in kinds:
                    meta = AttnMeta(self.cu[:b + 1], self.ctx[:b], self.tables[:b, :width], slots, None,
                                    is_decode=True, max_seqlen_q=1)                # logits of every row
                    if grouped:
                        meta.row_groups, meta.group_rows = lead, group_rows
                    def run():                  # everything in here is captured: no extra launches per step
                        self.ctx[:b].copy_(self.i32[:b, 0])
                        if cascade:
                            meta.shared_prefix = attention.plan_shared_prefix(meta.block_tables, meta.context_lens,
                                                                            block_size)
                        hidden = model(ids, pos, meta, kv_cache, (last_tokens, gather))   # PENDING: last step's
                        model.compute_logits(hidden, out=self.logits[:b])
                        if sampled:
                            sample_tail(self.logits[:b], steps, last_tokens[:b])
                    with torch.inference_mode():
                        run()                       # warm-up: Triton compiles, cuBLAS picks its kernels
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool):
                            run()
                    pool = g.pool()
                    self.graphs[b, width, cascade, grouped, sampled] = g
        self.pool = pool                        # the sampler's graphs share it
        torch.cuda.synchronize()

    # a step's int64 inputs, a row of b each: token ids (padding rows 0), positions, cache slots (padding rows:
    # slot 0, in reserved block 0), the last_tokens row of a PENDING id, row_groups (only the grouped graphs read
    # it), each row's output position (the sampler's noise is keyed by it: sample_tail, SamplerGraphs)
    INPUTS = ("ids", "pos", "slots", "gather", "lead", "steps")

    @staticmethod
    def stride(b: int) -> int:
        """inputs(b)'s row stride: even, so each row starts 16-byte aligned (Triton compiles a kernel per alignment)."""
        return b + b % 2

    def inputs(self, b: int) -> torch.Tensor:
        """(len(INPUTS), b) int64: the rows size b's graphs read, together at the front, so a step copies them at
        once (rows of stride(b) entries)."""
        r = self.stride(b)
        return self.i64[:len(self.INPUTS) * r].view(len(self.INPUTS), r)[:, :b]

    def prepare(self, ids, pending, ctx, tables, shared: bool, seq_rows: list[int] | None = None,
                steps: list[int] | None = None, sampled: bool = False) -> tuple:
        """A decode batch's inputs as two flat host arrays (int64 and int32) and the key of its graph. seq_rows:
        Runner.forward's; then the grouped graph (not cascade). steps: each row's output position (the sampler's
        noise). sampled: the plain graph that samples (sample_tail)."""
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        r, bs = self.stride(b), self.block_size
        gather = [0] * r
        for i, row in pending:
            gather[i] = row
        w = len(tables[0])
        # one token per row: its position ctx - 1 and cache slot are cheaper made here than by kernels
        pos, slots = [], []
        rows, last = array.array("i"), None              # rows: each one's context length, then its block table
        for c, row in zip(ctx, tables):
            if row is not last:              # a verify pass's rows of one sequence share its table: converted
                last, table = row, array.array("i", row)   # once (64 x 4 rows: 0.86 -> 0.23 ms, a 2-core CPU)
            pos.append(c - 1)
            slots.append(row[(c - 1) // bs] * bs + (c - 1) % bs)
            rows.append(c)
            rows.extend(table)
        rows.extend(array.array("i", [1] + [0] * w) * (b - n))     # padding rows: one token of context, in block 0
        width = self.short_blocks if w <= self.short_blocks else self.tables.shape[1]
        lead = [1] * n if seq_rows is None else attention.row_groups(seq_rows, self.group_rows)
        pad = [0] * (r - n)                              # every row of inputs(b) padded to its stride
        i64 = array.array("q", ids + pad + pos + pad + slots + pad + gather + lead + [1] * (r - n)
                          + (steps or [0] * n) + pad)
        grouped = seq_rows is not None
        assert not sampled or (self.sample_tail and not grouped), "only plain graphs sample, given a sample_tail"
        return (b, width, shared and not grouped, grouped, sampled), n, i64, rows

    def replay(self, key: tuple, n: int, i64: array.array, i32: array.array) -> torch.Tensor:
        """Two host-to-device copies (the int64 inputs in one, the int32 metadata in the other), one replay."""
        b = key[0]
        self.i64[:len(i64)].copy_(torch.frombuffer(i64, dtype=torch.int64).pin_memory(), non_blocking=True)
        i32 = torch.frombuffer(i32, dtype=torch.int32).view(b, -1)
        self.i32[:b, :i32.shape[1]].copy_(i32.pin_memory(), non_blocking=True)
        self.graphs[key].replay()
        return self.logits[:n]
