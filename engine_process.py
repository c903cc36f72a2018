"""The engine in its own process: the loop that owns the LLM there, and the client the HTTP front talks to.

    client = EngineClient(EngineArgs(model="Qwen/Qwen3-0.6B"), max_queue=1024)   # spawns the process, waits
    events = queue.Queue()
    client.submit([("req-1", token_ids, params)], events.put)    # called from the client's reader thread
    print(events.get())    # ADMITTED, then one Output per step that gave the request tokens, or an EngineError

Why a process: the HTTP front (threads, JSON, detokenization) and the engine loop would otherwise share one
interpreter lock, and every stream's wake-up would delay the next step. Here the engine process does nothing
but schedule, launch and collect steps, and the front never blocks it.

The protocol is plain tuples over one duplex pipe (pickled), token ids only, never text:
  front -> engine   ("add", [(request id, prompt token ids, SamplingParams)])   all or none are admitted
                    ("abort", [request ids])      ("stop",)
  engine -> front   ("ready", info)  ("failed", message)                         once, at start
                    ("admitted", [ids])  ("rejected", [ids], status, message, code)
                    ("out", [Output, ...])          every step that produced tokens, one message
                    ("stats", dict)                 when requests come or go, else at most every 20 ms
Stop strings are the front's (it detokenizes): it aborts a request whose text reached one.

When the engine process dies, the client's reader thread sees the pipe close: every request in flight gets an
EngineError at once, `alive` turns False, and `dead` is set (serve.py then exits non-zero for a supervisor
to restart it).
"""
import gc
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Callable, NamedTuple

ADMITTED = "admitted"          # first event on a request's sink when the engine accepted it
STATS_EVERY = 0.02             # seconds between stats messages while nothing changes


class Output(NamedTuple):
    """One request's tokens from one step (compact: pickled once per request per step)."""
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list | None
    prompt_logprobs: list | None


class EngineError(Exception):
    """The engine refused a request (status 400/503) or failed (500)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ----------------------------------------------------------------------------------------------------------
# The engine process
# ----------------------------------------------------------------------------------------------------------

def engine_main(args, conn, max_queue: int):
    """Entry point of the engine process: build the LLM, warm it up, then run the loop until told to stop or
    the front goes away. Ctrl-C reaches the whole process group: the front decides when this one stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import parallel
    parallel.exit_with_parent()
    from engine import LLM
    from sample import SamplingParams
    try:
        llm = LLM(args)
        # compile the kernels for prefill and decode now, not while the first client waits
        llm.generate([[1] * 16, [2] * 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        llm.generate([[3] * 5], SamplingParams(max_tokens=4, ignore_eos=True))
        llm.blocks.clear_cache()
        # the startup heap (torch, the model, Triton's kernels: ~300k objects) out of the collector's reach for good:
        # a full collection walked it in 130-290 ms (H200 box), a stall of every stream (vLLM and SGLang freeze too)
        gc.collect()
        gc.freeze()
    except Exception as e:
        if not isinstance(e, (ValueError, FileNotFoundError)):   # a bad setting needs its message, not a traceback
            traceback.print_exc()
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"max_model_len": llm.max_model_len, "room": llm.room, "vocab_size": llm.config.vocab_size,
                         "num_blocks": llm.blocks.num_blocks, "block_size": llm.args.block_size,
                         "dtype": str(llm.dtype).removeprefix("torch."), "device": str(llm.device),
                         "defaults": llm.defaults, "pid": os.getpid(),
                         "rank_pids": [p.pid for p in llm.group.procs] if llm.group else []}))
    EngineLoop(llm, conn, max_queue).run()


class EngineLoop:
    """Owns the LLM inside the engine process: commands in, one step, outputs out, repeat. Outputs leave
    through a sender thread: a front that reads slowly (a full pipe) never holds up the next step."""

    def __init__(self, llm, conn, max_queue: int):
        self.llm, self.conn, self.max_queue = llm, conn, max_queue
        self.stopping = False
        self.changed, self.last_stats = True, 0.0
        self.outbox: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self.send_loop, name="engine-sender", daemon=True)

    def send_loop(self):
        try:
            while (msg := self.outbox.get()) is not None:
                self.conn.send(msg)
        except (OSError, ValueError):
            self.stopping = True                            # the front is gone: nothing left to serve

    def run(self):
        self.sender.start()
        try:
            while not self.stopping:
                self.handle_commands(wait=0.0 if self.llm.has_work() else 0.05)
                if self.llm.has_work() and not self.stopping:
                    self.step()
                now = time.perf_counter()
                if self.changed or now - self.last_stats > STATS_EVERY:
                    self.outbox.put(("stats", self.llm.stats()))
                    self.changed, self.last_stats = False, now
        except (EOFError, OSError):
            pass                                            # the front is gone: nothing left to serve
        self.outbox.put(None)
        self.sender.join(10)

    def handle_commands(self, wait: float):
        while self.conn.poll(wait):
            wait = 0.0
            cmd = self.conn.recv()
            self.changed = True
            if cmd[0] == "add":
                self.add(cmd[1])
            elif cmd[0] == "abort":
                for rid in cmd[1]:
                    self.llm.abort(rid)
            elif cmd[0] == "stop":
                self.stopping = True

    def add(self, jobs):
        waiting = len(self.llm.scheduler.waiting)
        ids = [j[0] for j in jobs]
        if waiting + len(jobs) > self.max_queue:
            self.outbox.put(("rejected", ids, 503, f"{waiting} requests are already waiting (--max-queue "
                                                  f"{self.max_queue}); retry later", "queue_full"))
            return
        added = []
        try:
            for rid, prompt, params in jobs:
                self.llm.add_request(prompt, params, rid, detokenize=False)
                added.append(rid)
        except ValueError as e:                             # too long, bad token ids, too big for the cache
            for rid in added:
                self.llm.abort(rid)
            self.outbox.put(("rejected", ids, 400, str(e), None))
            return
        self.outbox.put(("admitted", ids))

    def step(self):
        try:
            outs = self.llm.step()
        except Exception as e:                              # a bug or out of memory: fail the batch, keep serving
            traceback.print_exc()
            rids = list(self.llm.seqs)
            for rid in rids:
                self.llm.abort(rid)
            self.llm.in_flight = self.llm.round = None
            self.outbox.put(("rejected", rids, 500, f"engine error: {type(e).__name__}: {e}", None))
            return
        if outs:
            self.outbox.put(("out", [Output(o.request_id, o.token_ids, o.finish_reason, o.num_prompt_tokens,
                                           o.num_output_tokens, o.logprobs, o.prompt_logprobs) for o in outs]))
            self.changed |= any(o.finished for o in outs)


