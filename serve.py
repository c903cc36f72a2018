"""An OpenAI-compatible HTTP server for the engine, on the standard library's http.server (no web framework).

    python serve.py --model Qwen/Qwen3-0.6B --port 8000
    python serve.py --model tiny --random-weights --device cpu            # no download: a smoke run
    curl localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    curl -N localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

Endpoints: POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
/health, /metrics (Prometheus). Every EngineArgs field is a flag too (--max-num-seqs, --num-blocks, ...).

Two processes. The engine runs in its own (engine_process.py) and speaks token ids over a pipe; this one is the
HTTP front: a thread per connection validates a request (openai_api.py), tokenizes it, hands it to the engine
client, and streams back every step's tokens as they arrive, detokenized here (one event per step that brought
tokens: no batching by time). Read `Handler.generate` first.

Faults: a client that disconnects is aborted (its KV blocks are freed at the engine's next step). When the
engine process dies, every request in flight ends at once with an error (a stream gets an error event and
[DONE]), /health answers 503 and the server exits with status 1 so a supervisor restarts it. SIGTERM or
Ctrl-C: /health turns 503, new requests get 503, requests in flight run to the end for up to
--shutdown-timeout seconds, then whatever is left ends with an error and the server stops.
"""
import argparse
import dataclasses
import gc
import hmac
import json
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine import EngineArgs
from engine_process import ADMITTED, EngineClient, EngineError
from model import resolve_checkpoint
from chat import ChatParser, opens_think
from openai_api import (ApiError, Choice, field, grammar_spec, parse_messages, parse_prompts, parse_tools,
                        sampling_params, usage)
