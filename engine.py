"""The engine: ties the model, the KV cache, the scheduler and the sampler into `LLM`.

    from engine import LLM, EngineArgs
    from sample import SamplingParams
    llm = LLM(EngineArgs(model="Qwen/Qwen3-0.6B"))
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason)

One `step()` = schedule a batch -> pack its tokens into flat tensors + AttnMeta -> launch one forward pass (a
replayed CUDA graph when the batch is all decodes) and the sampling on the device -> only then read back the
*previous* step's sampled tokens (the step's one host sync) -> detokenize, check stop conditions, free finished
requests. So the host prepares step N+1 while the GPU runs step N (see `step`).

Also here: the tokenizer (tokenizers' tokenizer.json, the checkpoint's chat template, incremental
detokenization that never emits half a UTF-8 character), since text in and text out is the engine's job.
"""
import array
import codecs
import json
import random
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

import cache
import kernels
from model import AttnMeta, build_model
from sample import SamplingParams, SamplingTensors, sample
from scheduler import PENDING, Batch, Scheduler, Sequence, Status


@dataclass
class EngineArgs:
    model: str = "qwen3-0.6b"            # checkpoint dir, hub id, or (with --random-weights) a named size
    random_weights: bool = False         # random weights of a named size: no download (benchmarks, smoke runs)
    dtype: str = "auto"                  # auto = bf16 on GPU, fp32 on CPU; or float32 / float16 / bfloat16
    device: str = "auto"                 # auto = cuda if available
    block_size: int = 16                 # tokens per KV block
    num_blocks: int | None = None        # KV blocks; None = from free GPU memory (GPU) or 2 GiB (CPU)
    gpu_memory_utilization: float = 0.9  # fraction of total GPU memory the engine may use
    max_num_seqs: int = 256              # sequences in one batch at most
    max_num_batched_tokens: int = 8192   # tokens in one forward pass at most (prefill chunk budget)
    max_model_len: int | None = None     # prompt + output tokens at most; None = the model's maximum
    prefix_cache: bool = True            # reuse K/V of shared prompt prefixes (radix cache)
    cuda_graphs: bool = True             # replay captured CUDA graphs for decode batches
    weight_seed: int = 0                 # seed of the random weights

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class StepOutput:
    """What one step produced for one request (streaming): new tokens and text since the last output."""
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int


# ----------------------------------------------------------------------------------------------------------
# Text in, text out
# ----------------------------------------------------------------------------------------------------------

class Tokenizer:
    """tokenizer.json through `tokenizers`, or bytes as token ids when a checkpoint has none."""

    def __init__(self, ckpt_dir: Path | None):
        self.tok, self.chat_template, self.bos = None, None, None
        if ckpt_dir is not None and (ckpt_dir / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            self.tok = HFTokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
            cfg_path = ckpt_dir / "tokenizer_config.json"
            if cfg_path.exists():
                self.chat_template = json.loads(cfg_path.read_text()).get("chat_template")
        else:
            print("note: no tokenizer.json, using raw bytes as token ids", file=sys.stderr)

    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self):
        """A function token id -> new text (None or '' while a character is incomplete), for one stream."""
        if self.tok is None:
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda t: utf8.decode(bytes([t])) if t < 256 else ""
        from tokenizers.decoders import DecodeStream
        stream = DecodeStream(skip_special_tokens=True)
        return lambda t: stream.step(self.tok, t)

    def apply_chat_template(self, messages: list[dict], enable_thinking: bool = True) -> str:
        """Render messages with the checkpoint's own Jinja template (as transformers does), or with Qwen3's
        format when the checkpoint has none."""
        if self.chat_template:
            import jinja2
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")


