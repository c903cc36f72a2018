"""Speculative decoding by prompt lookup (n-gram drafts), exact for greedy requests, inside continuous batching.

    llm = LLM(EngineArgs(model=..., speculative_method="ngram", num_speculative_tokens=4))
    python sample.py --model ./Qwen3-8B --speculative-method ngram --temperature 0 --prompt "..."

A decode step reads all the weights for one token per sequence. When a request repeats itself (code edits,
quoting its context, lists), its next tokens are often the continuation of an earlier occurrence of its latest
n-gram: propose K of those (`ngram_drafts`), run the target over the last token and the K drafts at once (a short
prefill over the paged cache, one forward), keep the drafts up to the first one the target's argmax disagrees
with, and take the target's own token there. Every step yields 1..K+1 tokens, each exactly what greedy decoding
would have produced, for about the cost of one decode step (the weights are read once).

How it sits in the engine (`LLM.step` hands a step here when `ready`):
  - only pure decode phases speculate: nothing waiting, no prompt half computed, every running request greedy,
    without logprobs, penalties or a grammar, and not opted out (`SamplingParams.speculative`); other steps
    are the engine's own.
  - drafts are appended to the sequence's tokens and marked (`Sequence.num_draft`), so the scheduler computes
    them like a prompt chunk and never puts a block holding an unverified token into the prefix cache.
  - after the verify pass the rejected drafts are cut off: their K/V slots lie past `num_computed` and are
    overwritten later; their blocks stay with the sequence (they hold its next tokens) and are freed with it.
  - the verify pass runs eagerly (no CUDA graph) and synchronously: the next drafts depend on its result.

Not here (yet): drafts from a small draft model, and sampled requests (they decode without drafts).
The bench replaces `drafter` with one that proposes a known continuation, partly corrupted, to measure the
mechanism at a chosen acceptance rate (bench.py spec).
"""
import torch

from model import AttnMeta
from scheduler import Status, pack

NGRAM_MAX, NGRAM_MIN = 4, 1      # longest and shortest suffix looked up in the request's own tokens


