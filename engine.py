"""The engine: ties the model, the KV cache, the scheduler and the sampler into `LLM`.

    from engine import LLM, EngineArgs
    from sample import SamplingParams
    llm = LLM(EngineArgs(model="Qwen/Qwen3-0.6B"))
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason)

One `step()` = schedule a batch -> pack its tokens into flat tensors + AttnMeta -> launch one forward pass (a
replayed CUDA graph when the batch is all decodes) and the sampling on the device (a second graph) -> only then
read back the *previous* step's sampled tokens (the step's one host sync) -> detokenize, check stop
conditions, free finished requests. So the host prepares step N+1 while the GPU runs step N (see `step`).

Requests leave settings unset to take the model's defaults (generation_config.json; sample.py explains).
Logprobs (`SamplingParams.logprobs`, `prompt_logprobs`) are the log-softmax of the raw logits, computed only for
the rows that ask; a request that wants its prompt's logprobs computes its whole prompt (no prefix-cache hit).
"""
import json
import random
import sys
import uuid
from dataclasses import dataclass, field, replace

import torch

import attention
import cache
import kernels
import parallel
from chat import opens_think
from model import load_config
from runner import (Runner, build_rank, gpu_event, probe_cache, shares_first_block, to_device, to_host,
                    warmup)
from penalty import Penalties
from sample import (SamplerGraphs, SamplingParams, SamplingTensors, generation_defaults, resolve, sample,
                    token_logprobs)
from scheduler import PENDING, Batch, Scheduler, Sequence, Status, pack
from speculate import DraftModel, Speculator, eligible, report
from tokenizer import Detokenizer, Tokenizer


YARN_EXAMPLE = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'


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
    cuda_graphs: bool = True             # replay captured CUDA graphs for decode batches and their sampling
    generation_config: str = "auto"      # auto: unset sampling settings come from generation_config.json; none
    weight_seed: int = 0                 # seed of the random weights
    quantization: str | None = None      # fp8: quantize the projections to FP8 blocks at load (quant.py)
    kv_cache_dtype: str = "auto"         # auto: the model's dtype; fp8: float8_e4m3fn, half the bytes (kernels.py)
    speculative_method: str | None = None   # ngram: prompt-lookup drafts; draft: a draft model's (speculate.py)
    speculative_model: str | None = None    # draft: the draft model (a smaller Qwen3, the same vocabulary)
    num_speculative_tokens: int = 4      # drafts verified per step
    tensor_parallel_size: int = 1        # GPUs (CPU: processes) the model is split over (parallel.py)
    rope_scaling: str | dict | None = None   # YaRN past the checkpoint's context, in place of config.json's: JSON
    # such as YARN_EXAMPLE (Qwen3's model card: 131,072 tokens); a draft model takes it too

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be fp8 (or unset), got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative_method must be ngram or draft (or unset), got {self.speculative_method!r}")
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ValueError("speculative_method draft and speculative_model go together (the draft model's path)")
        if self.speculative_model is not None and self.tensor_parallel_size > 1:
            raise ValueError("a draft model with tensor parallelism is not supported yet (use ngram)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.generation_config not in ("auto", "none"):
            raise ValueError(f"generation_config must be auto or none, got {self.generation_config!r}")
        if isinstance(self.rope_scaling, str):                # from the command line
            try:
                self.rope_scaling = json.loads(self.rope_scaling)
            except json.JSONDecodeError as e:
                raise ValueError(f"rope_scaling must be a JSON object, got {self.rope_scaling!r} ({e})") from None
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a JSON object, got {self.rope_scaling!r}")


# A token's logprobs: (its logprob, ((token id, logprob) of the n most likely)); a prompt's first token has None.
Logprob = tuple[float, tuple[tuple[int, float], ...]]


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
    logprobs: list[Logprob] | None = None                 # one per token in token_ids, when asked for
    prompt_logprobs: list[Logprob | None] | None = None   # the whole prompt's, with a request's first output


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None


@dataclass(eq=False)
class Request:
    """What the engine keeps per request besides its Sequence (which the scheduler owns)."""
    request_id: str
    params: SamplingParams             # resolved: no setting left unset
    seed: int
    detok: Detokenizer | None          # None: text comes once, at the end (or not at all: detokenize=False)
    detokenize: bool
    prompt: set[int] = field(default_factory=set)             # repetition penalty: tokens of the prompt
    prompt_logprobs: list | None = None                        # filled chunk by chunk when asked for
    sent_prompt_logprobs: bool = False
    matcher: object | None = None                              # structured output: grammar.Constraint


@dataclass
class InFlight:
    """A launched step whose results are still on their way to the host."""
    seqs: list[Sequence]             # the sequences that sampled, in row order
    indices: list[int]               # where each one's PENDING token sits in its token_ids
    tokens: torch.Tensor             # (B,) int64, pinned host memory
    logprobs: tuple | None           # (rows that asked, their places in the lists, chosen, top values, top ids)
    prompt_logprobs: tuple | None    # ([(seq, first position, count)], chosen, top values, top ids)
    event: torch.cuda.Event | None   # recorded after the step's work: collect() waits on it
    start: torch.cuda.Event | None   # recorded before it: the two time the step on the GPU (stats)


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


def check_prompt(ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int):
    """A clear error for a request the engine cannot run: an empty prompt, one that fills the context, ids
    outside the vocabulary."""
    if not ids:
        raise ValueError("prompt is empty")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the context window is {max_model_len} "
                         f"tokens (prompt + at least one new token)")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")


