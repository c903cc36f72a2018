"""Continuous batching: which tokens of which requests run in the next forward pass.

Pure Python (no torch), so it is easy to read and test. Each `schedule()` builds one batch under a token
budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):

  1. every running request gets its next token (a decode), or the next chunk of its prompt when its prefill
     was cut into chunks, oldest first; when KV blocks run out, the youngest running request is preempted:
     its blocks are released (they stay in the prefix cache) and it goes back to the front of the queue, to
     be recomputed later;
  2. waiting requests are admitted first come, first served, while budget, sequence slots and blocks last.
     A new request first reuses whatever prefix of its tokens the radix cache holds, and only the rest is
     computed; a long prompt is split across steps (chunked prefill) so decodes never stall behind it.

Once the forward pass is launched, `advance` counts its tokens as computed and caches newly filled blocks;
each sequence that samples gets a PENDING token, which `complete` fills in when the token reaches the host
(a step later: the engine prepares the next batch while the GPU runs). The engine decides when a request
stops (it owns the tokenizer) and calls `finish`.
"""
import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from cache import BlockManager, Node


PENDING = -1   # a sampled token still on the GPU: the engine fills it in one step later (see LLM.step)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's tokens and where its K/V live."""
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)   # prompt + output so far
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0        # leading tokens whose K/V are in the cache
    num_cached_hit: int = 0      # of those, tokens that came from the prefix cache (stats)
    tree_node: Node | None = None   # deepest radix node of this sequence's blocks; None: stop caching them
    num_tree_blocks: int = 0     # how many leading blocks of block_table are in the radix tree
    reuse_prefix: bool = True    # may start from the prefix cache (not when its prompt's logprobs are wanted)
    num_draft: int = 0           # trailing tokens that are speculative drafts, not yet verified (speculate.py)
    draft_kv: int = 0            # leading tokens whose K/V the draft model's cache holds (speculate.DraftModel)
    spec_kept: float = 4.5       # drafts the target kept and ...
    spec_missed: float = 1.5     # ... passes ending at a wrong draft, decayed (speculate.acceptance; from 0.75)
    spec_resume: int = 0         # the token count at which drafting resumes (a sequence paused alone)
    spec_wait: int = 0           # the current pause's length in tokens (doubled by each failed probe)
    positions: dict = field(default_factory=dict)   # token -> its positions before num_seen (speculate.index_tokens)
    num_seen: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]


