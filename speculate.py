"""Speculative decoding, exact, inside continuous batching: drafts by prompt lookup (n-gram) or a draft model.

    llm = LLM(EngineArgs(model=..., speculative_method="ngram", num_speculative_tokens=4))
    python sample.py --model ./Qwen3-8B --speculative-method ngram --temperature 0 --prompt "..."
    python sample.py --model ./Qwen3-8B --speculative-method draft --speculative-model ./Qwen3-0.6B --prompt "..."

A decode step reads all the weights for one token per sequence. When a request repeats itself (code edits,
quoting its context, lists), its next tokens are often the continuation of an earlier occurrence of its latest
n-gram: propose K of those (`ngram_drafts`), run the target over the last token and the K drafts at once (a short
prefill over the paged cache, one forward), keep the drafts up to the first one the target's own token at that
position disagrees with, and take the target's token there. Every step yields 1..K+1 tokens, each exactly what
decoding without drafts would have produced, for about the cost of one decode step (the weights are read once).

Sampled requests too: the target's token at each position is drawn as the sampler draws it there (Gumbel-max
with noise hashed from seed, output position and token id, after the same filters), so a seeded request gives
the same tokens with or without speculation. For a fixed draft d that is the standard rejection scheme of
speculative decoding: the draft survives with probability p(d), and a rejected position's token follows p
with d taken out and renormalized; the output follows the target's distribution.

How it sits in the engine (`LLM.step` hands a step here when `ready`):
  - only pure decode phases speculate: nothing waiting, no prompt half computed, every running request
    without logprobs, penalties or a grammar, and not opted out (`SamplingParams.speculative`), and some
    sequence drafting (for n-gram drafts: whose tokens known on the host already end in an n-gram seen before,
    `ngram_gate`), with room for drafts in a verify pass of one decode graph's rows (`max_drafts`), and when a
    round is expected to pay: its cost in plain steps is measured and weighed against the drafts each sequence
    is expected to keep (MIN_ACCEPTED's comment), and it takes the number of drafts (up to K) that pays best;
    other steps are the engine's own.
  - drafts are appended to the sequence's tokens and marked (`Sequence.num_draft`), so the scheduler computes
    them like a prompt chunk and never puts a block holding an unverified token into the prefix cache.
  - after the verify pass the rejected drafts are cut off: their K/V slots lie past `num_computed` and are
    overwritten later; their blocks stay with the sequence (they hold its next tokens) and are freed with it.
  - a round is launched in one engine step and read at the start of the next, before anything else is decided
    (the next drafts depend on it: that wait is the round's one host sync); the StepOutputs of its tokens are made
    once the next step is launched (`settle`, `report`). Its verify pass runs in the decode CUDA graphs where it
    fits them, each of its tokens a decode row of its own, a sequence's rows attending together so that its
    context is read once (`forward_tokens`).

A draft model (`DraftModel`: a smaller Qwen3 with the same vocabulary) proposes its own greedy continuation.
It has its own Runner and KV cache with the target's block layout (same block size and count), so a sequence's
block table addresses both caches and the scheduler allocates for both at once. It runs only in speculative
steps and catches up lazily: at the start of a round each sequence's tokens it has not seen (from
`Sequence.draft_kv`, which a preemption resets) go through it (`forward_tokens`), which yields the first draft; the
other K - 1 are single-token decodes (CUDA graphs on the GPU), each reading the previous draft on the device.
The drafts stay there: the verify pass takes them as pending inputs (as a decode step takes the token sampled
before it), and the host reads them with the target's tokens, one sync per round (not two: the GPU would idle
while the host turned the drafts around). A rejected draft leaves stale K/V in the draft cache past the accepted
tokens: `draft_kv` is cut back to them, and they are overwritten later. A sampled request verifies the draft
model's greedy tokens by the rule above (exact; the acceptance rate is the target's probability of the draft).

The bench replaces `drafter` (or, with a draft model, rewrites its drafts through `rewrite`) to propose a known
continuation, partly corrupted, and so measure the mechanism at a chosen acceptance rate (bench.py spec); for the
rows of the engine's own rule it judges drafts by coin flips instead (`judge`).
"""
import itertools
import time
from typing import NamedTuple

import torch

import attention
import kernels
from runner import gpu_event, shares_first_block, to_device, to_host
from scheduler import PENDING, Status, padded_tables