def load_draft(args: EngineArgs, device, dtype, config, max_model_len: int) -> Runner | None:
    """speculative_method draft: the draft model's Runner (unquantized), checked against the target's vocabulary
    and context; None without a draft model."""
    if args.speculative_model is None:
        return None
    draft = Runner(replace(args, model=args.speculative_model, quantization=None), device, dtype)
    if draft.config.vocab_size != config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) is not the target's "
                         f"({config.vocab_size})")
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(f"the draft model's context ({draft.config.max_position_embeddings}) is shorter than "
                         f"max_model_len ({max_model_len})")
    return draft


class LLM:
    def __init__(self, args: EngineArgs | None = None, **kw):
        args = args or EngineArgs(**kw)
        self.args = args
        self.device, self.dtype = resolve_device_dtype(args)
        self.group, self.runner = start_runner(args, self.device, self.dtype)   # group: tensor parallelism
        self.model, self.config, ckpt = self.runner.model, self.runner.config, self.runner.ckpt
        self.tokenizer = Tokenizer(ckpt)
        self.defaults = generation_defaults(ckpt, args.generation_config == "auto")
        cfg = self.config
        self.max_model_len = context_length(args, cfg)
        self.max_blocks_per_seq = -(-self.max_model_len // args.block_size)
        self.draft = load_draft(args, self.device, self.dtype, cfg, self.max_model_len)   # speculative_method draft
        num_blocks = allocate_kv(args, self.runner, self.draft, self.max_model_len, self.defaults)
        self.kv_cache = self.runner.kv_cache
        self.blocks = cache.BlockManager(num_blocks, args.block_size, args.prefix_cache)
        self.room = min(self.max_model_len, (num_blocks - 1) * args.block_size)   # tokens one request can hold
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.requests: dict[str, Request] = {}
        self.max_batch_seqs = self.num_forwards = 0   # largest batch reached, forward passes run (stats)
        self.gpu_busy = 0.0                      # seconds the GPU spent running steps (stats: idle = wall - this)
        self.num_synced = 0                      # requests whose logits depend on their last token (step-by-step sync)
        self.num_unspeculable = 0                # requests that never speculate (speculate.eligible)
        self.grammars = None                     # structured output: built on the first request that asks
        self.penalties = Penalties(cfg.vocab_size, self.device)   # penalized requests' token counts, on the device
        self.in_flight: InFlight | None = None   # the launched step whose tokens are not read yet
        self.round = None                        # the launched speculative round not read yet (speculate.Round)
        self.sample_row: dict[Sequence, int] = {}   # row of runner.last_tokens holding each PENDING token
        self.speculator = (Speculator(args.num_speculative_tokens, self.draft and DraftModel(self.draft))
                           if args.speculative_method else None)
        self.graphs, self.sampler_graphs, self.graph_bytes = capture_graphs(args, self.runner, self.draft,
                                                                            self.max_blocks_per_seq)
        if self.device.type == "cuda":
            report_memory(self, num_blocks)

    def close(self):
        """Stop the other tensor-parallel ranks (at exit anyway; nothing to do without TP)."""
        parallel.close(self.group)

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream_text: bool = True, detokenize: bool = True) -> str:
        """Queue a request. stream_text=False skips incremental detokenization (unless stop strings need
        it): the whole text then arrives with the final output, which saves host time per step.
        detokenize=False: token ids only, no text at all (serve.py's engine process; stop strings are then the
        caller's to check)."""
        seq, req = build_request(self, prompt, params, request_id or uuid.uuid4().hex, stream_text, detokenize)
        self.scheduler.add(seq)
        self.seqs[seq.request_id], self.requests[seq.request_id] = seq, req
        self.num_synced += req.params.needs_last_token
        self.num_unspeculable += not eligible(req.params)
        return seq.request_id

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
        params = self.requests.pop(request_id).params
        self.penalties.free(request_id)
        self.num_synced -= params.needs_last_token
        self.num_unspeculable -= not eligible(params)
        del self.seqs[request_id]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None or self.round is not None

    def stats(self) -> dict:
        """Counters for /metrics and bench.py: requests, KV blocks, prefix-cache hits, preemptions."""
        return engine_stats(self)

    # ---- one step -----------------------------------------------------------------------------------------
    # A step launches the next batch on the GPU *before* reading back the previous batch's sampled tokens, so
    # the host's bookkeeping (detokenize, stop checks, scheduling, packing) overlaps the GPU's forward pass.
    # A decode whose input is a token still on the GPU (PENDING on the host) reads it from `last_tokens` on
    # the device. A request that stops on EOS or a stop string therefore runs one extra, discarded step.
    # A speculative round is launched in one step and read at the start of the next (its drafts' fate decides
    # what that step runs); the StepOutputs of its tokens are made once the next step is launched, so that host
    # work overlaps the GPU too (H200, qwen3-0.6b served with n-gram drafts, greedy, 16 / 64 clients: 6,790 /
    # 14,140 -> 7,864 / 15,686 tok/s, the GPU idle 19.6 / 25.9% -> 12.7 / 21.4%; HISTORY.md, 27th session).

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        kept = self.speculator.collect(self) if self.round is not None else []
        if self.speculator is not None and self.speculator.ready(self):
            outputs = self.speculator.step(self)       # a pure decode phase of greedy requests: drafts
        else:
            outputs = self.step_ahead()
        return report(self, kept) + outputs if kept else outputs

    def step_ahead(self) -> list[StepOutput]:
        """The step described above: launch this batch, then collect the previous one."""
        outputs = []
        if self.in_flight is not None and self.num_synced:
            outputs = self.collect(self.in_flight)     # grammars need the last token on the host
            self.in_flight = None
        batch = self.scheduler.schedule()
        launched = launch(self, batch) if batch.seqs else None
        if self.in_flight is not None:
            outputs += self.collect(self.in_flight)
        self.in_flight = launched
        return outputs

    def sample_tokens(self, reqs: list[Request], steps: list[int], logits: torch.Tensor, graphed: bool,
                      logprobs: int | None = None):
        """choose_tokens with this engine's sampling graphs (graphed: a replayed decode batch) and grammars."""
        return choose_tokens(reqs, steps, logits, self.config.vocab_size, self.sampler_graphs if graphed else None,
                             self.grammars, self.penalties, logprobs)

    def collect(self, fl: InFlight) -> list[StepOutput]:
        """Read a launched step's sampled tokens (the step's one host sync) and act on them."""
        if fl.event is not None:
            fl.event.synchronize()
            self.gpu_busy += fl.start.elapsed_time(fl.event) / 1e3
        if fl.prompt_logprobs is not None:
            record_prompt_logprobs(fl.prompt_logprobs, self.requests)
        return [] if fl.tokens is None else take_tokens(self, fl)

    def check_stop(self, seq: Sequence, req: Request, index: int, lp) -> StepOutput:
        """The output of token `index` of seq; a request it stops is finished here (its blocks freed)."""
        out = stop_output(seq, req, index, lp, self.config.eos_token_id, self.tokenizer)
        if out.finished:
            self.scheduler.finish(seq, out.finish_reason)
            self.forget(seq.request_id)
        return out

    # ---- conveniences -------------------------------------------------------------------------------------
    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None):
        """Run prompts as one batch, yielding (prompt index, StepOutput) as tokens arrive."""
        return drain(self, submit(self, prompts, params, stream_text=True))

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts as one batch to the end; outputs in prompt order."""
        return run_to_end(self, submit(self, prompts, params, stream_text=False))

    def chat(self, conversations: list, params: SamplingParams | list[SamplingParams] | None = None,
             **template_kw) -> list[RequestOutput]:
        """As vLLM's LLM.chat: a conversation (a list of {"role": ..., "content": ...} messages) or a list of them,
        each through the checkpoint's chat template (template_kw: enable_thinking=False, tools=[...]), generated."""
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        return self.generate([self.tokenizer.apply_chat_template(c, **template_kw) for c in convs], params)