@dataclass
class Batch:
    seqs: list[Sequence]
    num_new: list[int]           # tokens of each sequence computed in this step
    is_decode: bool              # every sequence computes exactly one token


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []           # admission order: the last one is preempted first
        self.num_preemptions = 0
        self.prefill_tokens_computed = 0

    def add(self, seq: Sequence):
        need = -(-(len(seq.prompt_ids) + seq.max_tokens) // self.blocks.block_size)
        if need > self.blocks.num_blocks - 1:
            raise ValueError(f"request needs {need} KV blocks ({len(seq.prompt_ids)} prompt + {seq.max_tokens} "
                             f"new tokens) but the whole cache has {self.blocks.num_blocks - 1}; lower max_tokens")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- building a batch ---------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed + n) // self.blocks.block_size) - len(seq.block_table)

    def schedule(self) -> Batch:
        budget = self.max_num_batched_tokens
        seqs, num_new = [], []
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens - len(seq.prompt_ids) >= seq.max_tokens:
                i += 1                                   # its last token is in flight: it ends when that lands
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks_needed(seq, n)
            if need > 0:                                 # a decode needs a block once every block_size steps
                while need > self.blocks.num_usable and self.running[-1] is not seq:
                    self.preempt(self.running[-1])
                if need > self.blocks.num_usable:
                    self.preempt(seq)                    # alone it still does not fit: wait for room
                    break
                seq.block_table += self.blocks.allocate(need)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            i += 1
        preempted = self.num_preemptions > preemptions_before      # no admissions in a step short of blocks
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting.popleft()
            cached, node = self.blocks.match(seq.token_ids) if seq.reuse_prefix else ([], self.blocks.root)
            if self.prefix_in_flight(seq, len(cached)):
                deferred.append(seq)                      # next step its prefix is in the cache
                continue
            if not self.admit(seq, budget, cached, node):
                self.waiting.appendleft(seq)
                break
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(min(seq.num_tokens - seq.num_computed, budget))
            budget -= num_new[-1]
        self.waiting.extendleft(reversed(deferred))
        is_decode = all(n == 1 and s.num_computed + 1 == s.num_tokens for s, n in zip(seqs, num_new))
        return Batch(seqs, num_new, is_decode and bool(seqs))

    def prefix_in_flight(self, seq: Sequence, num_cached_blocks: int) -> bool:
        """True when a request still in prefill is computing the next block seq's prompt needs beyond the
        num_cached_blocks the cache holds. Admitting seq a step later lets it reuse that block instead of
        computing it twice (the common case: many requests with one system prompt arriving together)."""
        if not self.blocks.enable_prefix_cache:
            return False
        bs = self.blocks.block_size
        n = num_cached_blocks * bs
        if n + bs >= seq.num_tokens:
            return False
        block = seq.token_ids[n:n + bs]
        return any(r.num_computed <= n and n + bs <= len(r.prompt_ids) and r.token_ids[n:n + bs] == block
                   for r in self.running)

    def admit(self, seq: Sequence, budget: int, cached: list[int], node: Node) -> bool:
        """Reuse the cached prefix of seq's tokens (cached blocks, down to node: BlockManager.match) and allocate
        blocks for its first chunk, or change nothing."""
        if len(cached) * self.blocks.block_size == seq.num_tokens:
            cached = cached[:-1]                          # leave the last block to compute: it yields the logits
            node = node.parent
        n_cached = len(cached) * self.blocks.block_size
        n = min(seq.num_tokens - n_cached, budget)
        need = -(-(n_cached + n) // self.blocks.block_size) - len(cached)
        # cached blocks nobody uses are counted as usable, so taking them must leave room for `need` new ones
        idle_hits = sum(self.blocks.ref[b] == 0 for b in cached)
        if need > self.blocks.num_usable - idle_hits:
            return False
        self.blocks.acquire(cached)
        seq.block_table = cached + self.blocks.allocate(need)
        seq.num_computed = seq.num_cached_hit = n_cached
        seq.tree_node, seq.num_tree_blocks = node, len(cached)
        self.blocks.hit_tokens += n_cached
        seq.status = Status.RUNNING
        return True

    def preempt(self, seq: Sequence):
        """Free seq's blocks (computed ones stay cached) and put it back at the head of the queue."""
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- around the forward pass --------------------------------------------------------------------------
    def advance(self, batch: Batch) -> list[Sequence]:
        """Right after the batch's forward pass is launched: count its tokens as computed, and give every
        sequence that now samples a PENDING slot for its next token. Returns those sequences, in batch order."""
        out = []
        for seq, n in zip(batch.seqs, batch.num_new):
            if seq.num_computed < len(seq.prompt_ids):
                self.prefill_tokens_computed += min(n, len(seq.prompt_ids) - seq.num_computed)
            seq.num_computed += n
            if seq.token_ids[seq.num_computed - 1] != PENDING:   # else: once that token lands, in complete()
                self.cache_full_blocks(seq)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(PENDING)
                out.append(seq)
        return out

    def complete(self, seq: Sequence, index: int, token: int):
        """The sampled token for seq.token_ids[index] has reached the host."""
        seq.token_ids[index] = token
        self.cache_full_blocks(seq)

    def cache_full_blocks(self, seq: Sequence):
        """Put blocks that became full of computed tokens into the radix tree, so later requests reuse them
        (never one holding an unverified draft)."""
        while (seq.tree_node is not None
               and (seq.num_tree_blocks + 1) * self.blocks.block_size <= seq.num_computed - seq.num_draft):
            i = seq.num_tree_blocks
            seq.tree_node = self.blocks.insert(seq.tree_node, self.blocks.block_key(seq.token_ids, i),
                                               seq.block_table[i])
            seq.num_tree_blocks += 1

    def finish(self, seq: Sequence, reason: str):
        """End a request (stop, length or abort): release its blocks. Safe to call once per request."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def release(self, seq: Sequence):
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.tree_node, seq.num_tree_blocks, seq.draft_kv = [], 0, None, 0, 0


def pack(batch: Batch, sample_row: dict):
    """Pack the batch into host lists: the new tokens end to end, per-sequence metadata (query offsets, context
    lengths, block tables, logits rows), and for each PENDING token (packed row, row of last_tokens holding
    it). Positions and cache slots are derived on the device (positions_and_slots)."""
    ids, pending, cu, ctx, logits_idx = [], [], [0], [], []
    for seq, n in zip(batch.seqs, batch.num_new):
        start = seq.num_computed
        ids += seq.token_ids[start:start + n]
        cu.append(cu[-1] + n)
        ctx.append(start + n)
        if ids[-1] == PENDING:                     # only a sequence's newest token can be in flight
            pending.append((cu[-1] - 1, sample_row[seq]))
        if start + n == seq.num_tokens:
            logits_idx.append(cu[-1] - 1)
    return ids, pending, cu, ctx, padded_tables(batch.seqs), logits_idx


def padded_tables(seqs) -> list[list[int]]:
    """The sequences' block tables, padded with block 0 to the longest (one rectangular tensor on the device)."""
    width = max(len(s.block_table) for s in seqs)
    return [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