NGRAM_MAX, NGRAM_MIN = 4, 1      # longest and shortest suffix looked up in the request's own tokens
# When drafting pays is measured, not assumed. A round (draft, verify) costs r plain decode steps of the same batch
# (StepClock: both timed on the host, as the caller sees them) and gives each drafting sequence 1 + its kept drafts,
# the others 1, so it pays while the drafting sequences' expected kept drafts add up to more than (r - 1) x the
# batch. r differs by drafter and batch size: qwen3-8b, H200, K = 4, r = 2.06 at batch 1 and 2.87 at 16 with a
# qwen3-0.6b draft model, 1.30 and 1.68 with free drafts (bench.py spec), so with the draft model 70% kept drafts
# (1.77 kept per pass) pay at batch 1 (1.32x) and lose at 16 (0.91x). A sequence's acceptance is estimated from its
# kept drafts and its misses (the first wrong draft of a pass), both decayed by ACCEPT_DECAY per pass (about the
# last 16 passes), starting from 4.5 and 1.5 (0.75, worth 6 drafts: with 2, two unlucky passes at batch 1 paused
# runs that pay), and K drafts keep a + a^2 .. + a^K of them (expected_kept). When a round would not pay, the whole
# batch decodes plainly for PROBE_EVERY steps, then runs one round again (a probe, which measures again); each
# probe that fails doubles the pause, up to PROBE_MAX; a new sequence in the batch ends a pause. (Tried and dropped:
# a new batch's pauses starting at PROBE_EVERY again instead of doubling the last batch's: `bench.py spec`, qwen3-8b +
# qwen3-0.6b draft, batch 16, kept 0%, K = 2 / 4 / 8: 0.94 / 0.93 / 0.90x against 0.95-0.97x in two calls before,
# more probes of costly rounds, while the sampled 70% rows at K = 4 / 8 still declined after 5 passes.) Apart from that,
# a sequence expected to keep fewer than MIN_ACCEPTED drafts a pass pauses alone, in tokens, by the same doubling
# (so that a hopeless sequence leaves a batch's verify passes; set low, as chance dips of a sequence that keeps
# 40% of K = 8 drafts paused it while the others drafted).
# A round may also take fewer drafts than K: r grows with the drafts (a draft model's step each), the kept ones
# less and less (a^j), so the round takes the count k <= K that gives the most tokens per plain step's time,
# (batch + kept(k)) / r(k). The clock times rounds by their k; a k not timed yet is priced between its neighbours
# that were (a plain step: 0 drafts, r = 1), which makes it look cheap, so it is tried and timed, and the rule
# settles on the measured best. qwen3-8b with a qwen3-0.6b draft model, H200, batch 1: r = 1.62 / 1.92 / 2.55 at
# k = 2 / 4 / 8 (bench.py spec), so at 70% kept K = 8 ran 1.14x and K = 4 1.41x with K drafts in every round; with
# the choice, K = 8 1.39x (batch 16: 0.94 -> 1.02x), K = 2 / 4 within 3%. Where nothing pays (0% kept) the trials of
# smaller k cost 1-4%; free drafts (r nearly flat in k) keep K (HISTORY.md, thirty-ninth session).
MIN_ACCEPTED, PROBE_EVERY, PROBE_MAX = 0.15, 16, 128
ACCEPT_DECAY = 15 / 16
PLAIN_REFRESH = 256    # rounds after which the plain steps are timed again (their cost grows with the contexts)
# A step in which no sequence finds drafts is a plain step that ran synchronously (the lookup needed the last
# token), its host work not overlapped with the GPU: `python bench.py serve --speculative-method ngram` (qwen3-0.6b,
# random weights: few matches, H200) ran 1 client at 0.73x greedy and 0.91x sampled, 64 at 0.90x, the off
# engine's. So a sequence whose lookup finds nothing looks again only NO_MATCH_WAIT tokens later.
NO_MATCH_WAIT = 8
# Still, at 64 sequences some sequence was due nearly every step, and each such step ran synchronously to look it up
# (0.91x sampled). So before collecting the step in flight, each due sequence is first looked up over the tokens
# the host has (`Speculator.gate`, ngram_gate); one without an n-gram there waits NO_MATCH_WAIT tokens at once,
# the step stays an overlapped plain one unless some sequence passes, and only those that pass count toward a
# round's expected kept drafts. Same command, against serving without speculation in the same call, 1 / 16 / 64 /
# 256 clients: 0.97 / 0.98 / 1.00 / 0.93x sampled, 0.93 / 0.94 / 0.98 / 1.05x greedy (the off runs' own spread
# between calls: up to 8% at 256 clients).
# The draft model's catch-up after a pause (B sequences x the pause + 1 tokens each) runs as decode rows in up to
# CATCH_UP_GRAPH_PASSES decode-graph replays, evenly filled, rather than one eager pass, which is launch-bound for
# a small model (9-14 ms, at times 20-25), unless its rows' attention is long: each group of a sequence's rows
# (attention.row_groups) reads its context, so the replays cost ~2 ms each + ~30 us per 1,000 (group, context
# token) pairs. qwen3-0.6b drafting, K = 4 (groups of 5 rows), H200, ms per catch-up (scratch timing of
# DraftModel.fill, synced; two calls of 2026-12-03, the second's eager passes slower throughout), eager / graphs:
#   sequences x tokens, from context   pairs / 5   replays   eager          graphs
#   16 x 17, from 128                  7k          2         9.5 / 16.1     3.6 / 3.8
#   1 x 272, from 128                  14k         2         9.2 / 16.0     3.7 / 4.0
#   1 x 500, from 0                    25k         2         9.2 / 12.0     4.1 / 4.4
#   3 x 255, from 0                    20k         3         9.2 / 17.6     5.5 / 6.0
#   1 x 767, from 0                    59k         3         9.6 / 12.4     6.4 / 7.3
#   16 x 17, from 2,000                109k        2         9.6 / 18.0     7.4 / 7.9
#   16 x 33, from 1,000                107k        3         9.5 / 19.9     8.0 / 8.2
#   4 x 129, from 3,000                316k        3         9.6 / 17.6     15.1 / 14.7
# Before rows were grouped each row read its whole context: 16 x 17 from 2,000 took 14.4 ms in graphs, 4 x 129
# from 3,000 32.5, and the rule counted every row's pairs.
# (A catch-up of up to 256 rows, one replay, always takes the graph, as a round's 1-2 rows a sequence do.)
CATCH_UP_GRAPH_PASSES, CATCH_UP_GRAPH_PAIRS = 3, 300_000