# ----------------------------------------------------------------------------------------------------------
# The client, in the front's process
# ----------------------------------------------------------------------------------------------------------

class EngineClient:
    """Starts the engine process and talks to it. Thread-safe: HTTP threads call submit/abort; one reader
    thread hands the engine's messages to each request's callback (it must be quick: it runs on the reader
    thread, before the next request's)."""

    def __init__(self, args, max_queue: int = 1024, start_timeout: float = 1800, target=None):
        """target: the engine process's main (tests pass a stand-in that speaks the same protocol)."""
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        # a daemonic process may not start processes of its own, as tensor parallelism's ranks are; the engine
        # then watches for this process's death itself (parallel.exit_with_parent)
        self.proc = ctx.Process(target=target or engine_main, args=(args, child, max_queue), name="qwen3-engine",
                                daemon=getattr(args, "tensor_parallel_size", 1) == 1)
        self.proc.start()
        child.close()
        self.send_lock = threading.Lock()
        self.sinks: dict[str, Callable] = {}          # request id -> its callback
        self.sinks_lock = threading.Lock()
        self.dead, self.stopping = threading.Event(), False
        self.stats: dict = {}
        if not self.conn.poll(start_timeout):
            self.proc.kill()
            raise RuntimeError(f"the engine did not start in {start_timeout} s")
        try:
            kind, info = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while starting (exit code {self.proc.join(5) or self.proc.exitcode})") from None
        if kind == "failed":
            self.proc.join(10)
            raise RuntimeError(f"the engine could not start: {info}")
        self.info = info
        self.reader = threading.Thread(target=self.read, name="engine-reader", daemon=True)
        self.reader.start()

    @property
    def alive(self) -> bool:
        return not self.dead.is_set() and not self.stopping

    def submit(self, jobs: list[tuple], on_event: Callable):
        """Queue requests (all admitted or none). on_event gets ADMITTED, then each Output, or an EngineError."""
        with self.sinks_lock:
            if self.dead.is_set():
                raise EngineError(503, "the engine is not running")
            for rid, _, _ in jobs:
                self.sinks[rid] = on_event
        self.send(("add", jobs))

    def abort(self, request_ids: list[str]):
        with self.sinks_lock:
            for rid in request_ids:
                self.sinks.pop(rid, None)
        self.send(("abort", request_ids))

    def send(self, msg):
        try:
            with self.send_lock:
                self.conn.send(msg)
        except (OSError, ValueError):                        # the pipe is closed: the reader reports it
            pass

    def read(self):
        """The reader thread: route each message; when the pipe closes, fail everything in flight."""
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "out":
                    calls = []
                    with self.sinks_lock:
                        for out in msg[1]:
                            if (cb := self.sinks.get(out.request_id)) is not None:
                                calls.append((cb, out))
                                if out.finish_reason is not None:
                                    del self.sinks[out.request_id]
                    for cb, out in calls:
                        self.call(cb, out)
                elif kind == "stats":
                    self.stats = msg[1]                        # replaced, never changed: readers see a whole dict
                elif kind == "admitted":
                    self.route(msg[1], ADMITTED, keep=True)
                elif kind == "rejected":
                    self.route(msg[1], EngineError(msg[2], msg[3], msg[4]), keep=False)
        except (EOFError, OSError):
            pass
        finally:
            self.dead.set()
            code = self.proc.exitcode
            err = EngineError(503 if self.stopping else 500, "the server is shutting down" if self.stopping else
                              f"the engine process died (exit code {code}); this request was lost")
            with self.sinks_lock:
                calls = {id(cb): cb for cb in self.sinks.values()}
                self.sinks.clear()
            for cb in calls.values():
                self.call(cb, err)

    def route(self, request_ids, event, keep: bool):
        with self.sinks_lock:
            calls = {id(cb): cb for rid in request_ids if (cb := self.sinks.get(rid)) is not None}
            if not keep:
                for rid in request_ids:
                    self.sinks.pop(rid, None)
        for cb in calls.values():
            self.call(cb, event)

    @staticmethod
    def call(cb, event):
        try:
            cb(event)
        except Exception:                                     # one request's bug must not stop the reader
            traceback.print_exc()

    def stop(self, timeout: float = 30):
        """Tell the engine to stop (requests still in it end with a 503 error) and wait for the process."""
        self.stopping = True
        self.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
        self.reader.join(5)


if __name__ == "__main__":
    sys.exit("engine_process.py is started by serve.py (EngineClient); run `python serve.py --help`")