def ngram_drafts(tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram (n = 4 .. 1)."""
    L = len(tokens)
    for n in range(min(NGRAM_MAX, L - 1), NGRAM_MIN - 1, -1):
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):                    # latest occurrence first, not the suffix itself
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


def eligible(params) -> bool:
    return (params.speculative and params.greedy and not params.needs_last_token and params.logprobs is None
            and params.prompt_logprobs is None)


class Speculator:
    """Drafting and verification state of one engine (the counters feed /metrics and bench.py)."""

    def __init__(self, k: int):
        self.k = k
        self.drafter = lambda seq, k: ngram_drafts(seq.token_ids, k)   # (Sequence, k) -> up to k draft tokens
        self.drafted = self.accepted = self.verify_steps = self.verified = 0   # verified: sequence-steps
        self.graphs: dict[int, VerifyGraphs] = {}     # by k

    def ready(self, llm) -> bool:
        sch = llm.scheduler
        return (not sch.waiting and bool(sch.running)
                and all(s.num_computed == s.num_tokens - 1 and eligible(llm.requests[s.request_id].params)
                        for s in sch.running))

    def step(self, llm) -> list:
        """One speculative step of the engine (see the file's docstring); returns its StepOutputs."""
        outputs = llm.collect(llm.in_flight) if llm.in_flight is not None else []
        llm.in_flight = None
        sch = llm.scheduler
        for seq in sch.running:                      # drafts, never past the request's last token
            room = seq.max_tokens - (seq.num_tokens - len(seq.prompt_ids)) - 1
            drafts = self.drafter(seq, min(self.k, room)) if room > 0 else []
            seq.token_ids += drafts
            seq.num_draft = len(drafts)
        if not any(s.num_draft for s in sch.running):
            return outputs + llm.step_ahead()        # nothing to verify: an ordinary (graphed) decode step
        batch = sch.schedule()
        in_batch = set(map(id, batch.seqs))
        for seq in list(sch.running) + list(sch.waiting):
            if seq.num_draft and (seq.status != Status.RUNNING or id(seq) not in in_batch):
                del seq.token_ids[len(seq.token_ids) - seq.num_draft:]      # preempted or left out: no drafts
                seq.num_draft = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            cut = seq.num_computed + n                 # a token budget that cut the drafts short: drop the rest
            if cut < seq.num_tokens:
                seq.num_draft -= seq.num_tokens - cut
                del seq.token_ids[cut:]
        if not batch.seqs:
            return outputs
        llm.num_forwards += 1
        graphs = self.graphs_for(llm, batch)
        if graphs is not None:                         # every sequence padded to k+1 tokens, one graph replay
            target = graphs.run(batch).tolist()
            rows = [i * (self.k + 1) + j for i, seq in enumerate(batch.seqs) for j in range(seq.num_draft + 1)]
            target = [target[r] for r in rows]
        else:
            ids, _, cu, ctx, tables, _ = pack(batch, {})
            rows = [r for seq, end in zip(batch.seqs, cu[1:]) for r in range(end - 1 - seq.num_draft, end)]
            hidden = llm.forward_eager(batch, ids, [], cu, ctx, tables, rows)
            target = llm.model.compute_logits(hidden).argmax(-1).tolist()    # the step's one host sync
        sch.advance(batch)                             # counts the drafts as computed; no blocks cached yet
        at = 0
        for seq in batch.seqs:
            d = seq.num_draft
            base = seq.num_tokens - 1 - d              # tokens before the drafts (PENDING is the last)
            drafts, t = seq.token_ids[base:base + d], target[at:at + d + 1]
            at += d + 1
            a = next((j for j in range(d) if drafts[j] != t[j]), d)        # drafts the target agrees with
            seq.token_ids[base:] = drafts[:a] + [t[a]]
            seq.num_computed, seq.num_draft = base + a, 0
            sch.cache_full_blocks(seq)
            self.drafted, self.accepted, self.verified = self.drafted + d, self.accepted + a, self.verified + 1
            req = llm.requests[seq.request_id]
            for index in range(base, base + a + 1):
                outputs.append(llm.check_stop(seq, req, index, None))
                if seq.status == Status.FINISHED:
                    break
        self.verify_steps += 1
        return outputs

    def graphs_for(self, llm, batch):
        """The verify graphs for this batch, captured on first use for (k, batch size), or None: eager."""
        if llm.graphs is None or len(batch.seqs) > VerifyGraphs.MAX_BATCH:
            return None
        if max(s.num_computed for s in batch.seqs) + self.k + 1 > llm.max_model_len:
            return None                                # padding would run past the RoPE table
        if self.k not in self.graphs:
            self.graphs[self.k] = VerifyGraphs(llm, self.k, llm.graphs.pool)
        return self.graphs[self.k]

    def stats(self) -> dict:
        """Acceptance = accepted / drafted; tokens per target step of a sequence = 1 + accepted / verified."""
        return {"spec_draft_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_verify_steps": self.verify_steps, "spec_verified_seqs": self.verified}


class VerifyGraphs:
    """CUDA graphs of the verify pass for k drafts, for batches of 1, 2, 4, 8 and 16 sequences: each sequence's
    last token and drafts padded to k + 1 tokens (a sequence with fewer drafts gets dummy tokens after them, a
    missing one a dummy sequence in block 0). A dummy token's K/V lands past the sequence's computed tokens (or
    in block 0 past its blocks), where nothing reads it before the next step writes it. The graph ends with
    the argmax of every position's logits. Eagerly, an 8b verify pass spends ~15 ms launching ~400 kernels."""
    MAX_BATCH = 16

    def __init__(self, llm, k: int, pool=None):
        model, kv, dev = llm.model, llm.kv_cache, llm.device
        self.k, self.block_size, n = k, llm.args.block_size, k + 1
        self.sizes = [b for b in (1, 2, 4, 8, 16) if b <= llm.args.max_num_seqs]
        B, T, W = self.sizes[-1], self.sizes[-1] * n, llm.max_blocks_per_seq
        self.i64 = torch.zeros(2, T, dtype=torch.int64, device=dev)          # input ids, cache slots
        self.pos = torch.zeros(T, dtype=torch.int64, device=dev)
        self.ctx = torch.full((B,), n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(B, W, dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(T, dtype=torch.int64, device=dev)
        cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=dev)
        rows = torch.arange(T, device=dev)
        self.graphs = {}
        for b in reversed(self.sizes):
            t = b * n
            meta = AttnMeta(cu[:b + 1], self.ctx[:b], self.tables[:b], self.i64[1, :t], rows[:t], is_decode=False,
                            max_seqlen_q=n)
            def run(t=t, meta=meta):                   # bound now: the CPU keeps these closures
                logits = model.compute_logits(model(self.i64[0, :t], self.pos[:t], meta, kv))
                self.tokens[:t].copy_(logits.argmax(-1))
            if dev.type != "cuda":                     # the CPU (tests): the same padded pass, run eagerly
                self.graphs[b] = run
                continue
            with torch.inference_mode():
                run()                                  # warm-up (padding only: block 0)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    run()
            pool = g.pool()
            self.graphs[b] = g.replay
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(self, batch) -> torch.Tensor:
        """Tokens (argmax) at every padded position of the batch, on the device: (b * (k + 1),)."""
        n, bs = self.k + 1, self.block_size
        b = next(s for s in self.sizes if s >= len(batch.seqs))
        ids, pos, slots, ctx = [], [], [], []
        for seq in batch.seqs:
            start = seq.num_computed
            chunk = seq.token_ids[start:start + 1 + seq.num_draft]
            ids += chunk + [0] * (n - len(chunk))
            for p in range(start, start + n):
                pos.append(p)
                block = seq.block_table[p // bs] if p // bs < len(seq.block_table) else 0
                slots.append(block * bs + p % bs)
            ctx.append(start + n)
        pad = b - len(batch.seqs)
        ids += [0] * (pad * n)
        pos += list(range(n)) * pad
        slots += list(range(n)) * pad
        ctx += [n] * pad
        t = b * n
        pin = (lambda x: x.pin_memory()) if self.tokens.is_cuda else (lambda x: x)
        self.i64[:, :t].copy_(pin(torch.tensor([ids, slots], dtype=torch.int64)), non_blocking=True)
        self.pos[:t].copy_(pin(torch.tensor(pos, dtype=torch.int64)), non_blocking=True)
        self.ctx[:b].copy_(pin(torch.tensor(ctx, dtype=torch.int32)), non_blocking=True)
        width = max(len(s.block_table) for s in batch.seqs)
        table = torch.zeros(b, width, dtype=torch.int32)
        for i, seq in enumerate(batch.seqs):
            table[i, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        self.tables[:b].zero_()
        self.tables[:b, :width].copy_(pin(table), non_blocking=True)
        self.graphs[b]()
        return self.tokens[:t]