# ---- LLM's pieces, as plain functions of what they use ---------------------------------------------------------
def launch(llm: LLM, batch: Batch) -> InFlight | None:
    """Queue the batch's forward pass and sampling on the GPU; returns what LLM.collect needs."""
    llm.max_batch_seqs = max(llm.max_batch_seqs, len(batch.seqs))
    llm.num_forwards += 1
    start = gpu_event(llm.device)                 # the GPU reaches it when it starts this step (stats)
    sampled = [s for s, n in zip(batch.seqs, batch.num_new) if s.num_computed + n == s.num_tokens]
    reqs = [llm.requests[s.request_id] for s in sampled]
    steps = [s.num_tokens - len(s.prompt_ids) for s in sampled]   # each new token's output position
    graphed = batch.is_decode and llm.graphs is not None and len(batch.seqs) <= llm.graphs.max_batch
    done = graphed and samples_in_graph(llm.graphs, reqs)
    if done:                                       # the graph samples: its rows' settings first
        llm.sampler_graphs.load([r.request_id for r in reqs], [r.params for r in reqs], [r.seed for r in reqs])
    logits, prompt_lp = forward_batch(llm.runner, batch, llm.requests, llm.sample_row, graphed, steps, done)
    if done:                                       # this step's tokens are in last_tokens already
        tokens, lp = llm.runner.last_tokens[:len(reqs)], None
        if len(reqs) > 1:                          # a dependent pair after the graph, as choose_tokens does
            kernels.pdl_pair(llm.sampler_graphs.ticks)
    else:
        tokens, lp = sample_rows(llm, reqs, steps, logits, graphed)
        if tokens is not None:
            llm.runner.set_last_tokens(tokens)
    indices = [s.num_tokens for s in sampled]       # where each one's PENDING token goes
    llm.scheduler.advance(batch)
    llm.sample_row = {s: i for i, s in enumerate(sampled)}
    if tokens is None and prompt_lp is None:
        return None
    return in_flight(sampled, indices, tokens, lp, prompt_lp, start)