def ngram_drafts(seq, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram (n = 4 .. 1) of the
    sequence's tokens, all final (no drafts among them). The earlier occurrences of its last token come from the
    sequence's index of its tokens (`index_tokens`), newest first, each extended backwards; a 4-gram ends the
    search. The index is grown here by the tokens since the last look: a scan of the whole sequence instead
    (list.index over a reversed copy) cost ~3 us per round at 1,000 tokens and ~22 us when the last token's
    previous occurrence lay far back, for every drafting sequence, on a round's critical path."""
    t = seq.token_ids
    L = len(t)
    index_tokens(seq, L - 1)
    best, at = 0, -1
    for i in reversed(seq.positions.get(t[-1], ())):    # the last token's earlier occurrences, newest first
        n = 1
        while n < NGRAM_MAX and i - n >= 0 and t[i - n] == t[L - 1 - n]:
            n += 1
        if n > best:                             # the longest suffix; the latest among equals
            best, at = n, i
            if best == NGRAM_MAX:
                break
    return t[at + 1:at + 1 + k] if best >= NGRAM_MIN else []


def index_tokens(seq, end: int):
    """Grow the sequence's index of its tokens (Sequence.positions: token -> its positions, oldest first) to the
    tokens before `end`, which must be final (verified or sampled: never a draft, never PENDING)."""
    t, positions = seq.token_ids, seq.positions
    for i in range(seq.num_seen, end):
        positions.setdefault(t[i], []).append(i)
    seq.num_seen = max(seq.num_seen, end)


def ngram_gate(seq) -> bool:
    """Whether the last token of a sequence known on the host (its newest may still be on the GPU) occurred before
    in it (ngram_drafts would find drafts there): then a lookup once the newest token lands will likely find some
    too (NO_MATCH_WAIT's comment). O(1) from the sequence's index (index_tokens), where a scan costs ~15 us per
    1,000 tokens, for each due sequence at every step."""
    t = seq.token_ids
    last = len(t) - 1 - (t[-1] == PENDING)
    if last < 0:
        return False
    index_tokens(seq, last)
    return t[last] in seq.positions


def acceptance(seq) -> float:
    """The estimated chance that the target keeps a sequence's next draft: kept / (kept + missed), decayed counts."""
    return seq.spec_kept / (seq.spec_kept + seq.spec_missed)


def expected_kept(a: float, k: int) -> float:
    """Drafts kept of k when each is kept with chance a, until the first miss: a + a^2 + .. + a^k."""
    return max(0, k) if a >= 1 else a * (1 - a ** max(0, k)) / (1 - a)


def kept_by_drafts(seqs: list, most: int) -> list[float]:
    """[sum of expected_kept(acceptance(s), min(k, room(s))) over seqs for k in 0 .. most]: a^j summed once."""
    added = [0.0] * (most + 1)                       # added[j]: the sequences' chances of keeping their j-th draft
    for seq in seqs:
        a, p = acceptance(seq), 1.0
        for j in range(1, min(most, room(seq)) + 1):
            p *= a
            added[j] += p
    return list(itertools.accumulate(added))


def note_pass(seq, kept: int, drafted: int, k: int, pausing: bool):
    """A verify pass's outcome into the sequence's acceptance counts; one expected to keep fewer than MIN_ACCEPTED of
    k drafts pauses alone (when pausing), twice as long as last time."""
    seq.spec_kept = seq.spec_kept * ACCEPT_DECAY + kept
    seq.spec_missed = seq.spec_missed * ACCEPT_DECAY + (kept < drafted)
    if pausing and expected_kept(acceptance(seq), k) < MIN_ACCEPTED:
        seq.spec_wait = min(2 * seq.spec_wait, PROBE_MAX) if seq.spec_wait else PROBE_EVERY
        seq.spec_resume = seq.num_tokens + seq.spec_wait
    else:
        seq.spec_wait = 0


def room(seq) -> int:
    """Drafts a sequence may take before its last allowed token (never past max_tokens)."""
    return seq.max_tokens - (seq.num_tokens - len(seq.prompt_ids)) - 1


def due(seq) -> bool:
    """Whether a sequence drafts this step, gate aside: not paused, and room for a draft."""
    return seq.num_tokens >= seq.spec_resume and room(seq) > 0


def eligible(params) -> bool:
    """Whether a request may speculate (the engine counts those that may not: LLM.num_unspeculable)."""
    return (params.speculative and not (params.penalized or params.needs_last_token) and params.logprobs is None
            and params.prompt_logprobs is None)


class StepClock:
    """Seconds per plain decode step and per speculative round, by batch size (rounded up to a power of two), on the
    host's clock: what a step costs its caller. A plain step runs from its start to the next step's start, counted
    when the step before it was plain too (then the host's work overlaps the GPU's, as in a run of plain steps);
    a round from after it collected the step before to the next step's start (once the round is read), plus the
    plain step after it, if one: that step collects nothing, and the GPU idles while the host prepares it (the
    pipeline refilling, a cost of the round; `bench.py spec`, qwen3-8b, free drafts, kept 70%, K = 2 / 4 / 8: 1.60 /
    2.08 / 2.01x -> 1.69 / 2.11 / 2.09x at batch 1, 1.54 / 1.83 / 1.73x -> 1.67 / 1.90 / 1.81x at 16). An interval
    counts only when the next step is a decode step of the same batch size (not an idle gap or a prefill). Each
    cost is the median of the last SAMPLES intervals: one slow step (a kernel compiled on first use, a GC pause)
    does not move it. Rounds are timed by their drafts per sequence (k)."""
    SAMPLES = 5

    def __init__(self):
        self.plain, self.round = {}, {}        # batch size (, k for rounds) -> its last intervals, seconds
        self.rounds, self.plain_at = 0, {}     # rounds timed so far; their count when a batch size's plain was
        self.last = None                       # (kind, size, k, start) of the step in progress
        self.before = (None, 0, 0)             # (kind, size, k) of the step before it

    def start(self, kind: str | None, batch: int, now: float, k: int = 0):
        """A step starts now: kind "plain", "round" (of k drafts per sequence) or None (any other step), with `batch`
        sequences running."""
        self.last = (kind, size_of(batch), k, now)

    def stop(self, batch: int | None, now: float):
        """The step in progress ends now, and a decode step of `batch` sequences comes next (None: another kind)."""
        if self.last is not None:
            kind, b, k, t = self.last
            if batch is not None and b == size_of(batch):
                if kind == "round" and k > 0:          # (k = 0: no sequence could draft after all)
                    self.round[b, k] = (self.round.get((b, k), []) + [now - t])[-self.SAMPLES:]
                    self.rounds += 1
                elif kind == "plain" and self.before[:2] == ("plain", b):
                    self.plain[b] = (self.plain.get(b, []) + [now - t])[-self.SAMPLES:]
                    self.plain_at[b] = self.rounds
                elif kind == "plain" and self.before[:2] == ("round", b) and (b, self.before[2]) in self.round:
                    self.round[b, self.before[2]][-1] += now - t       # the refill after a round
            self.before = (kind, b, k)
        self.last = None

    def stale(self, batch: int) -> bool:
        """Whether plain steps of this batch size should be timed first (never yet, or PLAIN_REFRESH rounds ago)."""
        at = self.plain_at.get(size_of(batch))
        return at is None or self.rounds - at > PLAIN_REFRESH

    def ratio(self, batch: int, k: int) -> float | None:
        """A round's time in plain steps at this batch size with k drafts per sequence (None: no round timed yet).
        A k not timed: on the line between the nearest k's timed below and above it (below them all: from a plain
        step, 0 drafts at 1); past them all, in proportion to the largest."""
        b = size_of(batch)
        timed = sorted((j, median(v)) for (c, j), v in self.round.items() if c == b)
        if not timed or b not in self.plain:
            return None
        plain = median(self.plain[b])
        points = [(0, 1.0)] + [(j, t / plain) for j, t in timed]
        for (k0, r0), (k1, r1) in zip(points, points[1:]):
            if k <= k1:
                return r0 + (r1 - r0) * (k - k0) / (k1 - k0)
        k1, r1 = points[-1]
        return 1 + (r1 - 1) * k / k1


def size_of(batch: int) -> int:
    return 1 << max(0, batch - 1).bit_length()


def median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


class BatchRule:
    """Whether a round pays, and how many drafts it takes, for the whole batch; the batch's pause when none does
    (MIN_ACCEPTED's comment): from the StepClock's costs and the drafting sequences' acceptance."""

    def __init__(self, clock: StepClock):
        self.clock = clock
        self.wait = self.wait_left = 0         # the pause: its length and the plain steps left of it,
        self.paused = set()                    # and the sequences it was taken for (held, not their ids)
        self.probing = False                   # the round after the pause is a probe of `most` drafts

    def pays(self, running: list, most: int, gate) -> int:
        """The batch's rule (MIN_ACCEPTED's comment): the drafts per drafting sequence (1 .. most) of the round
        expected to give the most tokens per second, if that beats plain steps, from the rounds and plain steps
        timed so far; 0: a plain step. Plain steps are timed first; no round while no due sequence passes the gate
        (Speculator.gate); with no round timed yet, or after a pause, a round of `most` (it is timed)."""
        if self.wait_left > 0:                         # a pause: plain steps, until a new sequence joins
            if all(s in self.paused for s in running):       # (Sequence compares by identity)
                self.wait_left -= 1
                return 0
            self.wait_left = 0
        self.paused.clear()                            # (no pause: nothing held)
        if self.clock.stale(len(running)):
            return 0
        drafting = gate_due(running, gate)
        if not drafting:
            return 0
        B = len(running)
        r = [self.clock.ratio(B, k) for k in range(most + 1)]    # r[k]: a round of k drafts, in plain steps
        if r[0] is None or self.probing:
            self.probing = False
            return most
        kept = kept_by_drafts(drafting, most)
        k = max(range(1, most + 1), key=lambda k: (B + kept[k]) / r[k])
        if B + kept[k] >= B * r[k]:
            self.wait = 0
            return k
        self.wait = min(2 * self.wait, PROBE_MAX) if self.wait else PROBE_EVERY
        self.wait_left, self.probing = self.wait - 1, True      # this step is the pause's first
        self.paused = set(running)     # the sequences, not ids: a freed sequence's id is the next new object's
        return 0


class Speculator:
    """Drafting and verification state of one engine (the counters feed /metrics and bench.py)."""

    def __init__(self, k: int, model: "DraftModel | None" = None):
        self.k, self.model = k, model
        self.drafter = ngram_drafts   # (Sequence, k) -> up to k draft tokens
        self.rewrite = None          # bench: (Sequence, its draft model's drafts) -> the drafts to verify
        self.judge = None            # bench: (Sequence, drafts, target's tokens) -> drafts kept (not the exact rule)
        self.gate = ngram_gate if model is None else None   # (Sequence) -> worth collecting the step in flight to
        #                              draft it (NO_MATCH_WAIT's comment); None: every due sequence is (a drafter
        #                              that always proposes: a draft model, the bench's)
        self.drafted = self.accepted = self.verify_steps = self.verified = 0   # verified: sequence-steps
        self.drafts = k              # drafts per sequence of the round `ready` decided on (pays)
        self.pausing = True          # False: draft at every step (tests; bench.py measures the verify pass's cost so)
        self.max_rows = None         # rows of a verify pass at most (None: the target's largest decode graph)
        self.clock = StepClock()
        self.rule = BatchRule(self.clock)

    def max_drafts(self, llm) -> int:
        """Drafts per drafting sequence this step at most, so that the verify pass (every running sequence's last
        token, and the drafts) fits one decode graph: an eager pass is launch-bound. qwen3-8b, H200, free drafts,
        K = 8, always drafting, ms/token eager verify -> capped (scratch, same call): batch 32 kept 100% 3.42 ->
        2.30, 70% 10.63 -> 5.33, 0% 21.38 -> 10.70; batch 64 (7.14 without speculation) 4.81 -> 4.18, 14.74 ->
        6.46, 25.56 -> 11.59."""
        running = llm.scheduler.running
        rows = self.max_rows or decode_row_limit(llm.runner)
        drafting = sum(map(due, running))
        return min(self.k, (rows - len(running)) // drafting) if drafting else 0

    def ready(self, llm) -> bool:
        """Whether this step speculates: a pure decode phase (see the file's docstring) in which some sequence
        drafts, when a round pays (BatchRule); the other steps are the engine's own, overlapped, plain ones."""
        sch, now = llm.scheduler, time.perf_counter()
        decode = (not sch.waiting and bool(sch.running) and not llm.num_unspeculable   # (no request waits: all run)
                  and all(s.num_computed == s.num_tokens - 1 for s in sch.running))
        self.clock.stop(len(sch.running) if decode else None, now)
        most = self.max_drafts(llm) if decode else 0
        self.drafts = 0
        if most > 0:                                   # pausing off (tests, bench.py): every step drafts `most`
            self.drafts = self.rule.pays(sch.running, most, self.gate) if self.pausing else most
        self.clock.start("plain" if decode and not self.drafts else None, len(sch.running), now)
        return self.drafts > 0

    def step(self, llm) -> list:
        """One speculative step of the engine (see the file's docstring): launches a round, which `collect` reads
        at the start of the next step (or, when no sequence drafts after all, an ordinary step); returns the
        StepOutputs of the plain step it collected first, if any."""
        outputs = llm.collect(llm.in_flight) if llm.in_flight is not None else []
        llm.in_flight = None
        sch = llm.scheduler
        most = min(self.max_drafts(llm), self.drafts)
        self.clock.start("round", len(sch.running), time.perf_counter(), most)
        for seq in sch.running:                      # drafts, never past the request's last token
            k = min(most, room(seq)) if due(seq) else 0
            if self.model is not None:
                drafts = [PENDING] * k                 # the draft model's: below
            else:
                drafts = self.drafter(seq, k)[:k] if k else []   # no lookup for a sequence not due
            if k and not drafts and self.pausing:      # no n-gram to continue: look again NO_MATCH_WAIT tokens on
                seq.spec_resume = seq.num_tokens + NO_MATCH_WAIT
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
        spans = [(s.num_computed, s.num_tokens) for s in batch.seqs]   # the last verified token and the drafts
        pending, model_drafts = [], None
        start = gpu_event(llm.device)                  # the GPU's busy time (stats), from here to the round's sync
        if self.model is not None:                     # the drafts' cache slots exist now: the draft model runs
            drafted = [s for s in batch.seqs if s.num_draft]
            model_drafts, where = self.model.fill(drafted, llm.args.max_num_batched_tokens)
            if self.rewrite is not None:               # bench: its drafts replace the model's, which stay unread
                for seq in drafted:
                    at = seq.num_tokens - seq.num_draft
                    seq.token_ids[at:] = self.rewrite(seq, seq.token_ids[at:])
                model_drafts = None
            else:                                      # the verify pass reads them on the device: no sync here
                llm.runner.set_last_tokens(model_drafts)
                row_of, n = {}, 0                      # packed row of a sequence's token p: row_of + p
                for seq, (a, b) in zip(batch.seqs, spans):
                    row_of[id(seq)], n = n - a, n + b - a
                pending = [(row_of[id(seq)] + pos, j) for j, (seq, pos) in enumerate(where)]
        llm.num_forwards += 1
        logits = forward_tokens(llm.runner, batch.seqs, spans, padded_tables(batch.seqs), None, pending)
        # each row's token as decoding would draw it there: the argmax, or the seeded draw of that output
        # position (the sampler's noise is a hash of seed, position and token, so the same draw)
        reqs = [llm.requests[seq.request_id] for seq in batch.seqs for _ in range(seq.num_draft + 1)]
        steps = [seq.num_tokens - seq.num_draft - len(seq.prompt_ids) + j for seq in batch.seqs
                 for j in range(seq.num_draft + 1)]
        target = llm.sample_tokens(reqs, steps, logits, graphed=False)
        both = target if model_drafts is None else torch.cat([target.to(torch.int64), model_drafts])
        llm.round = Round(batch.seqs, [s.num_draft + 1 for s in batch.seqs], where if model_drafts is not None else [],
                          to_host(both), start, gpu_event(llm.device))     # read in collect()
        sch.advance(batch)                             # counts the drafts as computed; no blocks cached yet
        self.verify_steps += 1
        return outputs

    def collect(self, llm) -> list:
        """The launched round's tokens, read (its one host sync), and settled; returns what `report` makes the
        round's StepOutputs of, after the next step is launched."""
        r, llm.round = llm.round, None
        if r.end is not None:
            r.end.synchronize()
            llm.gpu_busy += r.start.elapsed_time(r.end) / 1e3
        tokens = r.tokens.tolist()
        n = sum(r.rows)
        for tok, (seq, pos) in zip(tokens[n:], r.where):      # the draft model's drafts
            if seq.status != Status.FINISHED:
                seq.token_ids[pos] = tok
        return settle(self, llm, r.seqs, r.rows, tokens[:n])

    def stats(self) -> dict:
        """Acceptance = accepted / drafted; tokens per target step of a sequence = 1 + accepted / verified."""
        return {"spec_draft_tokens": self.drafted, "spec_accepted_tokens": self.accepted,
                "spec_verify_steps": self.verify_steps, "spec_verified_seqs": self.verified}


class DraftModel:
    """The draft model's Runner and the drafting of one round (see the file's docstring)."""

    def __init__(self, runner):
        self.runner = runner

    def fill(self, seqs: list, max_tokens: int) -> tuple:
        """The draft model's greedy tokens for each sequence's num_draft trailing placeholders, left on the
        device (the verify pass reads them there): (drafts (n,), where), where[j] = (sequence, token position)
        of drafts[j]. max_tokens: tokens per catch-up forward at most (the engine's prefill budget)."""
        if not seqs:
            return torch.empty(0, dtype=torch.long, device=self.runner.device), []
        r = self.runner
        tables = padded_tables(seqs)
        last = [s.num_tokens - s.num_draft - 1 for s in seqs]          # each one's last verified token
        todo = [min(s.draft_kv, L) for s, L in zip(seqs, last)]        # its first token the draft model lacks
        first = torch.empty(len(seqs), dtype=torch.long, device=r.device)
        lag = [max(0, L + 1 - t) for t, L in zip(todo, last)]          # rows; their contexts are t+1 .. L+1
        pairs = sum(k * (t + 1) + k * (k - 1) // 2 for k, t in zip(lag, todo)) // r.group_rows()   # read per group
        passes = -(-sum(lag) // decode_row_limit(r))
        if 1 < passes <= CATCH_UP_GRAPH_PASSES and pairs <= CATCH_UP_GRAPH_PAIRS:   # a few replays, evenly filled
            max_tokens = min(max_tokens, -(-sum(lag) // passes))
        while any(t <= L for t, L in zip(todo, last)):                  # catch up, max_tokens at a time
            rows, spans, ends, budget = [], [], [], max_tokens
            for i, (t, L) in enumerate(zip(todo, last)):
                if t <= L and budget > 0:
                    n = min(L + 1 - t, budget)
                    rows.append(i)
                    spans.append((t, t + n))
                    ends.append((ends[-1] if ends else -1) + n)
                    todo[i], budget = t + n, budget - n
            logits = forward_tokens(r, [seqs[i] for i in rows], spans, [tables[i] for i in rows], ends)
            done = [j for j, i in enumerate(rows) if todo[i] == last[i] + 1]   # rows that reached the last token
            if done:                                   # (pinned copies: a list to the device would sync)
                at = to_device(done, torch.int64, r.device)
                first[to_device([rows[j] for j in done], torch.int64, r.device)] = kernels.argmax(logits[at])
        drafts, live = [first], list(range(len(seqs)))                  # draft j of the sequences in live
        lives = [live]
        for j in range(1, max(s.num_draft for s in seqs)):              # one decode step per further draft
            r.set_last_tokens(drafts[-1])                               # the previous draft, on the device
            row_of = {i: p for p, i in enumerate(live)}
            live = [i for i in live if seqs[i].num_draft > j]
            pending = [(p, row_of[i]) for p, i in enumerate(live)]
            ids, ctx, tabs = [PENDING] * len(live), [last[i] + 1 + j for i in live], [tables[i] for i in live]
            drafts.append(kernels.argmax(r.decode_rows(ids, pending, ctx, tabs, False)))
            lives.append(live)
        where = [(seqs[i], last[i] + 1 + j) for j, live in enumerate(lives) for i in live]
        for s, L in zip(seqs, last):
            s.draft_kv = L + s.num_draft                                # K/V of the last token and drafts 0..d-2
        return torch.cat(drafts), where


class Round(NamedTuple):
    """A launched speculative round whose tokens are still on their way to the host (LLM.round)."""
    seqs: list                          # the verify pass's sequences
    rows: list[int]                     # each one's rows (its drafts + 1)
    where: list                         # (sequence, position) of each draft-model draft read back (after the rows)
    tokens: torch.Tensor                # the target's token at every row, then those drafts (pinned host memory)
    start: torch.cuda.Event | None      # GPU events around the round (None on the CPU): the end is waited on
    end: torch.cuda.Event | None


def settle(spec: Speculator, llm, seqs: list, rows: list[int], target: list) -> list:
    """A verify pass's outcome: each sequence keeps its drafts up to the first the target disagrees with and takes
    the target's token there (target: each sequence's rows in turn). Returns (sequence, first, last) of the tokens
    each one gained, for `report`: only what the next step needs happens here, before it is launched."""
    kept, at = [], 0
    for seq, d1 in zip(seqs, rows):
        t, at = target[at:at + d1], at + d1
        d = d1 - 1
        if seq.status == Status.FINISHED:          # aborted, or stopped (report) while the round ran
            seq.num_draft = 0
            continue
        base = seq.num_tokens - 1 - d              # tokens before the drafts (PENDING is the last)
        drafts = seq.token_ids[base:base + d]
        a = (next((j for j in range(d) if drafts[j] != t[j]), d) if spec.judge is None   # drafts it agrees with
             else spec.judge(seq, drafts, t))
        seq.token_ids[base:] = drafts[:a] + [t[a]]
        seq.num_computed, seq.num_draft = base + a, 0
        seq.draft_kv = min(seq.draft_kv, seq.num_computed)   # the draft model's K/V past here is stale
        spec.drafted, spec.accepted, spec.verified = spec.drafted + d, spec.accepted + a, spec.verified + 1
        if d:
            note_pass(seq, a, d, spec.k, spec.pausing)
        kept.append((seq, base, base + a))
    return kept


def report(llm, kept: list) -> list:
    """settle's tokens as StepOutputs (stop conditions checked, full blocks cached), once the next step is on
    the GPU: this host work then overlaps it. A sequence that stops here may have joined that step: its tokens
    there are dropped (as a plain step's after a stop: LLM.step's comment)."""
    outputs = []
    for seq, first, last in kept:
        if seq.status == Status.FINISHED:          # aborted since
            continue
        llm.scheduler.cache_full_blocks(seq)
        req = llm.requests[seq.request_id]
        for index in range(first, last + 1):
            outputs.append(llm.check_stop(seq, req, index, None))
            if seq.status == Status.FINISHED:
                break
    return outputs


def gate_due(running: list, gate) -> list:
    """The due sequences that pass the gate (Speculator.gate; None: all), that is those that would draft; the others
    wait NO_MATCH_WAIT tokens."""
    drafting = []
    for s in running:
        if due(s):
            if gate is None or gate(s):
                drafting.append(s)
            else:
                s.spec_resume = s.num_tokens + NO_MATCH_WAIT
    return drafting


def decode_row_limit(runner) -> int:
    """Tokens a pass may hold to run as decode rows: the largest decode graph's batch (on the CPU, no graphs: a
    decode batch's)."""
    return runner.graphs.max_batch if runner.graphs is not None else runner.args.max_num_seqs


def forward_tokens(runner, seqs, spans, tables, rows, pending=()) -> torch.Tensor:
    """Run tokens seqs[i].token_ids[a:b] for each span (a, b) through the model (their K/V into the cache);
    returns the logits of the packed rows `rows` (None: every row), (len(rows), vocab). pending: (packed row,
    runner.last_tokens row) of each token that is still on the device (PENDING in token_ids).

    When the tokens fit the decode graphs, each token is a decode row of its own: context = its position + 1,
    its sequence's block table. A graph replays the whole pass at once, where an eager pass is launch-bound
    (an 8b verify pass of 4 drafts took 17-28 ms eagerly, 5.1 ms as decode rows in a graph; H200). The qk-norm
    kernel writes every row's K/V before attention reads any, so a row sees the tokens before it in the same
    pass. Such passes say so (seq_rows: each sequence's rows): the fused decode kernel of a plain decode step
    stores each row's K/V itself while other rows of the pass already attend, so a row could read another's slot
    before it is written (H200, qwen3-8b, one sequence: 1% of the drafts of the target's own continuation kept,
    not 99%). A sequence's rows are attended together (attention.row_groups), so its context is read once, not
    once per row, which at long contexts and many sequences costs more than the weights (qwen3-0.6b serving 64
    clients with n-gram drafts, contexts up to 2,048: a verify pass of 3 drafts each 6.5-8.8 ms, a plain step 3.0)."""
    n = sum(b - a for a, b in spans)
    if n <= decode_row_limit(runner):                 # as many rows as a decode batch
        ids, ctx, tabs = [], [], []
        for seq, (a, b), table in zip(seqs, spans, tables):
            ids += seq.token_ids[a:b]
            ctx += range(a + 1, b + 1)
            tabs += [table] * (b - a)
        seq_rows = [b - a for a, b in spans]
        if max(seq_rows) == 1:                        # a token per sequence: an ordinary decode batch
            seq_rows = None
        # a sequence's rows grouped, or (one row each) cascade attention when sequences share a prefix, so a row's
        # arithmetic does not depend on the other sequences in the pass
        shared = seq_rows is None and n >= attention.CASCADE_MIN_BATCH and shares_first_block(tables)
        logits = runner.decode_rows(ids, pending, ctx, tabs, shared, seq_rows)   # a view of the graphs' buffer
        return logits if rows is None else logits[to_device(rows, torch.int64, logits.device)]
    ids, cu, ctx = [], [0], []
    for seq, (a, b) in zip(seqs, spans):
        ids += seq.token_ids[a:b]
        cu.append(len(ids))
        ctx.append(b)
    rows = list(range(n)) if rows is None else rows
    runner.forward(ids, pending, cu, ctx, tables, rows, max(b - a for a, b in spans), n == len(seqs))
    return runner.logits(0, len(rows))