from sample import add_dataclass_args, pick
from tokenizer import TemplateError, Tokenizer

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """The front's counters (requests, tokens, latencies as clients see them), shared by handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = {"stop": 0, "length": 0, "tool_calls": 0, "abort": 0, "error": 0}
        self.ttft, self.itl = [0] * len(TTFT_BUCKETS), [0] * len(ITL_BUCKETS)
        self.sums = {"ttft": [0.0, 0], "itl": [0.0, 0]}

    def count(self, latencies: list[tuple[str, float]], tokens: int, finished: list[str]):
        """One handler wake-up's worth: ("ttft" or "itl", seconds) per output, tokens, finish reasons."""
        with self.lock:
            for name, x in latencies:
                counts, buckets = (self.ttft, TTFT_BUCKETS) if name == "ttft" else (self.itl, ITL_BUCKETS)
                for i, le in enumerate(buckets):
                    counts[i] += x <= le
                self.sums[name][0] += x
                self.sums[name][1] += 1
            self.generation_tokens += tokens
            for reason in finished:
                self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self, s: dict) -> str:
        """Prometheus text format: the engine's latest stats (s) and the front's counters."""
        lines = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP qwen3_{name} {help}", f"# TYPE qwen3_{name} {kind}"])
            lines.extend(f"qwen3_{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            metric("requests_running", "gauge", "Requests in the running batch.", [("", s.get("requests_running", 0))])
            metric("requests_waiting", "gauge", "Requests queued for admission.", [("", s.get("requests_waiting", 0))])
            metric("requests_finished_total", "counter", "Finished requests by reason.",
                   [(f'{{finish_reason="{k}"}}', v) for k, v in self.finished.items()])
            metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            metric("num_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
                   [("", s.get("num_preemptions", 0))])
            for k, key in (("used", "blocks_in_use"), ("free", "blocks_free"), ("cached", "blocks_cached")):
                metric(f"kv_blocks_{k}", "gauge", f"KV cache blocks {k} (of {s.get('blocks_total', 0)}).",
                       [("", s.get(key, 0))])
            hits, computed = s.get("prefix_hit_tokens", 0), s.get("prefill_tokens_computed", 0)
            metric("prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache, as a fraction.",
                   [("", round(hits / max(1, hits + computed), 6))])
            metric("gpu_busy_seconds_total", "counter", "GPU time of the engine's steps (CUDA events).",
                   [("", round(s.get("gpu_busy_seconds", 0.0), 6))])
            if "spec_draft_tokens" in s:              # speculative decoding is on
                drafted, accepted, seqs = s["spec_draft_tokens"], s["spec_accepted_tokens"], s["spec_verified_seqs"]
                metric("spec_acceptance_rate", "gauge", "Draft tokens the target accepted, as a fraction.",
                       [("", round(accepted / max(1, drafted), 6))])
                metric("spec_tokens_per_step", "gauge", "Tokens a sequence gains per verify pass.",
                       [("", round(1 + accepted / max(1, seqs), 6))])
            for name, help, counts, buckets in (("time_to_first_token_seconds", "Time to first token.", self.ttft,
                                                 TTFT_BUCKETS), ("inter_token_latency_seconds",
                                                                 "Time between tokens of a request.", self.itl,
                                                                 ITL_BUCKETS)):
                total, n = self.sums["ttft" if "first" in name else "itl"]
                samples = [(f'_bucket{{le="{le}"}}', c) for le, c in zip(buckets, counts)]
                metric(name, "histogram", help, samples + [('_bucket{le="+Inf"}', n), ("_sum", round(total, 6)),
                                                           ("_count", n)])
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    # Handler threads are joined at shutdown (server_close), after shutdown() has closed every connection: a
    # thread left running into interpreter teardown can abort the process.
    daemon_threads = False
    request_queue_size = 1024   # the listen backlog: socketserver's 5 refuses bursts of new connections

    def __init__(self, addr, client: EngineClient, tokenizer: Tokenizer, model_name: str, api_key: str | None,
                 max_queue: int, max_body: int, reasoning_parser: str = "qwen3"):
        super().__init__(addr, Handler)
        self.reasoning_parser = reasoning_parser         # qwen3: <think>...</think> -> reasoning_content; none
        self.client, self.tokenizer, self.model_name = client, tokenizer, model_name
        self.api_key, self.max_queue, self.max_body = api_key, max_queue, max_body
        self.max_model_len, self.room = client.info["max_model_len"], client.info["room"]   # LLM.max_model_len, .room
        self.metrics, self.created, self.draining = Metrics(), int(time.time()), False
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


class Response:
    """One HTTP request's choices, fed by the engine client's reader thread (`__call__`, once per engine event):
    it detokenizes, checks stop strings and, for a stream, renders and writes each event to the socket itself
    without blocking, so no handler thread wakes per token. What a full socket does not take waits in `pending`
    for the handler thread, which writes it blocking (`flush`): a slow client never holds up the others."""

    def __init__(self, srv: "Server", sock: socket.socket, jobs: list, choices: list[Choice], stream: bool,
                 event_head: str):
        self.srv, self.sock, self.choices, self.stream, self.event_head = srv, sock, choices, stream, event_head
        self.ids = [j[0] for j in jobs]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.admitted, self.done, self.wake = threading.Event(), threading.Event(), threading.Event()
        self.error: EngineError | None = None
        self.lock = threading.Lock()
        self.writing = self.flushing = self.gone = False   # headers sent; the handler is writing; socket closed
        self.pending = bytearray()
        self.t0 = time.perf_counter()
        self.last = [None] * len(choices)                   # when each choice's latest tokens came

    def __call__(self, item):
        try:
            self.handle(item)
        except Exception as e:                            # a bug here must end this request, never hang it
            traceback.print_exc()
            self.error = EngineError(500, f"internal error: {type(e).__name__}: {e}")
            self.wake.set()

    def handle(self, item):
        if item == ADMITTED:
            self.admitted.set()
        elif isinstance(item, EngineError):
            self.error = item
        else:
            i = self.index[item.request_id]
            c = self.choices[i]
            if c.finish_reason is not None:               # tokens in flight after a stop string
                return
            if c.add(item):                               # a stop string: the engine may stop this one now
                self.srv.client.abort([item.request_id])
            now = time.perf_counter()
            kind = "ttft" if self.last[i] is None else "itl"
            self.srv.metrics.count([(kind, now - (self.last[i] or self.t0))], len(item.token_ids),
                                   [c.finish_reason] if c.finish_reason else [])
            self.last[i] = now
            if self.stream and (delta := c.delta()) is not None:
                self.write(self.event_head + json.dumps(delta) + "]}")
            if all(c.finish_reason is not None for c in self.choices):
                self.done.set()
        if item == ADMITTED or self.error is not None or self.done.is_set() or self.pending:
            self.wake.set()                               # the handler wakes for these only, never per token

    def write(self, event: str):
        data = sse_chunk(event)
        with self.lock:
            if self.gone:
                return
            if not self.writing or self.flushing or self.pending:
                self.pending += data                        # keep the order: behind what waits already
                return
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.gone = True
                return
            self.pending += data[sent:]

    def start(self):
        """The handler thread sent the headers: events may now go to the socket."""
        with self.lock:
            self.writing = True

    def flush(self):
        """On the handler thread: write what is pending, blocking, until nothing is."""
        while True:
            with self.lock:
                if not self.pending or not self.writing or self.gone:
                    self.flushing = False
                    return
                data, self.pending, self.flushing = bytes(self.pending), bytearray(), True
            try:
                self.sock.sendall(data)
            except OSError:
                with self.lock:
                    self.gone, self.flushing = True, False
                return

    def end(self, reason: str):
        """Abort what still runs in the engine, and count it."""
        live = [rid for rid, c in zip(self.ids, self.choices) if c.finish_reason is None]
        self.srv.client.abort(live)
        self.srv.metrics.count([], 0, [reason] * len(live))


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

    # ---- endpoints ----------------------------------------------------------------------------------------
    def health(self):
        client = self.server.client
        status = "ok" if client.alive and not self.server.draining else (
            "engine dead" if client.dead.is_set() else "stopping")
        self.send_json(200 if status == "ok" else 503, {"status": status})

    def metrics(self):
        self.send_json(200, self.server.metrics.render(self.server.client.stats),
                       content_type="text/plain; version=0.0.4")

    def models(self):
        self.send_json(200, {"object": "list", "data": [{
            "id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "qwen3",
            "max_model_len": self.server.max_model_len}]})

    def completions(self):
        body = read_body(self.headers, self.rfile, self.server)
        ids, params, echo = completion_request(body, self.server.tokenizer)
        self.generate(body, ids, params, chat=False, echo=echo)

    def chat(self):
        body = read_body(self.headers, self.rfile, self.server)
        ids, params, tools = chat_request(body, self.server.tokenizer, self.server.room)
        self.generate(body, [ids], params, chat=True, echo=None, tools=tools)

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, body: dict, prompts: list[list[int]], params, chat: bool, echo: list[str] | None,
                 tools: bool = False):
        n, stream = field(body, "n", int, 1), field(body, "stream", bool, False)
        include_usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False)
        srv = self.server
        check_admissible(srv, prompts, n)
        rid, jobs, choices = new_jobs(srv, prompts, params, n, chat, echo, tools)
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": srv.model_name}
        resp = Response(srv, self.connection, jobs, choices, stream, json.dumps(head)[:-1] + ', "choices": [')
        srv.generating.add(threading.current_thread())
        try:
            srv.client.submit(jobs, resp)
            self.wait(resp, resp.admitted)
            if resp.error is None:
                with srv.metrics.lock:
                    srv.metrics.prompt_tokens += sum(map(len, prompts)) * n
                if stream:                               # only now is it certain to be a 200
                    self.start_stream()
                    for i in range(len(jobs) if chat else 0):       # OpenAI's first chat chunk: the role
                        self.send_event({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                         "content": ""}, "logprobs": None, "finish_reason": None}]})
                    resp.start()
                self.wait(resp, resp.done)
            if resp.error is not None:
                raise ApiError(resp.error.status, resp.error.message, code=resp.error.code,
                               headers={"Retry-After": "1"} if resp.error.status == 503 else None)
        except (ConnectionError, TimeoutError):
            resp.end("abort")                            # the client left: its KV blocks go at the next step
            log_request(rid, choices, "client disconnected", resp.t0)
            raise
        except ApiError as e:
            resp.end("error")
            log_request(rid, choices, f"error {e.status}", resp.t0)
            if not self.streaming:
                raise
            self.send_event(e.body())
            return self.end_stream()
        finally:
            srv.generating.discard(threading.current_thread())
        log_request(rid, choices, ",".join(sorted({c.finish_reason for c in choices})), resp.t0)
        if stream:
            if include_usage:
                self.send_event({**head, "choices": [], "usage": usage(choices, n)})
            return self.end_stream()
        self.send_json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": [c.final() for c in choices], "usage": usage(choices, n)})

    def wait(self, resp: "Response", event: threading.Event):
        """Until event (or an error): write what a slow client's socket did not take, notice a client that left
        (every 0.1 s: a syscall or two)."""
        while not event.is_set() and resp.error is None:
            resp.wake.wait(0.1)
            resp.wake.clear()
            resp.flush()
            if resp.gone or client_gone(self.connection):
                raise ConnectionResetError("client closed the connection")
        resp.flush()

    def start_stream(self):
        self.send_response(200)
        for k, v in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     "Transfer-Encoding": "chunked"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.streaming = True

    def send_event(self, obj: dict | str):
        self.wfile.write(sse_chunk(obj if isinstance(obj, str) else json.dumps(obj)))

    def end_stream(self):
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