class Detokenizer:
    """Incremental decoding for one request, with stop strings. The tokenizer's stream decoder emits text as
    soon as it is whole (nothing while a multi-byte character is split across tokens)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tokenizer, self.params = tokenizer, params
        self.next_text = tokenizer.stream_decoder()
        self.ids: list[int] = []
        self.text = ""                          # all output text so far
        self.emitted = 0                        # chars of self.text already handed out
        self.hold = max((len(s) for s in params.stop), default=1) - 1   # a stop string may still be forming

    def add(self, token: int) -> bool:
        """Append a token; returns True when a stop string appeared (the text is then cut before it)."""
        self.ids.append(token)
        new = self.next_text(token)
        if not new:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += new
        for s in self.params.stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def flush(self):
        """At the end of a request: the whole output decoded at once (an unfinished character then shows as
        U+FFFD), so streamed text always equals generate()'s."""
        self.text = self.tokenizer.decode(self.ids)

    def take(self, final: bool) -> str:
        """Text not yet handed out; while running, keeps back what could be the start of a stop string."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------

def resolve_device_dtype(args: EngineArgs):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(args.dtype)
        if dtype is None:
            raise ValueError(f"unknown dtype {args.dtype!r}: use auto, float32, float16 or bfloat16")
    return device, dtype


class LLM:
    def __init__(self, args: EngineArgs | None = None, **kw):
        args = args or EngineArgs(**kw)
        self.args = args
        self.device, self.dtype = resolve_device_dtype(args)
        self.model, self.config, ckpt = build_model(args.model, args.random_weights, self.dtype, self.device,
                                                    args.weight_seed)
        self.tokenizer = Tokenizer(ckpt)
        cfg = self.config
        self.max_model_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_blocks_per_seq = -(-self.max_model_len // args.block_size)
        num_blocks = args.num_blocks or self.blocks_that_fit()
        self.kv_cache = cache.allocate_kv_cache(cfg, num_blocks, args.block_size, self.dtype, self.device)
        self.blocks = cache.BlockManager(num_blocks, args.block_size, args.prefix_cache)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.state: dict[str, tuple] = {}        # request_id -> (params, seed, Detokenizer)
        self.max_batch_seqs = self.num_forwards = 0   # largest batch reached, forward passes run (stats)
        self.num_penalized = 0                   # requests with a repetition penalty (they need step-by-step sync)
        self.in_flight = None                    # the launched step whose tokens are not read yet
        self.sample_row: dict[Sequence, int] = {}   # row of last_tokens holding each sequence's PENDING token
        self.last_tokens = torch.zeros(args.max_num_seqs, dtype=torch.int64, device=self.device)
        self.graphs = None
        if args.cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.last_tokens, args.max_num_seqs,
                                       self.max_blocks_per_seq)

    def blocks_that_fit(self) -> int:
        bytes_per_block = cache.kv_bytes_per_block(self.config, self.args.block_size, self.dtype)
        if self.device.type != "cuda":
            return max(2, min(4096, 2**31 // bytes_per_block))   # CPU: at most 2 GiB of cache by default
        # measure the activations of the largest forward pass on a throwaway cache, then size the real one
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        probe_blocks = 1 + -(-self.args.max_num_batched_tokens // self.args.block_size)
        kv = cache.allocate_kv_cache(self.config, probe_blocks, self.args.block_size, self.dtype, self.device)
        self.warmup(kv)
        peak = torch.cuda.max_memory_allocated()
        del kv
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        probe_bytes = probe_blocks * bytes_per_block
        n = int((total * self.args.gpu_memory_utilization - (peak - probe_bytes)) // bytes_per_block)
        if n < 2:
            raise RuntimeError(f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of "
                               f"{total / 2**30:.1f} GiB); lower max_num_batched_tokens or raise gpu_memory_utilization")
        return n

    def warmup(self, kv):
        """One forward pass of max_num_batched_tokens prompt tokens (for memory profiling)."""
        T, bs = self.args.max_num_batched_tokens, self.args.block_size
        n_blocks = -(-T // bs)
        meta = AttnMeta(cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=self.device),
                        context_lens=torch.tensor([T], dtype=torch.int32, device=self.device),
                        block_tables=torch.arange(1, n_blocks + 1, dtype=torch.int32, device=self.device)[None],
                        slot_mapping=torch.arange(bs, bs + T, device=self.device),
                        logits_indices=torch.tensor([T - 1], device=self.device), is_decode=False, max_seqlen_q=T)
        ids = torch.zeros(T, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            self.model.compute_logits(self.model(ids, torch.arange(T, device=self.device) % self.max_model_len, meta, kv))

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream_text: bool = True) -> str:
        """Queue a request. stream_text=False skips incremental detokenization (unless stop strings need
        it): the whole text then arrives with the final output, which saves host time per step."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context window is {self.max_model_len} "
                             f"tokens (prompt + at least one new token)")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        seq = Sequence(request_id, ids, max_tokens)
        self.scheduler.add(seq)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.seqs[request_id] = seq
        detok = Detokenizer(self.tokenizer, params) if stream_text or params.stop else None
        self.state[request_id] = (params, seed, detok)
        self.num_penalized += params.repetition_penalty != 1.0
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if it is not running."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        if PENDING in seq.token_ids:
            seq.token_ids = seq.token_ids[:seq.token_ids.index(PENDING)]
        self.scheduler.finish(seq, "abort")
        self.forget(request_id)
        return True

    def forget(self, request_id: str):
        params = self.state.pop(request_id)[0]
        self.num_penalized -= params.repetition_penalty != 1.0
        del self.seqs[request_id]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def stats(self) -> dict:
        """Counters for /metrics and bench.py: requests, KV blocks, prefix-cache hits, preemptions."""
        sch = self.scheduler
        return {"requests_running": len(sch.running), "requests_waiting": len(sch.waiting),
                **self.blocks.stats(), "prefill_tokens_computed": sch.prefill_tokens_computed,
                "num_preemptions": sch.num_preemptions, "max_batch_seqs": self.max_batch_seqs,
                "forward_passes": self.num_forwards}

    # ---- one step -----------------------------------------------------------------------------------------
    # A step launches the next batch on the GPU *before* reading back the previous batch's sampled tokens, so
    # the host's bookkeeping (detokenize, stop checks, scheduling, packing) overlaps the GPU's forward pass.
    # A decode whose input is a token still on the GPU (PENDING on the host) reads it from `last_tokens` on
    # the device. A request that stops on EOS or a stop string therefore runs one extra, discarded step.

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = []
        if self.in_flight is not None and self.num_penalized:
            outputs = self.collect(self.in_flight)     # the repetition penalty needs last token on the host
            self.in_flight = None
        batch = self.scheduler.schedule()
        launched = self.launch(batch) if batch.seqs else None
        if self.in_flight is not None:
            outputs += self.collect(self.in_flight)
        self.in_flight = launched
        return outputs

    def prepare(self, batch: Batch):
        """Pack the batch into host lists: the new tokens end to end, per-sequence metadata (query offsets,
        context lengths, block tables, logits rows), and for each PENDING token (packed row, row of
        last_tokens holding it). Positions and cache slots are derived on the device (positions_and_slots)."""
        ids, pending, cu, ctx, logits_idx = [], [], [0], [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            cu.append(cu[-1] + n)
            ctx.append(start + n)
            if ids[-1] == PENDING:                     # only a sequence's newest token can be in flight
                pending.append((cu[-1] - 1, self.sample_row[seq]))
            if start + n == seq.num_tokens:
                logits_idx.append(cu[-1] - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        return ids, pending, cu, ctx, tables, logits_idx

    def launch(self, batch: Batch):
        """Queue the batch's forward pass and sampling on the GPU; returns what collect() needs."""
        self.max_batch_seqs = max(self.max_batch_seqs, len(batch.seqs))
        self.num_forwards += 1
        ids, pending, cu, ctx, tables, logits_idx = self.prepare(batch)
        shared = batch.is_decode and len(tables) >= kernels.CASCADE_MIN_BATCH and shares_first_block(tables)
        if batch.is_decode and self.graphs is not None and len(ids) <= self.graphs.max_batch:
            logits = self.graphs.run(ids, pending, ctx, tables, shared)
        else:
            # through pinned memory: a copy from pageable memory would first wait for the GPU to go idle
            pin = self.device.type == "cuda"
            t = lambda xs, dt: (host_tensor(xs, dt).pin_memory() if pin else host_tensor(xs, dt)).to(
                self.device, non_blocking=True)
            meta = AttnMeta(cu_seqlens_q=t(cu, torch.int32), context_lens=t(ctx, torch.int32),
                            block_tables=t([b for row in tables for b in row], torch.int32).view(len(tables), -1),
                            slot_mapping=None, logits_indices=t(logits_idx, torch.int64), is_decode=batch.is_decode,
                            max_seqlen_q=max(batch.num_new))
            pos, meta.slot_mapping = positions_and_slots(meta.cu_seqlens_q, meta.context_lens, meta.block_tables,
                                                         self.args.block_size, len(ids))
            if shared:
                meta.shared_prefix = kernels.plan_shared_prefix(meta.block_tables, meta.context_lens,
                                                                self.args.block_size)
            input_ids = t(ids, torch.int64)
            if pending:                                # tokens sampled last step, still on the device
                at, rows = t([i for i, _ in pending], torch.int64), t([r for _, r in pending], torch.int64)
                input_ids[at] = self.last_tokens[rows]
            logits = self.model.compute_logits(self.model(input_ids, pos, meta, self.kv_cache))
        sampled = [s for s, n in zip(batch.seqs, batch.num_new) if s.num_computed + n == s.num_tokens]
        tokens = self.sample_tokens(sampled, logits[:len(sampled)]) if sampled else None
        indices = [s.num_tokens for s in sampled]       # where each one's PENDING token goes
        self.scheduler.advance(batch)
        self.sample_row = {s: i for i, s in enumerate(sampled)}
        if tokens is None:
            return None
        self.last_tokens[:len(sampled)].copy_(tokens)
        host = torch.empty(len(sampled), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        host.copy_(tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return sampled, indices, host, event

    def sample_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        st = [self.state[s.request_id] for s in seqs]
        params = [p for p, _, _ in st]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            return logits.argmax(-1)       # the common case needs no sampling tensors, nor fp32 (same argmax)
        tensors = SamplingTensors.build(params, [seed for _, seed, _ in st],
                                        [s.num_tokens - len(s.prompt_ids) for s in seqs],
                                        [s.token_ids for s in seqs], self.config.vocab_size, self.device)
        return sample(logits.float(), tensors)

    def collect(self, in_flight) -> list[StepOutput]:
        """Read a launched step's sampled tokens (the step's one host sync) and act on them."""
        seqs, indices, host, event = in_flight
        if event is not None:
            event.synchronize()
        outputs = []
        for seq, index, tok in zip(seqs, indices, host.tolist()):
            if seq.status == Status.FINISHED:              # aborted, or stopped while this token was in flight
                continue
            self.scheduler.complete(seq, index, tok)
            outputs.append(self.check_stop(seq, index))
        return outputs

    def check_stop(self, seq: Sequence, index: int) -> StepOutput:
        params, _, detok = self.state[seq.request_id]
        tok = seq.token_ids[index]
        n_out = index + 1 - len(seq.prompt_ids)
        reason = None
        hit_stop_string = detok is not None and detok.add(tok)
        if hit_stop_string:
            reason = "stop"
        elif not params.ignore_eos and tok in self.config.eos_token_id or tok in params.stop_token_ids:
            reason = "stop"
        elif n_out >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            del seq.token_ids[index + 1:]                 # a token sampled after the stop is dropped
            self.scheduler.finish(seq, reason)
            self.forget(seq.request_id)
        if detok is not None:
            if reason is not None and not hit_stop_string:
                detok.flush()
            text = detok.take(final=reason is not None)
        else:
            text = self.tokenizer.decode(seq.output_ids) if reason is not None else ""
        return StepOutput(seq.request_id, [tok], text, reason is not None, reason, len(seq.prompt_ids), n_out)

    # ---- conveniences -------------------------------------------------------------------------------------
    def submit(self, prompts: list, params, stream_text: bool) -> list[str]:
        """Queue prompts with one SamplingParams for all (or one each); returns their request ids."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        return [self.add_request(p, sp, stream_text=stream_text) for p, sp in zip(prompts, params)]

    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None):
        """Run prompts as one batch, yielding (prompt index, StepOutput) as tokens arrive."""
        return self.drain(self.submit(prompts, params, stream_text=True))

    def drain(self, rids: list[str]):
        index = {rid: i for i, rid in enumerate(rids)}
        try:
            while any(rid in self.seqs for rid in rids):
                for out in self.step():
                    if out.request_id in index:
                        yield index[out.request_id], out
        finally:
            for rid in rids:                      # a consumer that stops early must not leak blocks
                self.abort(rid)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts as one batch to the end; outputs in prompt order."""
        rids = self.submit(prompts, params, stream_text=False)
        seqs = [self.seqs[r] for r in rids]
        texts = [""] * len(prompts)
        for i, out in self.drain(rids):
            texts[i] += out.text
        return [RequestOutput(s.request_id, s.prompt_ids, s.output_ids, texts[i], s.finish_reason, s.num_cached_hit)
                for i, s in enumerate(seqs)]


def host_tensor(xs: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ints from a list, through the buffer protocol: for the 16k-token lists of a large
    prefill, torch.tensor(list) costs milliseconds, this a fraction of that."""
    if not xs:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array("q" if dtype == torch.int64 else "i", xs), dtype=dtype)


def shares_first_block(tables: list[list[int]]) -> bool:
    """Whether two sequences of a decode batch start with the same cache block: the prefix cache shared it,
    so cascade attention can read their common prefix once (kernels.plan_shared_prefix picks it)."""
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


def fill_pending(ids: torch.Tensor, last_tokens: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """Input ids with each PENDING entry replaced by the token the previous step sampled on the device (the
    decode graphs' fixed-shape form: gather holds a last_tokens row for every input row)."""
    return torch.where(ids == PENDING, last_tokens[gather], ids)


class DecodeGraphs:
    """CUDA graphs of the decode forward pass (model + lm_head) for a ladder of batch sizes. A decode batch
    is padded up to the next captured size: padding rows write their K/V into reserved block 0 and their
    logits are dropped. Replaying a graph launches the whole forward pass at once, which is what makes small
    batches fast (a 0.6B model step is ~300 kernels).

    Each size is captured for two block-table widths: the full one, and a short one (SHORT_CONTEXT tokens).
    Decode attention splits each context into slices by the table width, so the short graphs give a short
    context one 64-token tile per slice instead of several in a row (decode-1 on qwen3-0.6b, H100: 1.29 ->
    1.09 ms/token). From kernels.CASCADE_MIN_BATCH rows on, each is captured once more with cascade attention
    (a shared prefix read once for all the rows that hold it), replayed when rows share their first block."""
    SHORT_CONTEXT = 2048

    def __init__(self, model, kv_cache, last_tokens, max_batch: int, max_blocks: int):
        self.sizes = sorted({1, 2, 4, 8, *range(16, max_batch + 16, 16)})
        self.sizes = [b for b in self.sizes if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        dev = kv_cache.device
        i32 = dict(dtype=torch.int32, device=dev)
        self.i64 = torch.zeros(4, max_batch, dtype=torch.int64, device=dev)
        # padding rows: token 0 at position 0, slot 0 (block 0); gather: see fill_pending
        self.ids, self.pos, self.slots, self.gather = self.i64
        self.i32 = torch.zeros(max_batch, 1 + max_blocks, **i32)
        self.i32[:, 0] = 1
        self.tables = self.i32[:, 1:]                    # (max_batch, max_blocks), row stride 1 + max_blocks
        self.ctx = torch.ones(max_batch, **i32)          # contiguous copy of column 0 (kernels want it dense)
        self.cu = torch.arange(max_batch + 1, **i32)
        self.rows = torch.arange(max_batch, device=dev)
        self.short_blocks = min(max_blocks, -(-self.SHORT_CONTEXT // kv_cache.shape[3]))
        self.graphs = {}
        # every graph writes its logits here: a graph's output outlives its capture, so outputs of its own
        # would keep one (batch x vocab) fp32 block per graph alive (GBs for the whole ladder)
        self.logits = torch.empty(max_batch, model.lm_head.weight.shape[0], dtype=model.lm_head.weight.dtype,
                                  device=dev)
        pool = None
        self.block_size = block_size = kv_cache.shape[3]
        for b in reversed(self.sizes):          # largest first, so smaller graphs reuse its memory pool
            for width in sorted({max_blocks, self.short_blocks}):
                for cascade in (False, True) if b >= kernels.CASCADE_MIN_BATCH else (False,):
                    meta = AttnMeta(self.cu[:b + 1], self.ctx[:b], self.tables[:b, :width], self.slots[:b],
                                    self.rows[:b], is_decode=True, max_seqlen_q=1)
                    def run():                  # everything in here is captured: no extra launches per step
                        self.ctx[:b].copy_(self.i32[:b, 0])
                        if cascade:
                            meta.shared_prefix = kernels.plan_shared_prefix(meta.block_tables, meta.context_lens,
                                                                            block_size)
                        ids = fill_pending(self.ids[:b], last_tokens, self.gather[:b])
                        model.compute_logits(model(ids, self.pos[:b], meta, kv_cache), out=self.logits[:b])
                    with torch.inference_mode():
                        run()                       # warm-up: Triton compiles, cuBLAS picks its kernels
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool):
                            run()
                    pool = g.pool()
                    self.graphs[b, width, cascade] = g
        torch.cuda.synchronize()

    def run(self, ids, pending, ctx, tables, shared: bool) -> torch.Tensor:
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        bs = self.block_size
        gather = [0] * b
        for i, row in pending:
            gather[i] = row
        w = len(tables[0])
        # one token per row: its position ctx - 1 and cache slot are cheaper made here than by kernels
        pos, slots, rows = [], [], []                    # rows: each one's context length, then its block table
        for c, row in zip(ctx, tables):
            pos.append(c - 1)
            slots.append(row[(c - 1) // bs] * bs + (c - 1) % bs)
            rows.append(c)
            rows += row
        pad = [0] * (b - n)
        # two host-to-device copies per step: the int64 inputs in one, the int32 metadata in the other
        i64 = host_tensor(ids + pad + pos + pad + slots + pad + gather, torch.int64).view(4, b)
        self.i64[:, :b].copy_(i64.pin_memory(), non_blocking=True)
        rows += ([1] + [0] * w) * (b - n)                # padding rows: one token of context, in block 0
        width = self.short_blocks if w <= self.short_blocks else self.tables.shape[1]
        self.i32[:b, :w + 1].copy_(host_tensor(rows, torch.int32).view(b, w + 1).pin_memory(), non_blocking=True)
        key = (b, width, shared)
        self.graphs[key].replay()
        return self.logits[:n]
