"""Penalties and logit bias, applied on the device: nothing a step needs waits for the host.

    pen = Penalties(vocab, device)
    logits = pen.apply(logits.float(), reqs)     # (B, V) fp32, in place: each row's bias and penalties
    tokens = sample(logits, ...)
    pen.count(tokens)                            # the drawn tokens into their requests' counts, on the device
    pen.free(request_id)                         # a request that ends gives its slot back

The settings (SamplingParams) and their order, vLLM's: `logit_bias` adds to chosen logits; then
`repetition_penalty` r (transformers' definition) divides a positive logit by r and multiplies a negative one by
r, for every token seen in the prompt or the output so far; then `presence_penalty` and `frequency_penalty`
(OpenAI's) subtract presence * (count > 0) + frequency * count, over the output tokens only.

A request with penalties holds a *slot* from its first sampled token to its end (a preempted one keeps it): a
row of output-token counts (int32, V wide), a row marking its prompt's tokens (uint8) and its three settings, all
on the device: 760 KB per running request at Qwen3's 151,936-token vocabulary; slots grow in powers of two as
requests arrive and are reused after. A step's rows read their slots in one kernel (`penalize`), and the tokens
they draw are counted into them on the device (`count_tokens`), so the next step, launched before this one's
tokens reach the host, already sees them: a batch with penalties overlaps the host's work as any other. Kept on
the host instead (sparse (token, factor) lists rebuilt and uploaded each step, each step waiting for the last
one's tokens), a step with a repetition penalty took 2.7-3.7 / 9.1-13.4 / 76-105 ms at 8 / 32 / 256 rows; here
1.0-1.1 / 1.5 / 3.4-3.6, against 1.0 / 1.4 / 3.1 sampled without (qwen3-0.6b, H200: HISTORY.md's thirty-fifth
session). The logit bias stays on the host, uploaded per step: it is the request's own short list, fixed for its
life.
"""
import torch

from kernels import _use_triton, tl, triton


def has_penalty(params) -> bool:
    """Whether a request needs a slot (repetition, presence or frequency penalty; the logit bias needs none)."""
    return params.repetition_penalty not in (None, 1.0) or params.presence_penalty != 0 or params.frequency_penalty != 0


# ----------------------------------------------------------------------------------------------------------
# The kernels: references, Triton, dispatch
# ----------------------------------------------------------------------------------------------------------

def penalize_ref(logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, prompt: torch.Tensor,
                 settings: torch.Tensor) -> torch.Tensor:
    """The definition: logits (B, V) fp32, in place; row i reads slot slots[i] (-1: no penalties) of counts (S, V)
    int32, prompt (S, V) uint8 and settings (3, S) fp32 (repetition, presence, frequency)."""
    rows = (slots >= 0).nonzero()[:, 0]
    if len(rows) == 0:
        return logits
    s = slots[rows]
    c, x = counts[s], logits[rows]
    rep, pres, freq = (settings[j, s][:, None] for j in range(3))
    seen = (c > 0) | (prompt[s] != 0)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    logits[rows] = x - (pres * (c > 0) + freq * c)
    return logits


def count_tokens_ref(tokens: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor):
    """counts[slots[i], tokens[i]] += 1 for the rows with a slot (each slot at most once in a batch)."""
    keep = slots >= 0
    counts[slots[keep], tokens[keep]] += 1


@triton.jit(do_not_specialize=["S"])    # S, the slots, grows in powers of two: one compile, not one per size
def _penalize_kernel(logits_ptr, stride, V, slots_ptr, counts_ptr, prompt_ptr, settings_ptr, S,
                     BLOCK: tl.constexpr):
    # grid (rows, V / BLOCK): one row's BLOCK logits; rows without a slot (-1) load and store nothing. Bytes: 10
    # per logit (the fp32 logit read and written, its int32 count, its prompt mark), one pass.
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < V) & (offs * 0 + slot >= 0)          # a tensor mask, as the interpreter wants
    slot = tl.maximum(slot, 0)
    x = tl.load(logits_ptr + row * stride + offs, mask=mask, other=0.0)
    c = tl.load(counts_ptr + slot * V + offs, mask=mask, other=0)
    seen = (c > 0) | (tl.load(prompt_ptr + slot * V + offs, mask=mask, other=0) != 0)
    rep = tl.load(settings_ptr + slot)
    pres = tl.load(settings_ptr + S + slot)
    freq = tl.load(settings_ptr + 2 * S + slot)
    x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    x = x - (pres * (c > 0).to(tl.float32) + freq * c.to(tl.float32))
    tl.store(logits_ptr + row * stride + offs, x, mask=mask)


