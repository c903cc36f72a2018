"""An OpenAI-compatible HTTP server for the engine, on the standard library's http.server (no web framework).

    python serve.py --model Qwen/Qwen3-0.6B --port 8000
    python serve.py --model tiny --random-weights --device cpu            # no download: a smoke run
    curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    curl -N localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
/health, /metrics (Prometheus). Every EngineArgs field is a flag too (--max-num-seqs, --num-blocks, ...).

Two kinds of threads. `LLM` is not thread-safe, so exactly one thread, the engine loop (`EngineLoop.run`),
touches it: it drains an inbox of add/abort commands, calls `llm.step()`, and puts each StepOutput on the reply
queue of the HTTP request it belongs to. HTTP handler threads (one per connection) only validate, put a command
in the inbox and stream back what arrives on their reply queue. Read `EngineLoop` first, then `Handler.generate`.

Where the OpenAI API leaves room: a list of prompts gives len(prompts) x n choices (index = prompt index x n + i);
with a seed, choice i samples with seed + i; `logprobs`, `echo`, `suffix` and the presence/frequency penalties
answer 400 "not supported"; an unknown model answers 404 (code "model_not_found", as OpenAI does); `max_tokens`
defaults to 16 for completions (as OpenAI) and to the rest of the context window for chat; a request's choices
count against --max-queue together, and are admitted all or none.
"""
import argparse
import copy
import dataclasses
import hmac
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine import LLM, EngineArgs
from sample import SamplingParams, add_dataclass_args, pick

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
ADMITTED = "admitted"       # first item on a reply queue when the engine accepted the request
# Every stream wakes its handler thread, and all of them share one interpreter lock with the engine loop. So a
# stream waits STREAM_SHARE x (requests running) seconds between events, gathering the tokens that arrive
# meanwhile: one client gets every token at once; 256 clients get an event every ~100 ms, which bounds the
# handlers' share of the lock (about 2.5k wake-ups/s in all) and keeps the engine loop fed.
STREAM_SHARE = 4e-4


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Histogram:
    """A Prometheus histogram (cumulative buckets), observed by the engine thread only. `observe` replaces
    the counts list rather than changing it, so a shallow copy is a consistent snapshot for readers."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float):
        self.counts = [c + (x <= le) for c, le in zip(self.counts, self.buckets)]
        self.sum, self.count = self.sum + x, self.count + 1


@dataclasses.dataclass
class Route:
    """Where one engine request's outputs go, and when its last token came (for the latency histograms)."""
    reply: queue.Queue
    index: int                  # choice index in the HTTP response
    arrival: float
    last_token: float | None = None


# ----------------------------------------------------------------------------------------------------------
# The engine thread
# ----------------------------------------------------------------------------------------------------------