# ---- a generation request's pieces, as plain functions of what they use -------------------------------------
def read_body(headers, rfile, srv: Server) -> dict:
    """The request's JSON object (a bounded read: its size is checked before a byte is read) naming this model."""
    length = headers.get("Content-Length", "")
    if not length.isdigit():
        raise ApiError(411, "a Content-Length header is required")
    if int(length) > srv.max_body:
        raise ApiError(413, f"request body is {length} bytes; the limit is {srv.max_body}")
    try:
        body = json.loads(rfile.read(int(length)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = field(body, "model", str, srv.model_name)
    if model != srv.model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{srv.model_name}'",
                       param="model", code="model_not_found")
    return body


def completion_request(body: dict, tok: Tokenizer) -> tuple:
    """/v1/completions: (each prompt's token ids, SamplingParams, the prompts' text when echo is asked, else None)."""
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    prompts = parse_prompts(body["prompt"])
    params = sampling_params(body, default_max_tokens=16, chat=False, grammar=grammar_spec(body, None, None, "none"))
    ids = [tok.encode(p) if isinstance(p, str) else p for p in prompts]
    echo = [p if isinstance(p, str) else tok.decode(p) for p in prompts] if field(body, "echo", bool) else None
    return ids, params, echo


def chat_request(body: dict, tok: Tokenizer, room: int) -> tuple:
    """/v1/chat/completions: (the rendered conversation's token ids, SamplingParams, whether tools were given).
    An unset max_tokens is what `room` (Server.room) leaves after the prompt, as vLLM's is what the context does."""
    messages = parse_messages(body.get("messages"))
    tools, tool_name, tool_mode = parse_tools(body)
    kwargs = {"enable_thinking": True, **field(body, "chat_template_kwargs", dict, {})}
    try:
        prompt = tok.apply_chat_template(messages, tools=tools, documents=field(body, "documents", list), **kwargs)
    except TemplateError as e:                       # the template's raise_exception, or a Jinja error
        raise ApiError(400, f"chat template: {e}", param="messages") from None
    ids = tok.encode(prompt)
    params = sampling_params(body, max(1, room - len(ids)), chat=True,
                             grammar=grammar_spec(body, tools, tool_name, tool_mode))
    return ids, params, tools is not None


def check_admissible(srv: Server, prompts: list[list[int]], n: int):
    """A clear error before anything is queued: too many completions, a prompt that fills the context, a server
    that is stopping or whose engine died."""
    if not 1 <= n * len(prompts) <= srv.max_queue:
        raise ApiError(400, f"'n' x prompts must be in [1, {srv.max_queue}], got {n}", param="n")
    for p in prompts:
        if len(p) >= srv.max_model_len:
            raise ApiError(400, f"prompt has {len(p)} tokens; the context window is {srv.max_model_len} tokens "
                                f"(prompt + at least one new token)", param="prompt")
    if srv.draining or not srv.client.alive:
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})