def context_length(args: EngineArgs, cfg) -> int:
    """max_model_len: the model's positions, or fewer if asked; more is an error, as in vLLM (not cut silently)."""
    if (args.max_model_len or 0) > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {args.max_model_len} exceeds the model's {cfg.max_position_embeddings} "
                         f"positions; for more, YaRN: --rope-scaling '{YARN_EXAMPLE}'")
    return args.max_model_len or cfg.max_position_embeddings


def start_runner(args: EngineArgs, device, dtype) -> tuple:
    """(the tensor-parallel group or None, this process's Runner): with tensor_parallel_size > 1 the other
    ranks start first (parallel.py), and they are stopped again when building this one fails."""
    group = None
    if args.tensor_parallel_size > 1:
        parallel.check(load_config(args.model, args.random_weights, args.rope_scaling)[0], args.tensor_parallel_size,
                       device.type)
        group = parallel.start(args.tensor_parallel_size, device.type, build_rank, args, device.type, dtype)
    try:
        runner = Runner(args, device, dtype, group)
        if group is not None:
            parallel.wait_ready(group)
    except BaseException:
        parallel.close(group)
        raise
    return group, runner


def allocate_kv(args: EngineArgs, runner: Runner, draft: Runner | None, max_model_len: int, defaults: dict) -> int:
    """The KV caches (EngineArgs.num_blocks blocks, or what fits the GPU): the target's and the draft model's, which
    has as many blocks (one block table addresses both). Returns the number of blocks."""
    extra = 0 if draft is None else cache.kv_bytes_per_block(draft.model.config, args.block_size, draft.kv_dtype)
    if draft is not None and draft.device.type == "cuda":   # the draft's prefill kernels compiled now (as the
        warmup(draft, probe_cache(draft), max_model_len, defaults)   # target's in its memory profile), not mid-serving
    num_blocks = args.num_blocks or runner.fit_blocks(max_model_len, defaults, extra)
    runner.allocate(num_blocks)
    if draft is not None:
        draft.allocate(num_blocks)
    return num_blocks