@triton.jit
def _count_kernel(tokens_ptr, slots_ptr, counts_ptr, V):
    # grid (rows,): one row's token into its slot's counts (a slot appears once a batch: no atomics needed).
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    at = counts_ptr + tl.maximum(slot, 0) * V + tl.load(tokens_ptr + row).to(tl.int64)
    tl.store(at, tl.load(at, mask=slot >= 0, other=0) + 1, mask=slot >= 0)


def penalize(logits, slots, counts, prompt, settings):
    if not _use_triton(logits):
        return penalize_ref(logits, slots, counts, prompt, settings)
    V = logits.shape[1]
    block = min(4096, triton.next_power_of_2(V))
    grid = (len(slots), triton.cdiv(V, block))
    _penalize_kernel[grid](logits, logits.stride(0), V, slots, counts, prompt, settings, counts.shape[0],
                           BLOCK=block, num_warps=4)
    return logits


def count_tokens(tokens, slots, counts):
    if not _use_triton(counts):
        return count_tokens_ref(tokens, slots, counts)
    _count_kernel[(len(slots),)](tokens, slots, counts, counts.shape[1])


# ----------------------------------------------------------------------------------------------------------
# The slots
# ----------------------------------------------------------------------------------------------------------

class Penalties:
    """The slots of the running requests with penalties (see the top of the file), and the last batch's rows."""

    def __init__(self, vocab: int, device):
        self.vocab, self.device = vocab, torch.device(device)
        self.slot: dict[str, int] = {}           # request id -> its slot
        self.free_slots: list[int] = []
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab, dtype=torch.uint8, device=device)
        self.settings = torch.zeros(3, 0, dtype=torch.float32, device=device)  # repetition, presence, frequency
        self.slots = None                        # the last apply's (B,) slot per row, for count

    def upload(self, values: list, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def grow(self):
        """Twice the slots (at least 8), the rows in use kept."""
        n, new = self.counts.shape[0], max(8, 2 * self.counts.shape[0])
        counts = torch.zeros(new, self.vocab, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(new, self.vocab, dtype=torch.uint8, device=self.device)
        settings = torch.zeros(3, new, dtype=torch.float32, device=self.device)
        counts[:n], prompt[:n], settings[:, :n] = self.counts, self.prompt, self.settings
        self.counts, self.prompt, self.settings = counts, prompt, settings
        self.free_slots += range(new - 1, n - 1, -1)          # lowest first

    def take(self, req) -> int:
        """A slot for req (its request_id, params, prompt: the prompt's token set when it has a repetition
        penalty): counts zeroed, its prompt marked, its settings written. Stream-ordered after every kernel
        queued before, so a slot freed mid-flight is reused safely."""
        if not self.free_slots:
            self.grow()
        s = self.slot[req.request_id] = self.free_slots.pop()
        p = req.params
        self.counts[s].zero_()
        self.prompt[s].zero_()
        if p.repetition_penalty not in (None, 1.0) and req.prompt:
            self.prompt[s, self.upload(sorted(req.prompt), torch.int64)] = 1
        self.settings[:, s] = self.upload([p.repetition_penalty or 1.0, p.presence_penalty, p.frequency_penalty],
                                          torch.float32)
        return s

    def slot_of(self, req) -> int:
        """req's slot (taken on its first sampled token), -1 without penalties."""
        if not has_penalty(req.params):
            return -1
        return self.slot[req.request_id] if req.request_id in self.slot else self.take(req)

    def free(self, request_id: str):
        s = self.slot.pop(request_id, None)
        if s is not None:
            self.free_slots.append(s)

    def apply(self, logits: torch.Tensor, reqs: list) -> torch.Tensor:
        """logits (B, V) fp32, one row per req, in place: each row's logit bias, then its penalties."""
        bias = [(i, t, b) for i, r in enumerate(reqs) for t, b in r.params.logit_bias.items()]
        if bias:
            rows, toks, vals = zip(*bias)
            at = (self.upload(rows, torch.int64), self.upload(toks, torch.int64))
            logits.index_put_(at, self.upload(vals, torch.float32), accumulate=True)
        slots = [self.slot_of(r) for r in reqs]
        self.slots = None
        if any(s >= 0 for s in slots):
            self.slots = self.upload(slots, torch.int64)
            penalize(logits, self.slots, self.counts, self.prompt, self.settings)
        return logits

    def count(self, tokens: torch.Tensor):
        """The last apply's rows drew tokens (B,): count them into their slots."""
        if self.slots is not None:
            count_tokens(tokens, self.slots, self.counts)
            self.slots = None