def sse_chunk(event: str) -> bytes:
    """One server-sent event as one HTTP/1.1 chunk (streams use chunked transfer encoding)."""
    data = f"data: {event}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def new_jobs(srv: Server, prompts: list[list[int]], params, n: int, chat: bool, echo: list[str] | None,
             tools: bool) -> tuple[str, list, list]:
    """A request's id, its engine jobs ((id, prompt ids, params) for each of n completions of each prompt: seeds
    counted up from the request's, stop strings left to the front) and the Choice that collects each one."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    engine_params = dataclasses.replace(params, stop=[],              # stop strings are checked here
                                        think_first=chat and srv.reasoning_parser == "qwen3")   # grammar after it
    jobs = [(f"{rid}-{i}", prompts[i // n], engine_params if params.seed is None else
             dataclasses.replace(engine_params, seed=params.seed + i)) for i in range(len(prompts) * n)]
    parser = lambda ids: ChatParser(srv.reasoning_parser == "qwen3", tools,
                                    opens_think(srv.tokenizer.decode(ids[-4:]))) if chat else None
    choices = [Choice(i, srv.tokenizer, params, chat, echo and echo[i // n], prompts[i // n], parser(prompts[i // n]))
               for i in range(len(jobs))]
    return rid, jobs, choices


def client_gone(connection: socket.socket) -> bool:
    """True when the client closed its end (the socket reads as EOF). A stream would also notice on its next
    write, but a non-streaming or still-queued request writes nothing until it ends."""
    poller = select.poll()                      # not select.select(): it fails on descriptors above 1023
    poller.register(connection, select.POLLIN)
    try:
        return bool(poller.poll(0)) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def log_request(rid: str, choices: list, outcome: str, t0: float):
    """One line on stderr per generation request."""
    n_prompt, n_out = sum(c.num_prompt_tokens for c in choices), sum(c.num_output_tokens for c in choices)
    sys.stderr.write(f"{rid}: {n_prompt} prompt + {n_out} output tokens, {outcome}, "
                     f"{time.perf_counter() - t0:.2f} s\n")      # one write: threads' lines never interleave


# ----------------------------------------------------------------------------------------------------------
# Starting and stopping
# ----------------------------------------------------------------------------------------------------------

def start_server(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 api_key: str | None = None, max_queue: int = 1024, max_body: int = 8 << 20,
                 reasoning_parser: str = "qwen3", engine_main=None) -> Server:
    """Start the engine process and the HTTP server (in a background thread). Port 0 picks a free port: read
    it back from server.server_address. Stop both with `shutdown(server)`."""
    tokenizer = Tokenizer(None if args.random_weights else resolve_checkpoint(args.model))
    client = EngineClient(args, max_queue, **({"target": engine_main} if engine_main else {}))
    httpd = Server((host, port), client, tokenizer, model_name or args.model, api_key, max_queue, max_body,
                   reasoning_parser)
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="http", daemon=True).start()
    host, port = httpd.server_address[:2]
    info = client.info
    print(f"serving {httpd.model_name} ({info['dtype']} on {info['device']}, {info['num_blocks'] - 1} KV blocks of "
          f"{info['block_size']} tokens, context {info['max_model_len']}; engine process {info['pid']}) at "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    return httpd


def shutdown(httpd: Server, drain_timeout: float = 0.0):
    """Stop taking requests, let those in flight finish for up to drain_timeout seconds, stop the engine (what is
    still running ends with an error event), let handlers finish writing, close every connection."""
    httpd.draining = True
    deadline = time.monotonic() + drain_timeout
    while httpd.generating and time.monotonic() < deadline and httpd.client.alive:
        time.sleep(0.05)
    httpd.shutdown()
    httpd.client.stop()
    deadline = time.monotonic() + 5
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="the name clients ask for (default: --model)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    ap.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this answer 503")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies answer 413")
    ap.add_argument("--reasoning-parser", choices=["qwen3", "none"], default="qwen3",
                    help="chat: text between <think> and </think> goes to reasoning_content (none: all to content)")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds requests in flight may still run after SIGTERM / Ctrl-C")
    add_dataclass_args(ap, EngineArgs)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        httpd = start_server(pick(args, EngineArgs), args.host, args.port, args.served_model_name, args.api_key,
                             args.max_queue, args.max_body_bytes, args.reasoning_parser)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    gc.collect()
    gc.freeze()           # this process's startup heap is never scanned again (engine_process.py does the same)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5) and not httpd.client.dead.is_set():
        pass
    died = httpd.client.dead.is_set() and not stop.is_set()
    print("the engine process died: exiting with status 1" if died else "draining, then shutting down",
          file=sys.stderr)
    shutdown(httpd, 0.0 if died else args.shutdown_timeout)
    sys.exit(1 if died else 0)


if __name__ == "__main__":
    main()