def capture_graphs(args: EngineArgs, runner: Runner, draft: Runner | None, max_blocks_per_seq: int) -> tuple:
    """The decode graphs (the draft model's too) and the sampling graphs: (graphs, sampler graphs, their bytes);
    (None, None, 0) without CUDA graphs (off, or not on a GPU)."""
    if not args.cuda_graphs or runner.device.type != "cuda":
        return None, None, 0
    before = torch.cuda.memory_reserved()
    runner.capture(max_blocks_per_seq, sampling=True)
    if draft is not None:
        draft.capture(max_blocks_per_seq)
    return runner.graphs, runner.sampler, torch.cuda.memory_reserved() - before


def build_request(llm: LLM, prompt: str | list[int], params: SamplingParams | None, request_id: str,
                  stream_text: bool, detokenize: bool) -> tuple[Sequence, Request]:
    """LLM.add_request's Sequence (the scheduler's) and Request (the rest): the prompt tokenized and checked, the
    settings resolved. The Request detokenizes as tokens arrive when stream_text or stop strings ask (else the
    text comes at the end, or never with detokenize=False)."""
    params = resolve(params or SamplingParams(), llm.defaults)
    ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_prompt(ids, params, llm.max_model_len, llm.config.vocab_size)
    if request_id in llm.seqs:
        raise ValueError(f"request id {request_id!r} is already running")
    seq = Sequence(request_id, ids, min(params.max_tokens, llm.max_model_len - len(ids)),
                   reuse_prefix=params.prompt_logprobs is None)
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    detok = Detokenizer(llm.tokenizer, params.stop) if detokenize and (stream_text or params.stop) else None
    req = Request(request_id, params, seed, detok, detokenize,
                  prompt_logprobs=None if params.prompt_logprobs is None else [None])
    if params.repetition_penalty != 1.0:
        req.prompt = set(ids)
    if params.grammar is not None:
        if llm.grammars is None:                       # structured output: built on the first request that asks
            from grammar import Grammars
            llm.grammars = Grammars(llm.tokenizer, llm.config.vocab_size, llm.config.eos_token_id)
        req.matcher = llm.grammars.constraint(params.grammar, params.think_first,
                                              params.think_first and opens_think(llm.tokenizer.decode(ids[-4:])))
    return seq, req


def engine_stats(llm: LLM) -> dict:
    sch = llm.scheduler
    return {"requests_running": len(sch.running), "requests_waiting": len(sch.waiting),
            **llm.blocks.stats(), "prefill_tokens_computed": sch.prefill_tokens_computed,
            "num_preemptions": sch.num_preemptions, "max_batch_seqs": llm.max_batch_seqs,
            "forward_passes": llm.num_forwards, "gpu_busy_seconds": llm.gpu_busy,
            **(llm.speculator.stats() if llm.speculator is not None else {})}


def take_tokens(llm: LLM, fl: InFlight) -> list[StepOutput]:
    """LLM.collect's tokens, read: each into its sequence, then its stop conditions."""
    outputs, lps = [], read_logprobs(fl.logprobs, fl.seqs, llm.requests)
    for seq, index, tok, lp in zip(fl.seqs, fl.indices, fl.tokens.tolist(), lps):
        if seq.status == Status.FINISHED:              # aborted, or stopped while this token was in flight
            continue
        llm.scheduler.complete(seq, index, tok)
        req = llm.requests[seq.request_id]
        note_token(req, tok)
        outputs.append(llm.check_stop(seq, req, index, lp))
    return outputs


def submit(llm: LLM, prompts: list, params, stream_text: bool) -> list[str]:
    """Queue prompts with one SamplingParams for all (or one each); returns their request ids."""
    params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
    rids = []
    try:
        for p, sp in zip(prompts, params):
            rids.append(llm.add_request(p, sp, stream_text=stream_text))
    except BaseException:                      # a bad prompt after good ones: none of them stays queued
        for rid in rids:
            llm.abort(rid)
        raise
    return rids


