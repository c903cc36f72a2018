"""Sampling: the per-request settings, the on-device sampler, and the command line.

    python sample.py --model Qwen/Qwen3-0.6B --prompt "The capital of France is"
    python sample.py --model qwen3-0.6b --random-weights --prompt hi          # no download: random weights
    python sample.py --model ./ckpt --chat --prompt "Why is the sky blue?" --temperature 0.6 --top-p 0.95
    python sample.py --model ./ckpt --prompts-file prompts.txt                # one prompt per line, one batch

`sample()` picks one token per row of a logits matrix without leaving the device: temperature, repetition
penalty, min-p, top-k and top-p become masks on the logits, then the Gumbel-max trick draws the token
(argmax of logits / T + Gumbel noise is a draw from softmax(logits / T)). The noise comes from hashing
(request seed, output position, token id), so a seeded request gives the same tokens whatever batch it
runs in, and no generator state lives anywhere.
"""
import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0            # 0 = greedy (argmax); the default, so runs are reproducible
    top_k: int | None = None            # keep the k most likely tokens (None: all)
    top_p: float = 1.0                  # keep the smallest set of tokens whose probability sums to top_p
    min_p: float = 0.0                  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0     # >1 discourages tokens already in the prompt or output (CTRL-style)
    max_tokens: int = 256               # new tokens at most
    stop: list[str] = field(default_factory=list)            # stop strings, cut from the output text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False            # keep going past EOS (benchmarks)
    seed: int | None = None             # per-request seed: same seed, same tokens, whatever the batch

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
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


# ----------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------

def _u64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) int64 seeds and output positions -> (B, vocab) floats in (0, 1), a pure function of its inputs
    (splitmix64 on int64; masks make the right shifts logical)."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] * _u64(0x9E3779B97F4A7C15) + steps[:, None] * _u64(0xD1B54A32D192ED03) + idx[None, :]
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _u64(0x94D049BB133111EB)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return (((z >> 40) & 0xFFFFFF).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingTensors:
    """The batch's sampling settings as device tensors (built once per step on the host) plus flags the
    host already knows, which let `sample` skip work no row asks for."""
    temperature: torch.Tensor   # (B,) float, 0 for greedy rows
    top_k: torch.Tensor         # (B,) int64, vocab for rows without top-k
    top_p: torch.Tensor         # (B,) float
    min_p: torch.Tensor         # (B,) float
    penalty: torch.Tensor       # (B,) float
    seeds: torch.Tensor         # (B,) int64
    steps: torch.Tensor         # (B,) int64: output position of the token being drawn
    history: torch.Tensor | None   # (B, L) int64 token ids seen so far, for the repetition penalty
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], steps: list[int], histories, vocab: int, device):
        t = lambda xs, dt: torch.tensor(xs, dtype=dt).to(device, non_blocking=True)
        history = None
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(len(h) for h in histories)
            # pad with each row's own first token so padding adds no new token to the row's set
            history = t([h + [h[0]] * (width - len(h)) for h in histories], torch.int64)
        return SamplingTensors(
            temperature=t([p.temperature for p in params], torch.float32),
            top_k=t([p.top_k or vocab for p in params], torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            penalty=t([p.repetition_penalty for p in params], torch.float32),
            seeds=t(seeds, torch.int64), steps=t(steps, torch.int64), history=history,
            all_greedy=all(p.greedy for p in params),
            any_top_k_top_p=any((p.top_k or vocab) < vocab or p.top_p < 1 for p in params if not p.greedy),
            any_min_p=any(p.min_p > 0 for p in params if not p.greedy))


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits: (B, vocab) fp32 -> (B,) int64 token ids. No host sync."""
    if st.history is not None:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, st.history, True)
        pen = st.penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    greedy_tokens = logits.argmax(-1)
    if st.all_greedy:
        return greedy_tokens
    x = logits / st.temperature.clamp(min=1e-5)[:, None]
    if st.any_min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < st.min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    if st.any_top_k_top_p:
        sorted_x, order = x.sort(-1, descending=True)
        rank = torch.arange(x.shape[-1], device=x.device)[None, :]
        # top-p: drop a token when the tokens ranked above it already hold top_p of the probability
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = (rank >= st.top_k[:, None]) | (cum - sorted_x.softmax(-1) >= st.top_p[:, None])
        drop[:, 0] = False                                  # the most likely token always stays
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    gumbel = -torch.log(-torch.log(hash_uniform(st.seeds, st.steps, x.shape[-1])))
    sampled = (x + gumbel).argmax(-1)
    return torch.where(st.temperature == 0, greedy_tokens, sampled)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def add_dataclass_args(ap: argparse.ArgumentParser, cls, skip=()):
    """One flag per dataclass field, with the field's default: the CLI and the code never disagree."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tname = getattr(f.type, "__name__", None) if isinstance(f.type, type) else str(f.type)  # 'int | None'
        if tname == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif tname.startswith("list"):
            ap.add_argument(flag, nargs="*", default=default, type=int if "int" in tname else str,
                            help=f"(default: {default})")
        else:
            typ = {"float": float, "int": int}.get(tname.split(" ")[0], str)
            ap.add_argument(flag, type=typ, default=default, help=f"(default: {default})")


def pick(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def main(argv=None):
    from engine import LLM, EngineArgs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    ap.add_argument("--prompts-file", help="a file with one prompt per line ('-' for stdin), run as one batch")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True,
                    help="with --chat: let Qwen3 think first (--no-thinking renders an empty think block)")
    add_dataclass_args(ap, EngineArgs)
    add_dataclass_args(ap, SamplingParams)
    args = ap.parse_args(argv)

    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = sys.stdin if args.prompts_file == "-" else open(args.prompts_file)
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        ap.error("give --prompt or --prompts-file")
    try:
        params = pick(args, SamplingParams)
        llm = LLM(pick(args, EngineArgs))
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template(
            ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}],
            enable_thinking=args.thinking) for p in prompts]

    t0 = time.perf_counter()
    n_prompt = n_out = 0
    try:
        ids = [llm.add_request(p, params) for p in prompts]
    except ValueError as e:
        sys.exit(f"error: {e}")
    index = {rid: i for i, rid in enumerate(ids)}
    texts = [""] * len(prompts)
    while llm.has_work():
        for out in llm.step():
            i = index[out.request_id]
            texts[i] += out.text
            if len(prompts) == 1:
                print(out.text, end="", flush=True)
            if out.finished:
                n_prompt += out.num_prompt_tokens
                n_out += out.num_output_tokens
                if len(prompts) > 1:
                    print(f"--- [{i}] {prompts[i]!r} ({out.finish_reason})\n{texts[i]}", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n\n{len(prompts)} prompt(s): {n_prompt} prompt tokens, {n_out} output tokens in {dt:.2f} s "
          f"({n_out / dt:.1f} output tok/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