class EngineLoop:
    """Owns the LLM. HTTP threads talk to it only through `submit` / `abort` (the inbox) and read `snapshot`,
    a dict of counters the engine thread replaces after every step (replacing a reference is atomic)."""

    def __init__(self, llm: LLM, max_queue: int):
        self.llm, self.max_queue = llm, max_queue
        self.max_model_len = llm.max_model_len          # a constant, copied so handlers need not touch llm
        self.inbox: queue.Queue = queue.Queue()
        self.routes: dict[str, Route] = {}
        self.stopping = threading.Event()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.changed = False                             # requests came or went since the last publish
        self.publish()
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    # ---- called from HTTP threads -------------------------------------------------------------------------
    def submit(self, jobs: list[tuple[str, str | list[int], SamplingParams]], reply: queue.Queue, stream: bool):
        self.inbox.put(("add", jobs, reply, stream, time.perf_counter()))

    def abort(self, request_ids: list[str]):
        self.inbox.put(("abort", request_ids))

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    # ---- the engine thread --------------------------------------------------------------------------------
    def run(self):
        try:
            last_publish = 0.0
            while not self.stopping.is_set():
                self.handle_commands(block=not self.llm.has_work())   # idle: sleep on the inbox, no spinning
                if self.llm.has_work():
                    self.step()
                # metrics: at once when requests came or went, else at most 20 ms old (not a copy every step)
                if self.changed or time.perf_counter() - last_publish > 0.02 or not self.llm.has_work():
                    self.publish()
                    last_publish, self.changed = time.perf_counter(), False
        finally:
            # in-flight streams end with an error chunk; adds that arrive now are answered, not lost
            self.fail_all(ApiError(503, "the server is shutting down"))
            while not self.inbox.empty():
                cmd = self.inbox.get_nowait()
                if cmd[0] == "add":
                    cmd[2].put(ApiError(503, "the server is shutting down"))
            self.publish()

    def handle_commands(self, block: bool):
        try:
            cmd = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            self.changed = True
            while True:
                if cmd[0] == "add":
                    self.add(*cmd[1:])
                else:
                    for rid in cmd[1]:
                        if self.routes.pop(rid, None) is not None and self.llm.abort(rid):
                            self.finished["abort"] += 1
                cmd = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def add(self, jobs, reply: queue.Queue, stream: bool, arrival: float):
        waiting = self.llm.stats()["requests_waiting"]
        if waiting + len(jobs) > self.max_queue:
            reply.put(ApiError(503, f"{waiting} requests are already waiting (--max-queue {self.max_queue}); "
                                    f"retry later", code="queue_full", headers={"Retry-After": "1"}))
            return
        added = []
        try:
            for rid, prompt, params in jobs:
                # not streamed: the text is decoded once at the end instead of token by token
                self.llm.add_request(prompt, params, rid, stream_text=stream)
                added.append(rid)
        except ValueError as e:                          # too long, empty, bad token ids, too big for the cache
            for rid in added:
                self.llm.abort(rid)
            reply.put(ApiError(400, str(e), param="prompt"))
            return
        for i, (rid, _, _) in enumerate(jobs):
            self.routes[rid] = Route(reply, i, arrival)
            self.prompt_tokens += len(self.llm.seqs[rid].prompt_ids)
        reply.put(ADMITTED)

    def step(self):
        try:
            outs = self.llm.step()
        except Exception as e:                           # a bug or out of memory: fail the batch, keep serving
            traceback.print_exc()
            self.fail_all(ApiError(500, f"engine error: {type(e).__name__}: {e}"))
            return
        now = time.perf_counter()
        for out in outs:
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            self.generation_tokens += len(out.token_ids)
            if route.last_token is None:
                self.ttft.observe(now - route.arrival)
            else:
                self.itl.observe(now - route.last_token)
            route.last_token = now
            route.reply.put((route.index, out))
            if out.finished:
                self.changed = True
                del self.routes[out.request_id]
                self.finished[out.finish_reason] += 1

    def fail_all(self, err: ApiError):
        for rid, route in self.routes.items():
            self.llm.abort(rid)
            route.reply.put(err)
            self.finished["error"] += 1
        self.routes.clear()

    def publish(self):
        self.snapshot = {**self.llm.stats(), "prompt_tokens": self.prompt_tokens,
                         "generation_tokens": self.generation_tokens, "finished": dict(self.finished),
                         "ttft": copy.copy(self.ttft), "itl": copy.copy(self.itl)}


def render_metrics(s: dict) -> str:
    """Prometheus text format from an engine snapshot."""
    lines = []

    def metric(name, kind, help, samples):
        lines.extend([f"# HELP qwen3_{name} {help}", f"# TYPE qwen3_{name} {kind}"])
        lines.extend(f"qwen3_{name}{labels} {value}" for labels, value in samples)

    metric("requests_running", "gauge", "Requests in the running batch.", [("", s["requests_running"])])
    metric("requests_waiting", "gauge", "Requests queued for admission.", [("", s["requests_waiting"])])
    metric("requests_finished_total", "counter", "Finished requests by reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in s["finished"].items()])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", s["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", s["generation_tokens"])])
    metric("num_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
           [("", s["num_preemptions"])])
    for k, key in (("used", "blocks_in_use"), ("free", "blocks_free"), ("cached", "blocks_cached")):
        metric(f"kv_blocks_{k}", "gauge", f"KV cache blocks {k} (of {s['blocks_total']}).", [("", s[key])])
    # the share of prompt-token work the prefix cache saved: cached tokens / (cached + computed)
    hits, computed = s["prefix_hit_tokens"], s["prefill_tokens_computed"]
    metric("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache, as a fraction.",
           [("", round(hits / max(1, hits + computed), 6))])
    for name, help, h in (("time_to_first_token_seconds", "Time to first token.", s["ttft"]),
                          ("inter_token_latency_seconds", "Time between tokens of a request.", s["itl"])):
        samples = [(f'_bucket{{le="{le}"}}', c) for le, c in zip(h.buckets, h.counts)]
        metric(name, "histogram", help, samples + [('_bucket{le="+Inf"}', h.count), ("_sum", round(h.sum, 6)),
                                                   ("_count", h.count)])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Request parsing
