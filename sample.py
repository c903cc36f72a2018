"""Sampling: the per-request settings, the sampler (a PyTorch reference and a fused Triton version), and the CLI.

    python sample.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is"
    python sample.py --model qwen3-0.6b --random-weights --prompt hi          # no download: random weights
    python sample.py --model ./ckpt --chat --prompt "Why is the sky blue?" --temperature 0    # greedy
    python sample.py --model ./ckpt --prompts-file prompts.txt                # one prompt per line, one batch
    python sample.py --model ./ckpt --chat                                    # a conversation: a turn per line

Settings left unset (None) take the model's defaults: the checkpoint's generation_config.json (every Qwen3
checkpoint says temperature 0.6, top-p 0.95, top-k 20), Qwen3's published defaults for random-weight sizes, else
temperature 1 with no filters. `--generation-config none` ignores the checkpoint's file.

The rules, in transformers' order (its logits warpers are the oracle the tests compare with):
  logit_bias, repetition penalty (prompt and output tokens), presence/frequency penalties (output tokens;
  these three in penalty.py), then x = logits / temperature; top-k keeps x >= the k-th largest x (ties kept);
  top-p keeps a token when the top-k survivors more likely than it hold less than top_p of the survivors' mass;
  min-p keeps x >= max x + log(min_p).
  The token is drawn from softmax(x) over the survivors by the Gumbel-max trick: argmax of x + Gumbel noise, the
  noise a hash of (request seed, output position, token id); rows without filters draw by inverse CDF with one
  uniform hashed from (seed, position). So a seeded request gives the same tokens in any batch, and no
  generator state lives anywhere. Greedy rows (temperature 0) take the argmax of the logits.

The Triton sampler never sorts the vocabulary. Read `sample_triton` first. Pass 1 keeps, per chunk of 1,024
logits, the max and the softmax sum. A greedy row is then done; a temperature-only row draws by inverse CDF
with one uniform (the chunk sums say which chunk holds it, pass 2 scans that chunk). For a filtered row, the
k-th largest chunk max is a lower bound of the top-k threshold (those k chunk maxima are k distinct tokens), so
pass 2 collects only the few tokens above it, from only the chunks whose max reaches it; one program per row
then applies top-k, top-p and min-p exactly on those candidates and draws by Gumbel-max. A row whose
candidates overflow (no top-k, or a huge one, over a flat distribution) takes an exact but slow path: a radix
select over the whole row.
"""
import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from kernels import HAS_TRITON, _first_max, tl, triton