def run_to_end(llm: LLM, rids: list[str]) -> list[RequestOutput]:
    """Step until the requests rids finish; their RequestOutputs in rids' order."""
    seqs = [llm.seqs[r] for r in rids]
    texts, lps, prompt_lps = [""] * len(rids), [None] * len(rids), [None] * len(rids)
    for i, out in drain(llm, rids):
        texts[i] += out.text
        if out.logprobs is not None:              # in place: a new list per token would cost O(tokens^2)
            lps[i] = lps[i] or []
            lps[i] += out.logprobs
        prompt_lps[i] = out.prompt_logprobs or prompt_lps[i]
    return [RequestOutput(s.request_id, s.prompt_ids, s.output_ids, texts[i], s.finish_reason, s.num_cached_hit,
                          lps[i], prompt_lps[i]) for i, s in enumerate(seqs)]


def drain(llm: LLM, rids: list[str]):
    """Step until the requests rids finish, yielding (index in rids, StepOutput) for theirs."""
    index = {rid: i for i, rid in enumerate(rids)}
    try:
        while any(rid in llm.seqs for rid in rids):
            for out in llm.step():
                if out.request_id in index:
                    yield index[out.request_id], out
    finally:
        for rid in rids:                      # a consumer that stops early must not leak blocks
            llm.abort(rid)


def samples_in_graph(graphs, reqs: list[Request]) -> bool:
    """Whether a decode batch's graph samples its tokens itself (DecodeGraphs' sample_tail): batches with a
    sampled row and no logprobs, penalties or grammar. Greedy batches take the argmax after the graph, and the
    others sample after it from the logits."""
    params = [r.params for r in reqs]
    return (graphs.sample_tail is not None and not all(p.greedy for p in params)
            and not any(p.penalized or p.needs_last_token or p.logprobs is not None for p in params))


def forward_batch(runner: Runner, batch: Batch, requests: dict, sample_row: dict, graphed: bool, steps: list[int],
                  sampled: bool) -> tuple:
    """The batch's forward pass: (the sampled rows' logits, the prompt logprobs asked for or None). A decode batch
    that fits the graphs (graphed) replays one (sampled: the one that samples too), its rows' output positions
    `steps` among its inputs; anything else runs eagerly."""
    ids, pending, cu, ctx, tables, logits_idx = pack(batch, sample_row)
    if graphed:
        shared = len(tables) >= attention.CASCADE_MIN_BATCH and shares_first_block(tables)
        return runner.decode(ids, pending, ctx, tables, shared, steps=steps, sampled=sampled), None
    return forward_eager(runner, batch, requests, ids, pending, cu, ctx, tables, logits_idx)


def forward_eager(runner: Runner, batch: Batch, requests: dict, ids, pending, cu, ctx, tables, logits_idx) -> tuple:
    """A batch outside the decode graphs (prefill chunks, mixed batches): (its sampling rows' logits, the prompt
    logprobs of the requests that ask for them, or None)."""
    extras, targets, owners = prompt_logprob_rows(batch, cu, requests)
    runner.forward(ids, pending, cu, ctx, tables, logits_idx + extras, max(batch.num_new), batch.is_decode)
    logits = runner.logits(0, len(logits_idx))
    if not extras:
        return logits, None
    n = max(requests[seq.request_id].params.prompt_logprobs for seq, _, _ in owners)
    return logits, (owners, *prompt_logprobs(runner, len(logits_idx), targets, n))


def read_logprobs(logprobs: tuple | None, seqs: list[Sequence], requests: dict) -> list:
    """Each sampled row's [Logprob] from a step's logprobs (InFlight.logprobs) on the host; None for rows that did
    not ask, and for requests gone since (aborted)."""
    out = [None] * len(seqs)
    if logprobs is not None:
        rows, at, *lists = logprobs                # rows that asked, where their values sit in the lists
        chosen, top_v, top_i = (t.tolist() for t in lists)
        for i, j in zip(rows, at):
            req = requests.get(seqs[i].request_id)
            if req is not None:
                out[i] = [logprob_entry(chosen, top_v, top_i, j, req.params.logprobs)]
    return out