# ----------------------------------------------------------------------------------------------------------

JSON_TYPES = {int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "a boolean"),
              str: ((str,), "a string"), list: ((list,), "a list"), dict: ((dict,), "an object")}
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "presence_penalty", "frequency_penalty", "logit_bias")


def field(body: dict, name: str, typ: type, default=None):
    """body[name] checked against a JSON type (absent or null: the default). JSON true is not a number."""
    v = body.get(name)
    if v is None:
        return default
    types, what = JSON_TYPES[typ]
    if not isinstance(v, types) or (isinstance(v, bool) and typ is not bool):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", param=name)
    return float(v) if typ is float else v


def sampling_params(body: dict, default_max_tokens: int) -> SamplingParams:
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    top_k, seed = field(body, "top_k", int), field(body, "seed", int)
    try:
        return SamplingParams(
            temperature=field(body, "temperature", float, 1.0), top_p=field(body, "top_p", float, 1.0),
            top_k=top_k if top_k and top_k > 0 else None,             # vLLM's -1 (or 0) means no top-k
            min_p=field(body, "min_p", float, 0.0), repetition_penalty=field(body, "repetition_penalty", float, 1.0),
            max_tokens=field(body, "max_completion_tokens", int, field(body, "max_tokens", int, default_max_tokens)),
            stop=stop, ignore_eos=field(body, "ignore_eos", bool, False),
            seed=None if seed is None else seed % (1 << 62))          # the sampler hashes seeds as int64
    except ValueError as e:                              # SamplingParams.__post_init__ checks the ranges
        raise ApiError(400, str(e)) from None