@dataclass
class SamplingParams:
    temperature: float | None = None    # 0 = greedy (argmax). None: the model's default (see the docstring)
    top_k: int | None = None            # keep the k most likely tokens; 0 or -1: all. None: model default
    top_p: float | None = None          # keep the most likely tokens holding top_p of the mass. None: model default
    min_p: float | None = None          # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float | None = None   # >1 discourages tokens of the prompt and output (CTRL-style)
    presence_penalty: float = 0.0       # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0      # OpenAI: subtracted per occurrence in the output
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None         # return each output token's logprob and the top-n (0..20)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first gets none)
    grammar: tuple[str, str] | None = None    # structured output (grammar.py): ("json_schema", schema), ...
    think_first: bool = False           # with a grammar: the model may think (<think> ... </think>) before it applies
    max_tokens: int = 256               # new tokens at most
    stop: list[str] = field(default_factory=list)            # stop strings, cut from the output text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False            # keep going past EOS (benchmarks)
    seed: int | None = None             # per-request seed: same seed, same tokens, whatever the batch
    speculative: bool = True            # may use the engine's speculative decoding (when it has it on)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k is not None and self.top_k <= 0:
            self.top_k = 0                                  # vLLM's -1 and OpenAI-style 0: no top-k
        unset_or = lambda v, ok: v is None or ok(v)
        finite = lambda v: v == v and abs(v) != float("inf")
        checks = [
            (unset_or(self.temperature, lambda t: t >= 0 and finite(t)), f"temperature must be >= 0, got {self.temperature}"),
            (unset_or(self.top_p, lambda p: 0 < p <= 1), f"top_p must be in (0, 1], got {self.top_p}"),
            (unset_or(self.min_p, lambda p: 0 <= p <= 1), f"min_p must be in [0, 1], got {self.min_p}"),
            (unset_or(self.repetition_penalty, lambda p: p > 0 and finite(p)),
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (all(isinstance(b, (int, float)) and finite(b) for b in self.logit_bias.values()),
             "logit_bias values must be finite numbers"),
            (unset_or(self.logprobs, lambda n: 0 <= n <= MAX_LOGPROBS), f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (unset_or(self.prompt_logprobs, lambda n: 0 <= n <= MAX_LOGPROBS),
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether penalties or a logit bias change the logits."""
        return (self.repetition_penalty not in (None, 1.0) or self.presence_penalty != 0
                or self.frequency_penalty != 0 or bool(self.logit_bias))

    @property
    def needs_last_token(self) -> bool:
        """Whether the next step's logits depend on the last token on the host (a grammar; penalties count
        tokens on the device: penalty.py)."""
        return self.grammar is not None


MAX_LOGPROBS = 20
DEFAULTED = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")   # what generation_config may set
NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
QWEN3_DEFAULTS = dict(temperature=0.6, top_k=20, top_p=0.95)    # generation_config.json of every Qwen3 checkpoint


def generation_defaults(ckpt_dir: Path | None, use_checkpoint: bool = True) -> dict:
    """The defaults for settings a request leaves unset: NEUTRAL, overridden by the checkpoint's
    generation_config.json (random-weight sizes: Qwen3's published values), unless use_checkpoint is False."""
    out = dict(NEUTRAL)
    if not use_checkpoint:
        return out
    if ckpt_dir is None:
        return {**out, **QWEN3_DEFAULTS}
    path = ckpt_dir / "generation_config.json"
    if path.exists():
        raw = json.loads(path.read_text())
        out.update({k: raw[k] for k in DEFAULTED if raw.get(k) is not None})
        out["top_k"] = max(0, int(out["top_k"]))
    return out


def resolve(params: SamplingParams, defaults: dict) -> SamplingParams:
    """params with every unset setting filled from defaults (validated again)."""
    unset = {k: defaults[k] for k in DEFAULTED if getattr(params, k) is None}
    return dataclasses.replace(params, **unset) if unset else params


# ----------------------------------------------------------------------------------------------------------
# Noise: a hash, so the same (seed, position, token) always gets the same Gumbel noise
# ----------------------------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on uint32 values held in int64 (products masked back to 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) int64 seeds and output positions -> (B,) int32 holding each row's 32-bit noise key. Tensor ops
    only: it runs inside the sampling graph."""
    lo, hi = seeds & M32, (seeds >> 32) & M32
    k = _fmix32(lo ^ _fmix32(hi ^ _fmix32((steps * GOLDEN + 1) & M32)))
    return torch.where(k >= 2**31, k - 2**32, k).to(torch.int32)


def uniform_ref(keys: torch.Tensor) -> torch.Tensor:
    """(B,) int32 keys -> (B,) fp32 uniforms in (0, 1): a row's one draw when it has no filters."""
    h = _fmix32(keys.long() & M32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_ref(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) int32 keys -> (B, vocab) fp32 Gumbel noise: -log(-log(u)), u from fmix32(key + token * golden)."""
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    h = _fmix32(((keys.long() & M32)[:, None] + idx[None, :] * GOLDEN) & M32)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------------------------
# The batch's settings as tensors, and the PyTorch reference
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SamplingTensors:
    """One row per sampled sequence, on the device. The engine's sampling graphs keep one persistent set and
    copy each step's values into it; eager steps build one with `build`."""
    inv_temp: torch.Tensor      # (B,) fp32: 1 / temperature, 0 for greedy rows
    top_k: torch.Tensor         # (B,) int64: vocab for rows without top-k
    top_p: torch.Tensor         # (B,) fp32
    min_p: torch.Tensor         # (B,) fp32
    seeds: torch.Tensor         # (B,) int64
    steps: torch.Tensor         # (B,) int64: output position of the token being drawn

    @staticmethod
    def host_rows(params: list[SamplingParams], vocab: int) -> tuple[list, list]:
        """Per row: (inv_temp, top_p, min_p) floats and top_k, the values `build` and the graphs upload."""
        f = [(0.0 if p.greedy else 1.0 / p.temperature, p.top_p, p.min_p) for p in params]
        return f, [min(p.top_k or vocab, vocab) for p in params]

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], steps: list[int], vocab: int, device):
        """Two copies through pinned memory: (3, Bp) floats and (3, Bp) ints, Bp = B rounded up to 4, so every
        row starts 16-byte aligned (Triton compiles one kernel per pointer alignment: keep it one)."""
        f, k = SamplingTensors.host_rows(params, vocab)
        B = len(params)
        pad = [0] * (-B % 4)
        pin = torch.device(device).type == "cuda"
        up = lambda xs, dt: torch.tensor(xs, dtype=dt).view(3, -1).pin_memory().to(device, non_blocking=True) \
            if pin else torch.tensor(xs, dtype=dt).view(3, -1)
        fl = up([r[j] for j in range(3) for r in f + [(0.0, 1.0, 0.0)] * len(pad)], torch.float32)
        it = up(k + pad + seeds + pad + steps + pad, torch.int64)
        return SamplingTensors(fl[0, :B], it[0, :B], fl[1, :B], fl[2, :B], it[1, :B], it[2, :B])


def sample_ref(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """The definition (and the CPU path): (B, V) logits -> (B,) int64 tokens. Sorts; the Triton sampler
    must pick the same tokens."""
    B, V = logits.shape
    raw = logits.float()
    finite = raw > float("-inf")                                           # (a grammar masks tokens with -inf)
    x = torch.where(finite, raw * st.inv_temp[:, None], float("-inf"))     # greedy rows: 0, not -inf * 0 = NaN
    M = x.max(-1, keepdim=True).values
    xs, order = x.sort(-1, descending=True)
    kth = xs.gather(1, (st.top_k.long().clamp(1, V) - 1)[:, None])
    keep = finite & (x >= kth)                                             # top-k, ties at the k-th kept
    # top-p: the top-k survivors' mass strictly above each token, against top_p x their total mass
    p = torch.where(keep, torch.exp(x - M), 0.0)
    ps = p.gather(1, order)
    above_sorted = torch.cumsum(ps, -1) - ps                               # mass ranked before, in sorted order
    first_of_ties = torch.searchsorted(-xs, -xs, right=False)              # ties share their first one's mass
    above = torch.empty_like(x).scatter_(1, order, above_sorted.gather(1, first_of_ties))
    keep &= (st.top_p[:, None] >= 1) | (above < st.top_p[:, None] * p.sum(-1, keepdim=True))
    keep &= (st.min_p[:, None] <= 0) | (x >= M + torch.log(st.min_p.clamp(min=1e-30))[:, None])
    keys = row_keys(st.seeds, st.steps)
    y = torch.where(keep, x + gumbel_ref(keys, V), float("-inf"))
    # rows without filters: inverse CDF with one uniform, the first token whose running mass passes u x total
    p_all = torch.where(finite, torch.exp(x - M), 0.0)
    cum = torch.cumsum(p_all, -1)
    last = V - 1 - finite.flip(-1).int().argmax(-1)                         # the last finite token
    inv_cdf = torch.minimum((cum <= (uniform_ref(keys) * cum[:, -1])[:, None]).sum(-1), last)
    plain = (st.top_k >= V) & (st.top_p >= 1) & (st.min_p <= 0)
    return torch.where(st.inv_temp == 0, raw.argmax(-1), torch.where(plain, inv_cdf, y.argmax(-1)))


# ----------------------------------------------------------------------------------------------------------
# The Triton sampler: four launches, all graph-capturable (no host sync, shapes fixed by B and V)
#
# Bytes: pass 1 reads every logit once (B x V x 2 bytes in bf16: 77.8 MB, 26 us at 2.99 TB/s for B=256 and
# Qwen3's vocabulary); pass 2 reads only the chunks whose max reaches the row's threshold (top-k 20: about 20
# of 149); the rest is per-row work on a few hundred floats. Rows without filters draw in pass 1; greedy rows
# take their argmax there.
# ----------------------------------------------------------------------------------------------------------
SAMPLE_CHUNK = 1024   # logits per chunk: 149 chunks for Qwen3's vocabulary, so top-k up to 149 takes the fast path
# Programs of SUB chunks, H100, bf16, us per call (B = 1 / 16 / 256 rows), swept by gpu runs of bench_sampler:
#   SUB, warps | T 0.6 top-p 0.95 top-k 20 | T 0.6 only         | greedy
#   1, 4       | 12.6 / 17.3 / 91.0        | 8.5 / 12.2 / 72.5  | 7.1 / 11.1 / 71.3
#   2, 4       | 14.0 / 19.1 / 101.3       | 8.7 / 12.3 / 63.2  | 7.2 / 10.9 / 59.0
#   4, 4       | 15.4 / 22.4 / 132.5       | 9.3 / 13.1 / 67.2  | 7.6 / 11.4 / 60.8
#   8, 8       | 16.7 / 25.3 / 186.8       | 9.9 / 14.3 / 80.2  | 7.8 / 12.2 / 70.2
# Pass 1 reads everything and likes 2 chunks a program; pass 2 reads a few chunks and likes 1.
SAMPLE_SUB = 2
SAMPLE_COLLECT_SUB = 1
SAMPLE_WARPS = 4
SAMPLE_CAP = 256      # candidates per row the exact finish holds (top-k 20 over random logits: about 25)
SAMPLE_SLOW_BLOCK = 1024


@triton.jit
def _fmix32_tl(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _row_key(seeds_ptr, steps_ptr, row):
    """A row's uint32 noise key from its int64 seed and output position: the same numbers as row_keys."""
    seed = tl.load(seeds_ptr + row)
    lo, hi = (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(steps_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    return _fmix32_tl(lo ^ _fmix32_tl(hi ^ _fmix32_tl(step * 0x9E3779B9 + 1)))


@triton.jit
def _uniform(h):
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _gumbel(key, idx):
    """Gumbel noise of tokens idx (int32 tensor) for a row's uint32 key: the same numbers as gumbel_ref."""
    u = _uniform(_fmix32_tl(key + idx.to(tl.uint32) * 0x9E3779B9))
    return -tl.log(-tl.log(u))


@triton.jit
def _row_mode(inv_t, top_k, top_p, min_p, V):
    """0: greedy, 1: temperature only (inverse CDF), 2: filtered (candidates)."""
    plain = (top_k >= V) & (top_p >= 1.0) & (min_p <= 0.0)
    return tl.where(inv_t == 0.0, 0, tl.where(plain, 1, 2))


@triton.jit
def _chunk_tile(logits_ptr, stride, V, row, c, SUB: tl.constexpr, CHUNK: tl.constexpr):
    """Program c's SUB chunks of CHUNK logits of a row, as a (SUB, CHUNK) tile, and their token ids."""
    sub = c * SUB + tl.arange(0, SUB)
    offs = sub[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    return sub, offs, row.to(tl.int64) * stride + offs


@triton.jit
def _sample_chunk_kernel(logits_ptr, stride, V, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, cmax_ptr, csum_ptr,
                         carg_ptr, NCHUNK, SUB: tl.constexpr, CHUNK: tl.constexpr):
    # pass 1, grid (B, cdiv(NCHUNK, SUB)): per chunk of CHUNK logits, the max of x (and where) and the softmax sum
    row, c = tl.program_id(0), tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)
    sub, offs, ptrs = _chunk_tile(logits_ptr, stride, V, row, c, SUB, CHUNK)
    raw = tl.load(logits_ptr + ptrs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = raw * tl.where(inv_t == 0.0, 1.0, inv_t)
    m = tl.max(x, axis=1)                                                      # (SUB,)
    arg = tl.min(tl.where(x == m[:, None], offs, V), axis=1)
    s = tl.sum(tl.where(x > float("-inf"), tl.exp(x - m[:, None]), 0.0), axis=1)
    out = row * NCHUNK + sub
    live = sub < NCHUNK
    tl.store(cmax_ptr + out, m, mask=live)
    tl.store(csum_ptr + out, s, mask=live)
    tl.store(carg_ptr + out, arg, mask=live)


@triton.jit
def _sample_row_kernel(V, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr, steps_ptr, cmax_ptr, csum_ptr,
                       carg_ptr, stats_ptr, count_ptr, pick_ptr, out_ptr, NCHUNK, BLOCK_C: tl.constexpr):
    # grid (B,): merge the chunks. A greedy row is done. A temperature-only row draws u and finds the chunk where
    # the running mass passes u x total, and what is left of u x total there (pass 2 scans that chunk). A
    # filtered row gets its max M, softmax sum Z and the candidate threshold tau: the k-th largest chunk max
    # (when k <= NCHUNK) and max + log(min_p).
    row = tl.program_id(0)
    inv_t, top_k, top_p, min_p = (tl.load(inv_temp_ptr + row), tl.load(top_k_ptr + row), tl.load(top_p_ptr + row),
                                  tl.load(min_p_ptr + row))
    mode = _row_mode(inv_t, top_k, top_p, min_p, V)
    c = tl.arange(0, BLOCK_C)
    live = c < NCHUNK
    cmax = tl.load(cmax_ptr + row * NCHUNK + c, mask=live, other=float("-inf"))
    M = tl.max(cmax, axis=0)
    if mode == 0:
        tl.store(out_ptr + row, tl.min(tl.where(live & (cmax == M), tl.load(carg_ptr + row * NCHUNK + c, mask=live,
                                                                                 other=V), V), axis=0).to(tl.int64))
    else:
        csum = tl.load(csum_ptr + row * NCHUNK + c, mask=live, other=0.0)
        mass = tl.where(cmax > float("-inf"), csum * tl.exp(cmax - M), 0.0)
        Z = tl.sum(mass, axis=0)
        tl.store(stats_ptr + row * 3, M)
        if mode == 1:
            target = _uniform(_fmix32_tl(_row_key(seeds_ptr, steps_ptr, row))) * Z
            cum = tl.cumsum(mass, axis=0)
            last = tl.max(tl.where(mass > 0.0, c, 0), axis=0)
            pick = tl.minimum(tl.sum((live & (cum <= target)).to(tl.int32), axis=0), last)
            before = tl.sum(tl.where(c < pick, mass, 0.0), axis=0)
            tl.store(stats_ptr + row * 3 + 1, target - before)
            tl.store(pick_ptr + row, pick)
        else:
            tau = tl.full((), float("-inf"), tl.float32)
            if top_k <= NCHUNK:
                ranked = tl.sort(cmax, descending=True)
                tau = tl.max(tl.where(c == top_k - 1, ranked, float("-inf")), axis=0)
            if min_p > 0.0:
                tau = tl.maximum(tau, M + tl.log(min_p))
            tl.store(stats_ptr + row * 3 + 1, Z)
            tl.store(stats_ptr + row * 3 + 2, tau)
            tl.store(count_ptr + row, 0)


@triton.jit
def _sample_collect_kernel(logits_ptr, stride, V, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, cmax_ptr,
                           stats_ptr, count_ptr, pick_ptr, cand_val_ptr, cand_idx_ptr, out_ptr, NCHUNK,
                           CAP: tl.constexpr, SUB: tl.constexpr, CHUNK: tl.constexpr):
    # pass 2, grid (B, cdiv(NCHUNK, SUB)), reading only the chunks a row needs. A filtered row's chunks whose max
    # reaches tau append their tokens >= tau to the row's candidates. A temperature-only row scans its picked
    # chunk for the first token whose running mass passes what was left of u x total.
    row, c = tl.program_id(0), tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)
    mode = _row_mode(inv_t, tl.load(top_k_ptr + row), tl.load(top_p_ptr + row), tl.load(min_p_ptr + row), V)
    sub, offs, ptrs = _chunk_tile(logits_ptr, stride, V, row, c, SUB, CHUNK)
    live = sub < NCHUNK
    M = tl.load(stats_ptr + row * 3)
    if mode == 2:
        tau = tl.load(stats_ptr + row * 3 + 2)
        need = live & (tl.load(cmax_ptr + row * NCHUNK + sub, mask=live, other=float("-inf")) >= tau)   # (SUB,)
        if tl.max(need.to(tl.int32), axis=0) > 0:
            x = tl.load(logits_ptr + ptrs, mask=need[:, None] & (offs < V), other=float("-inf")).to(tl.float32) * inv_t
            sel = ((x >= tau) & (x > float("-inf"))).to(tl.int32)
            per_sub = tl.sum(sel, axis=1)
            base = tl.atomic_add(count_ptr + row, tl.sum(per_sub, axis=0))
            pos = base + (tl.cumsum(per_sub, axis=0) - per_sub)[:, None] + tl.cumsum(sel, axis=1) - 1
            ok = (sel > 0) & (pos < CAP)
            tl.store(cand_val_ptr + row * CAP + pos, x, mask=ok)
            tl.store(cand_idx_ptr + row * CAP + pos, offs, mask=ok)
    elif mode == 1:
        pick = tl.load(pick_ptr + row)
        here = sub == pick
        if tl.max(here.to(tl.int32), axis=0) > 0:
            x = tl.load(logits_ptr + ptrs, mask=here[:, None] & (offs < V), other=float("-inf")).to(tl.float32) * inv_t
            p = tl.where(x > float("-inf"), tl.exp(x - M), 0.0)
            tok = tl.min(tl.where(tl.cumsum(p, axis=1) > tl.load(stats_ptr + row * 3 + 1), offs, V))
            if tok == V:                                  # roundings put u past the chunk: its last token
                tok = tl.max(tl.where(p > 0.0, offs, 0))
            tl.store(out_ptr + row, tok.to(tl.int64))


@triton.jit
def _key_of(x):
    """fp32 -> uint32 keys in the same order as the floats."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _row_x(logits_ptr, row, stride, V, inv_t, start, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    return x * inv_t, offs


@triton.jit
def _radix_select(logits_ptr, row, stride, V, inv_t, M, lo, target, WEIGH: tl.constexpr, BLOCK: tl.constexpr):
    """The largest uint32 key T with sum over tokens of key >= max(T, lo) of w >= target, where w = 1 (WEIGH
    False: T is the target-th largest key) or exp(x - M) (a mass threshold). Four bits per pass over the row."""
    d = tl.arange(0, 16).to(tl.uint32)
    prefix = tl.zeros((), dtype=tl.uint32)
    # a loop, not tl.static_range: unrolled (and inlined twice) it made the sampler's cold compile 9.4 s, not 5.3
    # (bf16 logits; fp32 5.7, not 1.7), with the same tokens and speed (H200, 2026-12-04; HISTORY.md, 29th session)
    for p in range(8):
        shift = tl.cast(28 - 4 * p, tl.uint32)
        cands = prefix | (d << shift)                                          # (16,)
        acc = tl.zeros((16,), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            x, offs = _row_x(logits_ptr, row, stride, V, inv_t, start, BLOCK)
            key = _key_of(x)
            w = tl.where((key >= lo) & (x > float("-inf")), 1.0, 0.0)
            if WEIGH:
                w = w * tl.exp(x - M)
            acc += tl.sum(tl.where(key[:, None] >= cands[None, :], w[:, None], 0.0), axis=0)
        digit = tl.max(tl.where(acc >= target, d, 0), axis=0)
        prefix = prefix | (digit << shift)
    return prefix


@triton.jit
def _sample_slow(logits_ptr, row, stride, V, inv_t, top_k, top_p, key, M, Z, tau, BLOCK: tl.constexpr):
    """Exact top-k / top-p / min-p over the whole row when too many candidates reach tau: radix-select the
    top-k threshold, then the top-p one over the survivors, then one Gumbel pass over what is left."""
    t = _key_of(tau)
    if top_k < V:
        t = tl.maximum(t, _radix_select(logits_ptr, row, stride, V, inv_t, M, t, top_k.to(tl.float32), False, BLOCK))
    if top_p < 1.0:
        Zk = Z
        if top_k < V:
            Zk = tl.zeros((), dtype=tl.float32)
            for start in range(0, V, BLOCK):
                x, offs = _row_x(logits_ptr, row, stride, V, inv_t, start, BLOCK)
                Zk += tl.sum(tl.where((_key_of(x) >= t) & (x > float("-inf")), tl.exp(x - M), 0.0), axis=0)
        t = tl.maximum(t, _radix_select(logits_ptr, row, stride, V, inv_t, M, t, top_p * Zk, True, BLOCK))
    best, tok = tl.full((), float("-inf"), tl.float32), tl.full((), V, tl.int32)
    for start in range(0, V, BLOCK):
        x, offs = _row_x(logits_ptr, row, stride, V, inv_t, start, BLOCK)
        y = tl.where((_key_of(x) >= t) & (x > float("-inf")), x + _gumbel(key, offs), float("-inf"))
        bm, bi = _first_max(y, offs, V)
        if bm > best:
            best, tok = bm, bi
    return tok


@triton.jit
def _sample_finish_kernel(logits_ptr, stride, V, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
                          steps_ptr, stats_ptr, count_ptr, cand_val_ptr, cand_idx_ptr, out_ptr, CAP: tl.constexpr,
                          JB: tl.constexpr, SLOW_BLOCK: tl.constexpr):
    # grid (B,): a filtered row's exact finish over its candidates. For each candidate i: how many candidates
    # are larger and their mass (pairwise, JB at a time). Top-k keeps fewer than k larger; top-p keeps mass
    # above < top_p x the top-k survivors' mass; min-p keeps x >= M + log(min_p); the Gumbel winner is drawn.
    row = tl.program_id(0)
    inv_t, top_k, top_p, min_p = (tl.load(inv_temp_ptr + row), tl.load(top_k_ptr + row), tl.load(top_p_ptr + row),
                                  tl.load(min_p_ptr + row))
    if _row_mode(inv_t, top_k, top_p, min_p, V) == 2:
        key = _row_key(seeds_ptr, steps_ptr, row)
        M, Z, tau = tl.load(stats_ptr + row * 3), tl.load(stats_ptr + row * 3 + 1), tl.load(stats_ptr + row * 3 + 2)
        n = tl.load(count_ptr + row)
        if n <= CAP:
            i = tl.arange(0, CAP)
            valid = i < n
            v = tl.load(cand_val_ptr + row * CAP + i, mask=valid, other=float("-inf"))
            idx = tl.load(cand_idx_ptr + row * CAP + i, mask=valid, other=V)
            n_above = tl.zeros((CAP,), dtype=tl.int32)
            mass_above = tl.zeros((CAP,), dtype=tl.float32)
            for j0 in range(0, n, JB):
                j = j0 + tl.arange(0, JB)
                vj = tl.load(cand_val_ptr + row * CAP + j, mask=j < n, other=float("-inf"))
                above = vj[None, :] > v[:, None]                                   # (CAP, JB)
                n_above += tl.sum(above.to(tl.int32), axis=1)
                mass_above += tl.sum(tl.where(above, tl.exp(vj - M)[None, :], 0.0), axis=1)
            keep = valid & (n_above < top_k)
            Zk = tl.sum(tl.where(keep, tl.exp(v - M), 0.0), axis=0)
            keep &= mass_above < tl.where(top_p >= 1.0, float("inf"), top_p * Zk)
            keep &= v >= M + tl.log(min_p)                     # min_p 0: log 0 = -inf keeps every candidate
            _, tok = _first_max(tl.where(keep, v + _gumbel(key, idx), float("-inf")), idx, V)
        else:
            tok = _sample_slow(logits_ptr, row, stride, V, inv_t, top_k, top_p, key, M, Z, tau, SLOW_BLOCK)
        tl.store(out_ptr + row, tok.to(tl.int64))


def _candidates(logits: torch.Tensor, st: SamplingTensors, out: torch.Tensor):
    """Passes 1 and 2 (and the per-row merge between them). Returns the per-row state the finish reads."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and st.inv_temp.shape == (B,)
    dev = logits.device
    nchunk = triton.cdiv(V, SAMPLE_CHUNK)
    f32, i32 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
    # each its own allocation: a view at an offset is 16-byte aligned only for some B (one compile per alignment)
    cmax, csum, carg = torch.empty(B, nchunk, **f32), torch.empty(B, nchunk, **f32), torch.empty(B, nchunk, **i32)
    stats, count, pick = torch.empty(B, 3, **f32), torch.empty(B, **i32), torch.empty(B, **i32)
    cand_val, cand_idx = torch.empty(B, SAMPLE_CAP, **f32), torch.empty(B, SAMPLE_CAP, **i32)
    rows = (st.inv_temp, st.top_k, st.top_p, st.min_p)
    _sample_chunk_kernel[(B, triton.cdiv(nchunk, SAMPLE_SUB))](
        logits, logits.stride(0), V, *rows, cmax, csum, carg, nchunk, SUB=SAMPLE_SUB, CHUNK=SAMPLE_CHUNK,
        num_warps=SAMPLE_WARPS)
    _sample_row_kernel[(B,)](V, *rows, st.seeds, st.steps, cmax, csum, carg, stats, count, pick, out, nchunk,
                             BLOCK_C=triton.next_power_of_2(nchunk), num_warps=4)
    _sample_collect_kernel[(B, triton.cdiv(nchunk, SAMPLE_COLLECT_SUB))](
        logits, logits.stride(0), V, *rows, cmax, stats, count, pick, cand_val, cand_idx, out, nchunk,
        CAP=SAMPLE_CAP, SUB=SAMPLE_COLLECT_SUB, CHUNK=SAMPLE_CHUNK, num_warps=SAMPLE_WARPS)
    return rows, stats, count, cand_val, cand_idx


def sample_triton(logits: torch.Tensor, st: SamplingTensors, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as sample_ref. logits: (B, V), rows contiguous (bf16/fp16/fp32); out: (B,) int64."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device) if out is None else out
    rows, stats, count, cand_val, cand_idx = _candidates(logits, st, out)
    _sample_finish_kernel[(B,)](logits, logits.stride(0), V, *rows, st.seeds, st.steps, stats, count, cand_val,
                                cand_idx, out, CAP=SAMPLE_CAP, JB=16, SLOW_BLOCK=SAMPLE_SLOW_BLOCK, num_warps=4)
    return out


@triton.jit
def _logprob_finish_kernel(logits_ptr, stride, V, tokens_ptr, stats_ptr, count_ptr, cand_val_ptr, cand_idx_ptr,
                           chosen_ptr, top_val_ptr, top_idx_ptr, N, CAP: tl.constexpr, JB: tl.constexpr,
                           SLOW_BLOCK: tl.constexpr):
    # grid (B,): log Z = M + log(sum); the chosen token's logprob; the top N by ranking the candidates (ties by
    # token id), each written at its rank
    row = tl.program_id(0)
    lse = tl.load(stats_ptr + row * 3) + tl.log(tl.load(stats_ptr + row * 3 + 1))
    tok = tl.load(tokens_ptr + row)
    tl.store(chosen_ptr + row, tl.load(logits_ptr + row.to(tl.int64) * stride + tok).to(tl.float32) - lse)
    n = tl.load(count_ptr + row)
    if n <= CAP:
        i = tl.arange(0, CAP)
        v = tl.load(cand_val_ptr + row * CAP + i, mask=i < n, other=float("-inf"))
        idx = tl.load(cand_idx_ptr + row * CAP + i, mask=i < n, other=2**30)
        rank = tl.zeros((CAP,), dtype=tl.int32)
        for j0 in range(0, n, JB):
            j = j0 + tl.arange(0, JB)
            vj = tl.load(cand_val_ptr + row * CAP + j, mask=j < n, other=float("-inf"))
            ij = tl.load(cand_idx_ptr + row * CAP + j, mask=j < n, other=2**30)
            before = (vj[None, :] > v[:, None]) | ((vj[None, :] == v[:, None]) & (ij[None, :] < idx[:, None]))
            rank += tl.sum(before.to(tl.int32), axis=1)
        ok = (i < n) & (rank < N)
        tl.store(top_val_ptr + row * N + rank, v - lse, mask=ok)
        tl.store(top_idx_ptr + row * N + rank, idx.to(tl.int64), mask=ok)
    else:   # candidates overflowed (few chunks, or ties): N passes, each the next (value, -id) down the row
        pv, pi = tl.full((), float("inf"), tl.float32), tl.full((), -1, tl.int32)
        for r in range(N):
            bv, bi = tl.full((), float("-inf"), tl.float32), tl.full((), 2**30, tl.int32)
            for start in range(0, V, SLOW_BLOCK):
                x, offs = _row_x(logits_ptr, row, stride, V, 1.0, start, SLOW_BLOCK)
                after = (x < pv) | ((x == pv) & (offs > pi))
                m = tl.max(tl.where(after, x, float("-inf")), axis=0)
                mi = tl.min(tl.where(after & (x == m), offs, 2**30), axis=0)
                better = (m > bv) | ((m == bv) & (mi < bi))
                bv, bi = tl.where(better, m, bv), tl.where(better, mi, bi)
            tl.store(top_val_ptr + row * N + r, bv - lse)
            tl.store(top_idx_ptr + row * N + r, bi.to(tl.int64))
            pv, pi = bv, bi


def token_logprobs_triton(logits: torch.Tensor, tokens: torch.Tensor, n: int, top_k: torch.Tensor | None = None):
    """Same contract as token_logprobs: the sampler's first passes on the raw logits (temperature 1, top-k n)
    give log Z and the top n's candidates without a (B, V) log-softmax or a sort. n <= SAMPLE_CHUNK count.
    top_k: (B,) int64, at most n: find only the top top_k (the later columns are left unwritten), as a graph
    captured for n = MAX_LOGPROBS does when the batch asks for fewer."""
    B, V = logits.shape
    dev = logits.device
    ones = torch.ones(B, dtype=torch.float32, device=dev)
    zeros = torch.zeros(B, dtype=torch.int64, device=dev)
    if top_k is None:
        top_k = torch.full((B,), max(n, 1), dtype=torch.int64, device=dev)
    st = SamplingTensors(ones, top_k, ones, ones * 0, zeros, zeros)
    _, stats, count, cand_val, cand_idx = _candidates(logits, st, zeros)
    chosen = torch.empty(B, dtype=torch.float32, device=dev)
    top_val = torch.empty(B, n, dtype=torch.float32, device=dev)
    top_idx = torch.empty(B, n, dtype=torch.int64, device=dev)
    _logprob_finish_kernel[(B,)](logits, logits.stride(0), V, tokens, stats, count, cand_val, cand_idx, chosen,
                                 top_val, top_idx, n, CAP=SAMPLE_CAP, JB=16, SLOW_BLOCK=SAMPLE_SLOW_BLOCK, num_warps=4)
    return chosen, top_val, top_idx


def sample(logits: torch.Tensor, st: SamplingTensors, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 tokens, no host sync: the Triton sampler on the GPU (or when forced), the
    reference elsewhere. The reference sorts and builds (B, V) temporaries: about 10 ms at B=256 on an H100."""
    if HAS_TRITON and kernels.kernel_mode() != "torch" and (logits.is_cuda or kernels.kernel_mode() == "triton"):
        return sample_triton(logits, st, out=out)
    tokens = sample_ref(logits, st)
    return tokens if out is None else out.copy_(tokens)


class SamplerGraphs:
    """The sampler's per-row settings in persistent device buffers, uploaded only when the batch's requests change
    (`load`), read by the decode graphs that sample (runner.capture_decode) and by the graphs here, which sample the
    decode graphs' logits buffer per batch size: with every row's logprob and top n (n <= MAX_LOGPROBS, from a
    device buffer), for batches that want logprobs, and (plain) the token alone, where no decode graph samples.
    Each row's output position (the noise's key) comes in the decode graphs' own inputs."""

    def __init__(self, vocab: int, max_batch: int, device):
        self.vocab = vocab
        self.f32 = torch.zeros(3, max_batch, dtype=torch.float32, device=device)   # inv_temp, top_p, min_p
        self.i64 = torch.zeros(2, max_batch, dtype=torch.int64, device=device)     # top_k, seed
        self.tokens = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.lp_n = torch.full((max_batch,), MAX_LOGPROBS, dtype=torch.int64, device=device)   # top logprobs to find
        self.lp_n_now = MAX_LOGPROBS
        self.ticks = torch.zeros(1, dtype=torch.int32, device=device)   # the engine's kernels.pdl_pair counter
        self.rows = None                          # request ids whose settings the buffers hold
        self.sizes, self.graphs, self.logprobs = [], {}, {}   # (size, with logprobs) -> graph; size -> outputs

    def tensors(self, b: int, steps: torch.Tensor) -> SamplingTensors:
        """The first b rows' settings (views), with steps (b,) int64, the rows' output positions."""
        return SamplingTensors(self.f32[0, :b], self.i64[0, :b], self.f32[1, :b], self.f32[2, :b], self.i64[1, :b],
                               steps)

    def capture(self, logits: torch.Tensor, sizes: list[int], pool, steps_of, plain: bool):
        """A graph per size with logprobs, and (plain) one without. steps_of(b): size b's steps (b,) int64."""
        self.sizes = sizes
        for b in reversed(sizes):
            st = self.tensors(b, steps_of(b))
            for with_lp in (False, True) if plain else (True,):
                def run():
                    tokens = sample_triton(logits[:b], st, out=self.tokens[:b])
                    return token_logprobs_triton(logits[:b], tokens, MAX_LOGPROBS, self.lp_n[:b]) if with_lp else None
                run()                             # compile outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = run()                   # with logprobs: static outputs, rewritten by each replay
                pool = g.pool()
                self.graphs[b, with_lp] = g
                if with_lp:
                    self.logprobs[b] = out
        kernels.pdl_pair(self.ticks)              # compiled now, not at the first step that needs it

    def load(self, request_ids: list[str], params: list[SamplingParams], seeds: list[int]):
        """The rows' settings into the buffers, unless they hold this batch's already (padding rows: greedy)."""
        if request_ids == self.rows:
            return
        f, k = SamplingTensors.host_rows(params, self.vocab)
        pad = [0] * (self.f32.shape[1] - len(params))
        floats = [r[0] for r in f] + pad + [r[1] for r in f] + pad + [r[2] for r in f] + pad
        pin = (lambda t: t.pin_memory()) if self.f32.is_cuda else (lambda t: t)    # the host runs on, not waiting
        self.f32.copy_(pin(torch.tensor(floats, dtype=torch.float32).view(self.f32.shape)), non_blocking=True)
        ints = torch.tensor(k + pad + seeds + pad, dtype=torch.int64).view(self.i64.shape)
        self.i64.copy_(pin(ints), non_blocking=True)
        self.rows = request_ids

    def run(self, request_ids: list[str], params: list[SamplingParams], seeds: list[int], logprobs: int | None = None):
        """Sample the first len(params) rows of the logits buffer (the decode graph just replayed put their steps
        in place); returns (n,) tokens on the device, and with logprobs (the most top logprobs a row wants) also
        (chosen (n,), top values (n, logprobs), top ids (n, logprobs)) as token_logprobs gives them (views, valid
        until the next replay)."""
        n = len(params)
        if logprobs is not None and logprobs != self.lp_n_now:
            self.lp_n.fill_(max(logprobs, 1))
            self.lp_n_now = logprobs
        b = next(s for s in self.sizes if s >= n)
        self.load(request_ids, params, seeds)
        self.graphs[b, logprobs is not None].replay()
        if logprobs is None:
            return self.tokens[:n]
        chosen, top_v, top_i = self.logprobs[b]
        return self.tokens[:n], (chosen[:n], top_v[:n, :logprobs], top_i[:n, :logprobs])


# ----------------------------------------------------------------------------------------------------------
# Logprobs (eager: only batches that ask pay for them; penalties are in penalty.py)
# ----------------------------------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int):
    """Raw-logit logprobs (vLLM's default: before penalties and temperature) of the chosen tokens and the top n:
    (R, V) logits, (R,) tokens -> ((R,) fp32, (R, n) fp32, (R, n) int64), all on the device. The Triton path
    where the sampler's runs; this reference builds an (R, V) fp32 log-softmax and sorts for the top n."""
    if HAS_TRITON and kernels.kernel_mode() != "torch" and (logits.is_cuda or kernels.kernel_mode() == "triton"):
        return token_logprobs_triton(logits, tokens, n)
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
    return lp.gather(1, tokens[:, None].long())[:, 0], top[0], top[1]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def add_dataclass_args(ap: argparse.ArgumentParser, cls, skip=()):
    """One flag per dataclass field, with the field's default: the CLI and the code never disagree."""
    for f in dataclasses.fields(cls):
        tname = getattr(f.type, "__name__", None) if isinstance(f.type, type) else str(f.type)  # 'int | None'
        if f.name in skip or tname.startswith(("dict", "tuple")):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "the model's" if default is None and f.name in DEFAULTED else default
        if tname == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif tname.startswith("list"):
            ap.add_argument(flag, nargs="*", default=default, type=int if "int" in tname else str,
                            help=f"(default: {default})")
        else:
            typ = {"float": float, "int": int}.get(tname.split(" ")[0], str)
            ap.add_argument(flag, type=typ, default=default, help=f"(default: {shown})")


def pick(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def main(argv=None):
    from engine import LLM, EngineArgs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    ap.add_argument("--prompts-file", help="a file with one prompt per line ('-' for stdin), run as one batch")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template (without a "
                    "prompt: a conversation, one user turn per line of stdin); answers may run to the end of the "
                    "context unless --max-tokens is given")
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                    help="with --chat: let Qwen3 think first (--no-thinking renders an empty think block)")
    add_dataclass_args(ap, EngineArgs)
    add_dataclass_args(ap, SamplingParams)
    ap.set_defaults(max_tokens=None)                   # unset: 256, or the whole context for --chat
    args = ap.parse_args(argv)

    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = sys.stdin if args.prompts_file == "-" else open(args.prompts_file)
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts and not args.chat:
        ap.error("give --prompt or --prompts-file (or --chat for a conversation)")
    fill = args.chat and args.max_tokens is None       # then an answer may take what llm.room leaves
    if args.max_tokens is None:
        args.max_tokens = SamplingParams.max_tokens
    try:
        params = pick(args, SamplingParams)
        llm = LLM(pick(args, EngineArgs))
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    params_for = lambda ids: dataclasses.replace(params, max_tokens=max(1, llm.room - len(ids))) if fill else params
    if not prompts:
        return chat(llm, params_for, args.system, args.thinking)
    shown = prompts
    if args.chat:
        prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
            ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}],
            enable_thinking=args.thinking)) for p in prompts]
        params = [params_for(ids) for ids in prompts]

    t0 = time.perf_counter()
    n_prompt = n_out = 0
    texts = [""] * len(prompts)
    try:
        outputs = llm.stream(prompts, params)          # (prompt index, StepOutput) as tokens arrive
    except ValueError as e:
        sys.exit(f"error: {e}")
    for i, out in outputs:
        texts[i] += out.text
        if len(prompts) == 1:
            print(out.text, end="", flush=True)
        if out.finished:
            n_prompt += out.num_prompt_tokens
            n_out += out.num_output_tokens
            if len(prompts) > 1:
                print(f"--- [{i}] {shown[i]!r} ({out.finish_reason})\n{texts[i]}", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n\n{len(prompts)} prompt(s): {n_prompt} prompt tokens, {n_out} output tokens in {dt:.2f} s "
          f"({n_out / dt:.1f} output tok/s)", file=sys.stderr)


def chat(llm, params_for, system: str | None, thinking: bool):
    """A conversation: each line of stdin is a user turn, answered as it streams (Ctrl-D, Ctrl-C or the end of
    piped input ends it). Every turn sends the whole conversation so far; the prefix cache finds the earlier
    turns' K/V, so a turn computes only its new tokens (and the earlier answers' thinking, which Qwen3's template
    drops from the history). params_for(prompt ids): a turn's SamplingParams."""
    messages = [{"role": "system", "content": system}] if system else []
    if sys.stdin.isatty():
        import readline  # noqa: F401  (input() then edits the line and keeps a history)
    try:
        while line := (input("> ") if sys.stdin.isatty() else sys.stdin.readline()):
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            t0, reply, hits = time.perf_counter(), "", llm.blocks.hit_tokens
            try:
                ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, enable_thinking=thinking))
                for _, out in llm.stream([ids], params_for(ids)):
                    reply += out.text
                    print(out.text, end="", flush=True)
            except ValueError as e:                    # outgrew the context (or the template refused): dropped
                print(f"error: {e}; this turn is dropped", file=sys.stderr)
                messages.pop()
                continue
            n, dt = out.num_output_tokens, time.perf_counter() - t0
            print(flush=True)
            print(f"[{out.num_prompt_tokens} prompt tokens ({llm.blocks.hit_tokens - hits} from the cache), {n} "
                  f"output tokens in {dt:.2f} s: {n / dt:.1f} tok/s]", file=sys.stderr)
            messages.append({"role": "assistant", "content": reply})
    except (EOFError, KeyboardInterrupt):              # a request cut short is aborted by llm.stream (blocks freed)
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