def sample_rows(llm: LLM, reqs: list[Request], steps: list[int], logits: torch.Tensor, graphed: bool) -> tuple:
    """The tokens of a launched batch's sampled rows (reqs; steps: each new token's output position) and the
    logprobs of the rows that ask for them: row_logprobs's (tokens, logprobs); (None, None) with no rows."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]   # the rows that want logprobs
    n = max((reqs[i].params.logprobs for i in rows), default=None)             # the most top logprobs asked
    tokens = llm.sample_tokens(reqs, steps, logits, graphed, n) if reqs else None
    return row_logprobs(tokens, logits, rows, len(reqs), n)


def note_token(req: Request, tok: int):
    """What the host keeps of a request's new token: its grammar's state (penalties count on the device)."""
    if req.matcher is not None:
        req.matcher.accept_token(tok)


def in_flight(seqs: list[Sequence], indices: list[int], tokens, lp, prompt_lp, start) -> InFlight:
    """A launched step's results on their way to the host: copies queued into pinned memory (a copy to pageable
    memory would wait for the GPU right here), and on the GPU an event after them that collect() waits on."""
    host_all = lambda ts: ts and tuple(to_host(t) if torch.is_tensor(t) else t for t in ts)
    out = InFlight(seqs, indices, tokens if tokens is None else to_host(tokens), host_all(lp), host_all(prompt_lp),
                   None, start)
    if start is not None:                              # a CUDA device
        out.event = torch.cuda.Event(enable_timing=True)
        out.event.record()
    return out


def choose_tokens(reqs: list[Request], steps: list[int], logits: torch.Tensor, vocab_size: int,
                  sampler_graphs: SamplerGraphs | None, grammars, penalties: Penalties, logprobs: int | None = None):
    """(B, vocab) logits -> (B,) tokens on the device. Batches without penalties replay the sampling graph of
    their size when given sampler_graphs (logprobs, the most top logprobs a row wants: the graph that also
    computes every row's, and the result is then (tokens, logprob lists)); greedy batches that want no logprobs
    take the argmax; others apply penalties (on the device) and grammar masks to an fp32 copy first."""
    params = [r.params for r in reqs]
    penalized = any(p.penalized for p in params)
    changed = penalized or any(p.needs_last_token for p in params)    # penalties or a grammar change the logits
    greedy = not changed and all(p.greedy for p in params)
    if greedy and logprobs is None:
        return kernels.argmax(logits)              # the common case needs no sampling tensors, nor fp32
    if sampler_graphs is not None and not changed:
        tokens = sampler_graphs.run([r.request_id for r in reqs], params, [r.seed for r in reqs], logprobs)
    elif greedy:                                   # eager logprobs are computed beside the argmax
        return kernels.argmax(logits)
    else:
        if changed:
            logits = logits.to(torch.float32, copy=True)
            if penalized:
                penalties.apply(logits, reqs)
            if any(r.matcher is not None for r in reqs):
                grammars.mask(logits, [r.matcher for r in reqs])
        tokens = sample(logits, SamplingTensors.build(params, [r.seed for r in reqs], steps, vocab_size, logits.device))
        if penalized:
            penalties.count(tokens)
    if sampler_graphs is not None and len(reqs) > 1:   # after a decode graph a dependent pair, as greedy's argmax is
        kernels.pdl_pair(sampler_graphs.ticks)         # (without it the next replay's kernels start later)
    return tokens


def stop_output(seq: Sequence, req: Request, index: int, lp, eos_ids, tokenizer: Tokenizer) -> StepOutput:
    """Token `index` of seq (just sampled) as a StepOutput: its text so far, and whether it ends the request (a
    stop string, EOS or a stop token, max_tokens, a finished grammar), in which case the tokens after it drop."""
    params, detok = req.params, req.detok
    tok = seq.token_ids[index]
    n_out = index + 1 - len(seq.prompt_ids)
    reason = None
    hit_stop_string = detok is not None and detok.add(tok)
    if hit_stop_string:
        reason = "stop"
    elif not params.ignore_eos and tok in eos_ids or tok in params.stop_token_ids:
        reason = "stop"
    elif n_out >= seq.max_tokens:
        reason = "length"
    elif req.matcher is not None and req.matcher.is_terminated():
        reason = "stop"                               # the grammar is complete: nothing more may follow
    if reason is not None:
        del seq.token_ids[index + 1:]                 # a token sampled after the stop is dropped
    if detok is not None:
        if reason is not None and not hit_stop_string:
            detok.flush()
        text = detok.take(final=reason is not None)
    else:
        text = tokenizer.decode(seq.output_ids) if reason is not None and req.detokenize else ""
    prompt_lp = None
    if req.prompt_logprobs is not None and not req.sent_prompt_logprobs:
        prompt_lp, req.sent_prompt_logprobs = req.prompt_logprobs, True
    return StepOutput(seq.request_id, [tok], text, reason is not None, reason, len(seq.prompt_ids), n_out, lp,
                      prompt_lp)


# ---- LLM's logprob bookkeeping and memory report, as plain functions of what they use -------------------------
def logprob_entry(chosen: list, top_v: list, top_i: list, j: int, n: int) -> Logprob:
    """Row j of the host lists -> (logprob, ((token, logprob), ...) of the top n). Tuples of numbers only: Python's
    collector stops tracking them, so a long run's logprobs do not make its full collections longer (a list each
    here cost top-5 logprobs offline ~0.7 s of 6 in full collections: HISTORY.md, thirty-fifth session)."""
    return chosen[j], tuple(zip(top_i[j][:n], top_v[j][:n]))


def row_logprobs(tokens, logits: torch.Tensor, rows: list[int], batch: int, n: int | None):
    """(tokens, logprobs of the rows that ask: (rows, their places in the lists, chosen, top values, top ids) or
    None). tokens: what sample_tokens returned, a tuple when the sampling graph computed every row's logprobs."""
    if isinstance(tokens, tuple):                      # the sampling graph computed every row's: keep the rows asking
        tokens, lists = tokens
        return tokens, (rows, rows, *lists)
    if tokens is None or not rows:
        return tokens, None
    if len(rows) == batch:                             # every row asks, no gather
        return tokens, (rows, rows, *token_logprobs(logits, tokens, n))
    at = to_device(rows, torch.int64, logits.device)
    return tokens, (rows, range(len(rows)), *token_logprobs(logits[at], tokens[at], n))