def parse_prompts(prompt) -> list[str | list[int]]:
    """A string, a list of token ids, or a non-empty list of either (several prompts)."""
    ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str) or ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of those", param="prompt")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", param=f"messages[{i}]")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)        # content parts: text only
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or text parts", param=f"messages[{i}]")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def make_choice(chat: bool, stream: bool, index: int, text: str, reason: str | None) -> dict:
    if not chat:
        body = {"text": text}
    elif stream:
        body = {"delta": {"content": text} if text else {}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": index, **body, "logprobs": None, "finish_reason": reason}


# ----------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    # Handler threads are joined at shutdown (server_close), after shutdown() has closed every connection: a
    # thread left running into interpreter teardown can abort the process.
    daemon_threads = False
    request_queue_size = 1024   # the listen backlog: socketserver's 5 refuses bursts of new connections

    def __init__(self, addr, engine: EngineLoop, llm: LLM, model_name: str, api_key: str | None, max_body: int):
        super().__init__(addr, Handler)
        self.engine, self.model_name, self.api_key, self.max_body = engine, model_name, api_key, max_body
        self.render_chat = llm.tokenizer.apply_chat_template   # a pure function of the template: any thread
        self.created = int(time.time())
        self.generating: set[threading.Thread] = set()          # handlers with requests in the engine
        self.connections: set[socket.socket] = set()            # open client sockets, closed by shutdown()
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):   # a client hanging up is normal
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; streams use chunked transfer encoding
    timeout = 60                    # seconds a socket read or write may block: idle or stalled clients go away
    routes = {"/v1/completions": ("POST", "completions"), "/v1/chat/completions": ("POST", "chat"),
              "/v1/models": ("GET", "models"), "/health": ("GET", "health"), "/metrics": ("GET", "metrics")}
    server: Server

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format, *args):       # no access log: one line per generation request instead
        pass

    def dispatch(self):
        path, self.streaming = self.path.split("?")[0].rstrip("/"), False
        self.last_gone_check = 0.0
        try:
            if path not in self.routes:
                raise ApiError(404, f"no such endpoint: {path}", code="not_found")
            method, name = self.routes[path]
            if self.command != method:
                raise ApiError(405, f"{path} takes {method}, not {self.command}", headers={"Allow": method})
            key = self.server.api_key
            if key and path != "/health" and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
                raise ApiError(401, "missing or incorrect API key (Authorization: Bearer <key>)",
                               code="invalid_api_key")
            getattr(self, name)()
        except ApiError as e:
            self.close_connection = True         # the body may be unread: start the next request afresh
            self.send_json(e.status, e.body(), e.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            self.close_connection = True
            if not self.streaming:
                self.send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def send_json(self, status: int, obj, headers: dict | None = None, content_type="application/json"):
        data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > self.server.max_body:       # refused before reading a byte of it
            raise ApiError(413, f"request body is {length} bytes; the limit is {self.server.max_body}")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = field(body, "model", str, self.server.model_name)
        if model != self.server.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.server.model_name}'",
                           param="model", code="model_not_found")
        return body

    # ---- endpoints ----------------------------------------------------------------------------------------
    def health(self):
        ok = self.server.engine.alive()
        self.send_json(200 if ok else 503, {"status": "ok" if ok else "stopping"})

    def metrics(self):
        self.send_json(200, render_metrics(self.server.engine.snapshot), content_type="text/plain; version=0.0.4")

    def models(self):
        self.send_json(200, {"object": "list", "data": [{
            "id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "qwen3",
            "max_model_len": self.server.engine.max_model_len}]})

    def completions(self):
        body = self.read_json()
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt")
        prompts = parse_prompts(body["prompt"])
        self.generate(body, prompts, sampling_params(body, default_max_tokens=16), chat=False)

    def chat(self):
        body = self.read_json()
        messages = parse_messages(body.get("messages"))
        thinking = field(field(body, "chat_template_kwargs", dict, {}), "enable_thinking", bool, True)
        try:
            prompt = self.server.render_chat(messages, enable_thinking=thinking)
        except Exception as e:                           # the template's raise_exception, or a Jinja error
            raise ApiError(400, f"chat template: {e}", param="messages") from None
        self.generate(body, [prompt], sampling_params(body, self.server.engine.max_model_len), chat=True)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, body: dict, prompts: list, params: SamplingParams, chat: bool):
        n, stream = field(body, "n", int, 1), field(body, "stream", bool, False)
        include_usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False)
        if not 1 <= n * len(prompts) <= self.server.engine.max_queue:
            raise ApiError(400, f"'n' x prompts must be in [1, {self.server.engine.max_queue}], got {n}", param="n")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        jobs = [(f"{rid}-{i}", prompts[i // n], params if params.seed is None else
                 dataclasses.replace(params, seed=params.seed + i)) for i in range(len(prompts) * n)]
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_name}
        texts, reasons, n_prompt, n_out = [""] * len(jobs), [None] * len(jobs), [0] * len(jobs), [0] * len(jobs)
        engine, t0, reply = self.server.engine, time.perf_counter(), queue.Queue()
        self.server.generating.add(threading.current_thread())
        engine.submit(jobs, reply, stream)
        try:
            while None in reasons:
                pieces = {}
                for item in self.next_items(reply):
                    if item == ADMITTED:         # only now is it certain to be a 200
                        if stream:
                            self.start_stream()
                            for i in range(len(jobs) if chat else 0):   # OpenAI's first chat chunk: the role
                                self.send_event({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                                 "content": ""}, "logprobs": None, "finish_reason": None}]})
                        continue
                    i, out = item
                    texts[i] += out.text
                    pieces[i] = pieces.get(i, "") + out.text
                    n_prompt[i], n_out[i], reasons[i] = out.num_prompt_tokens, out.num_output_tokens, out.finish_reason
                # one event per choice per wake-up, not per token: a slow reader gets fewer, bigger events
                for i, piece in pieces.items():
                    if stream:                   # also when the text is empty: a token still arrived
                        self.send_event({**head, "choices": [make_choice(chat, True, i, piece, reasons[i])]})
                if stream and None in reasons:
                    time.sleep(STREAM_SHARE * engine.snapshot["requests_running"])
        except (ConnectionError, TimeoutError):
            engine.abort([j[0] for j in jobs])           # the client left: its KV blocks go at the next step
            self.log(rid, n_prompt, n_out, "client disconnected", t0)
            raise
        except ApiError as e:
            engine.abort([j[0] for j in jobs])
            self.log(rid, n_prompt, n_out, f"error {e.status}", t0)
            if not self.streaming:
                raise
            self.send_event(e.body())
            return self.end_stream()
        finally:
            self.server.generating.discard(threading.current_thread())
        prompt_tokens = sum(n_prompt[::n])               # once per prompt, not per choice (as OpenAI counts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(n_out),
                 "total_tokens": prompt_tokens + sum(n_out)}
        self.log(rid, n_prompt, n_out, ",".join(sorted(set(reasons))), t0)
        if stream:
            if include_usage:
                self.send_event({**head, "choices": [], "usage": usage})
            return self.end_stream()
        choices = [make_choice(chat, False, i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
        self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": usage})

    def next_items(self, reply: queue.Queue) -> list:
        """Wait for the next item on the reply queue, then take all that are there. Raises the engine's
        ApiError, or ConnectionResetError when the client has gone."""
        while True:
            now = time.perf_counter()
            if now - self.last_gone_check > 0.1:       # a syscall or two: every 0.1 s, not every token
                self.last_gone_check = now
                if self.client_gone():
                    raise ConnectionResetError("client closed the connection")
            try:
                items = [reply.get(timeout=0.1)]
                break
            except queue.Empty:
                if not self.server.engine.alive():
                    raise ApiError(503, "the server is shutting down") from None
        while not reply.empty():
            items.append(reply.get_nowait())
        for item in items:
            if isinstance(item, ApiError):
                raise item
        return items

    def client_gone(self) -> bool:
        """True when the client closed its end (the socket reads as EOF). A stream would also notice on its
        next write, but a non-streaming or still-queued request writes nothing until it ends."""
        poller = select.poll()                  # not select.select(): it fails on descriptors above 1023
        poller.register(self.connection, select.POLLIN)
        try:
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def start_stream(self):
        self.send_response(200)
        for k, v in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     "Transfer-Encoding": "chunked"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.streaming = True

    def send_event(self, obj: dict | str):
        data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))     # one HTTP/1.1 chunk per event

    def end_stream(self):
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def log(self, rid, n_prompt, n_out, outcome, t0):
        sys.stderr.write(f"{rid}: {sum(n_prompt)} prompt + {sum(n_out)} output tokens, {outcome}, "
                         f"{time.perf_counter() - t0:.2f} s\n")      # one write: threads' lines never interleave