def prompt_logprob_rows(batch: Batch, cu: list[int], requests: dict):
    """Packed rows whose logits give prompt tokens' logprobs: row of position p predicts prompt token p+1.
    Returns (rows, target tokens, [(seq, first position, count)])."""
    rows, targets, owners = [], [], []
    for seq, n, start in zip(batch.seqs, batch.num_new, cu):
        req = requests[seq.request_id]
        if req.prompt_logprobs is None or seq.num_computed >= len(seq.prompt_ids):
            continue
        first, last = seq.num_computed, min(seq.num_computed + n, len(seq.prompt_ids) - 1)
        if last > first:
            rows += range(start, start + last - first)
            targets += seq.prompt_ids[first + 1:last + 1]
            owners.append((seq, first + 1, last - first))
    return rows, targets, owners


def prompt_logprobs(runner: Runner, first: int, targets: list[int], n: int) -> tuple:
    """Logprobs (and the top n) of prompt tokens from the hidden states of the rows before them (the runner's rows
    from `first` on), 1,024 rows at a time (a whole prompt's logits at once would be vocab x prompt floats)."""
    tgt = to_device(targets, torch.int64, runner.device)
    parts = [token_logprobs(runner.logits(first + i, first + min(i + 1024, len(targets))), tgt[i:i + 1024], n)
             for i in range(0, len(targets), 1024)]
    return tuple(torch.cat(p) for p in zip(*parts))


def record_prompt_logprobs(prompt_lp: tuple, requests: dict):
    """A collected step's prompt logprobs (owners, chosen, top values, top ids) appended to their requests."""
    owners, *lists = prompt_lp
    chosen, top_v, top_i = (t.tolist() for t in lists)
    at = 0
    for seq, first, count in owners:
        req = requests.get(seq.request_id)
        for k in range(count):                  # positions already recorded (a recompute after preemption) skip
            if req is not None and first + k == len(req.prompt_logprobs):
                req.prompt_logprobs.append(logprob_entry(chosen, top_v, top_i, at + k, req.params.prompt_logprobs))
        at += count


def report_memory(llm: LLM, num_blocks: int):
    """One line on stderr: what the weights, the KV cache and the CUDA graphs take of the GPU."""
    gib = lambda x: f"{x / 2**30:.2f} GiB"
    total = torch.cuda.get_device_properties(llm.device).total_memory
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    kv = llm.kv_cache.numel() * llm.kv_cache.element_size()
    reserved = torch.cuda.memory_reserved()
    print(f"GPU memory{' of rank 0' if llm.group else ''}: weights {gib(weights)}, KV cache {gib(kv)} ({num_blocks} "
          f"blocks), graphs {gib(llm.graph_bytes)}; reserved {gib(reserved)} of {gib(total)} "
          f"({reserved / total:.1%}; gpu_memory_utilization {llm.args.gpu_memory_utilization})", file=sys.stderr)