# ----------------------------------------------------------------------------------------------------------
# Starting and stopping
# ----------------------------------------------------------------------------------------------------------

def start_server(llm: LLM, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 api_key: str | None = None, max_queue: int = 1024, max_body: int = 8 << 20):
    """Start the engine thread and the HTTP server (in a background thread). Port 0 picks a free port: read
    it back from httpd.server_address. Returns (httpd, engine); stop both with `shutdown(httpd, engine)`."""
    engine = EngineLoop(llm, max_queue)
    httpd = Server((host, port), engine, llm, model_name or llm.args.model, api_key, max_body)
    engine.thread.start()
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="http", daemon=True).start()
    host, port = httpd.server_address[:2]
    print(f"serving {httpd.model_name} ({str(llm.dtype).removeprefix('torch.')} on {llm.device}, "
          f"{llm.blocks.num_blocks - 1} KV blocks of {llm.args.block_size} tokens, context {llm.max_model_len}) "
          f"at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    return httpd, engine


def shutdown(httpd: Server, engine: EngineLoop, timeout: float = 5.0):
    """Stop accepting, stop the engine (in-flight streams get an error chunk), let handlers finish writing."""
    httpd.shutdown()
    engine.stopping.set()
    engine.thread.join(30)
    deadline = time.monotonic() + timeout
    while httpd.generating and time.monotonic() < deadline:     # streams write their error chunk first
        time.sleep(0.01)
    with httpd.connections_lock:
        connections = list(httpd.connections)
    for conn in connections:                    # wakes handlers waiting on idle keep-alive connections
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    httpd.server_close()                        # joins every handler thread


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="the name clients ask for (default: --model)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    ap.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this answer 503")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies answer 413")
    add_dataclass_args(ap, EngineArgs)
    args = ap.parse_args(argv)
    try:
        llm = LLM(pick(args, EngineArgs))
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    # compile the kernels for prefill and decode now, not while the first client waits
    llm.generate([[1] * 16, [2] * 3], SamplingParams(max_tokens=4, ignore_eos=True))
    llm.blocks.clear_cache()
    httpd, engine = start_server(llm, args.host, args.port, args.served_model_name, args.api_key,
                                 args.max_queue, args.max_body_bytes)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5) and engine.thread.is_alive():
        pass
    print("shutting down", file=sys.stderr)
    shutdown(httpd, engine)


if __name__ == "__main__":
    main()
