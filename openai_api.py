"""The OpenAI API mapping: request bodies -> SamplingParams and prompts, engine outputs -> response JSON.

No HTTP and no engine here (serve.py has those): `sampling_params`, `parse_prompts` and `parse_messages` read a
request; a `Choice` per returned choice turns the engine's token ids into text (detokenizing, cutting stop
strings) and renders OpenAI's shapes, streamed (`delta`) or whole (`final`), logprobs included.

Where the API leaves room (as vLLM does): settings a request leaves out take the model's defaults (its
generation_config.json); `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are accepted as extensions;
logprobs are the log-softmax of the raw logits, before penalties and temperature; a list of prompts gives
len(prompts) x n choices (index = prompt index x n + i); with a seed, choice i samples with seed + i.
"""
import json
import math

from chat import ChatParser
from engine_process import Output
from sample import MAX_LOGPROBS, SamplingParams
from tokenizer import Detokenizer, Tokenizer


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------

JSON_TYPES = {int: ((int,), "an integer"), float: ((int, float), "a number"), bool: ((bool,), "a boolean"),
              str: ((str,), "a string"), list: ((list,), "a list"), dict: ((dict,), "an object")}


def field(body: dict, name: str, typ: type, default=None):
    """body[name] checked against a JSON type (absent or null: the default). JSON true is not a number, and
    NaN or Infinity (which Python's json accepts) is no number either."""
    v = body.get(name)
    if v is None:
        return default
    types, what = JSON_TYPES[typ]
    if not isinstance(v, types) or (isinstance(v, bool) and typ is not bool) or (
            isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", param=name)
    return float(v) if typ is float else v


def sampling_params(body: dict, default_max_tokens: int, chat: bool, grammar: tuple | None = None) -> SamplingParams:
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported by this server", param="suffix")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    bias = field(body, "logit_bias", dict, {})
    try:
        bias = {int(k): field(bias, k, float) for k in bias}
    except ValueError:
        raise ApiError(400, "'logit_bias' keys must be token ids", param="logit_bias") from None
    if any(abs(b) > 100 for b in bias.values()):
        raise ApiError(400, "'logit_bias' values must be in [-100, 100]", param="logit_bias")
    if chat:        # chat: logprobs is a switch, top_logprobs how many alternatives
        top = field(body, "top_logprobs", int)
        if top is not None and not field(body, "logprobs", bool, False):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = (top or 0) if field(body, "logprobs", bool, False) else None
        prompt_logprobs, name = None, "top_logprobs"
    else:           # completions: logprobs is how many alternatives; echo adds the prompt's
        logprobs, name = field(body, "logprobs", int), "logprobs"
        prompt_logprobs = logprobs if field(body, "echo", bool, False) else None
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}], got {logprobs}", param=name)
    seed = field(body, "seed", int)
    try:
        return SamplingParams(
            temperature=field(body, "temperature", float), top_p=field(body, "top_p", float),
            top_k=field(body, "top_k", int), min_p=field(body, "min_p", float),
            repetition_penalty=field(body, "repetition_penalty", float),
            presence_penalty=field(body, "presence_penalty", float, 0.0),
            frequency_penalty=field(body, "frequency_penalty", float, 0.0), logit_bias=bias,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            max_tokens=field(body, "max_completion_tokens", int, field(body, "max_tokens", int, default_max_tokens)),
            stop=stop, ignore_eos=field(body, "ignore_eos", bool, False), grammar=grammar,
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
    """OpenAI messages -> the chat template's: system (developer), user, assistant (with tool_calls and
    reasoning_content), tool (with tool_call_id). Content: a string or text parts."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}.role must be system, user, assistant or tool", param=where)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)        # content parts: text only
        calls = m.get("tool_calls") if role == "assistant" else None
        if not isinstance(content, str) and not (content is None and calls):
            raise ApiError(400, f"{where}.content must be a string or text parts", param=where)
        msg = {"role": "system" if role == "developer" else role, "content": content or ""}
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      and isinstance(c["function"].get("name"), str) for c in calls):
                raise ApiError(400, f"{where}.tool_calls must be a list of {{function: {{name, arguments}}}}",
                               param=where)
            msg["tool_calls"] = calls
        if role == "tool":
            msg["tool_call_id"] = field(m, "tool_call_id", str, "")
        if isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    return out


def parse_tools(body: dict) -> tuple[list | None, str | None, str]:
    """(tools for the template, or None; the tool a call is forced to, if named; the tool_choice mode: none,
    auto or required)."""
    tools = field(body, "tools", list)
    choice = body.get("tool_choice", "auto" if tools else "none")
    if tools is not None and not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                     and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "'tools' must be a list of {type: function, function: {name, parameters}}", param="tools")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name, mode = choice["function"].get("name"), "required"
    elif choice in ("none", "auto", "required"):
        name, mode = None, choice
    else:
        raise ApiError(400, "'tool_choice' must be none, auto, required or {type: function, function: {name}}",
                       param="tool_choice")
    if mode != "none" and not tools:
        raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice")
    return (None if mode == "none" else tools), name, mode


def grammar_spec(body: dict, tools: list | None, tool_name: str | None, tool_mode: str) -> tuple | None:
    """Structured output asked for: response_format json_object / json_schema, or tool_choice required or
    named (a tool call block is then the whole output). Checked here, so a bad schema is a 400."""
    from grammar import check_spec, tool_call_spec
    fmt = field(body, "response_format", dict, {"type": "text"})
    spec = None
    if fmt.get("type") == "json_object":
        spec = ("json_object", "")
    elif fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema: an object",
                           param="response_format")
        spec = ("json_schema", json.dumps(schema))
    elif fmt.get("type") != "text":
        raise ApiError(400, "response_format type must be text, json_object or json_schema", param="response_format")
    if tool_mode == "required":
        if spec is not None:
            raise ApiError(400, "use either response_format or a required tool_choice", param="tool_choice")
        try:
            spec = tool_call_spec(tools, tool_name)
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
    if spec is not None:
        try:
            check_spec(spec)
        except ValueError as e:
            raise ApiError(400, str(e), param="response_format" if tool_mode != "required" else "tool_choice") from None
    return spec


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------

class Choice:
    """One choice of a response: the engine's tokens in, text (stop strings cut) and logprobs out.

    `add` takes one engine Output and returns True when a stop string ended the choice (the caller then aborts
    the engine's request). `delta` renders what is new since the last call, as a stream chunk's choice;
    `final` the whole choice. echo: the prompt's text (and its logprobs) come first."""

    def __init__(self, index: int, tokenizer: Tokenizer, params: SamplingParams, chat: bool, echo: str | None,
                 prompt_ids: list[int], parser: ChatParser | None = None):
        self.index, self.tokenizer, self.params, self.chat = index, tokenizer, params, chat
        self.parser = parser                           # chat: reasoning and tool calls out of the text
        self.parsed = {"reasoning_content": "", "content": "", "tool_calls": []}   # all of it so far
        self.unsent = {"reasoning_content": "", "content": "", "tool_calls": []}   # since the last delta
        self.detok = Detokenizer(tokenizer, params.stop)
        self.echo, self.prompt_ids = echo, prompt_ids
        self.text, self.sent = "", 0                   # text so far, and how much of it delta() has sent
        self.finish_reason = None
        self.num_prompt_tokens = self.num_output_tokens = 0
        self.logprobs: list[tuple] = []                # (token, logprob, top) per token, the prompt's first
        self.sent_logprobs, self.echoed = 0, False
        self.new_tokens = 0                            # tokens since the last delta (an event even without text)

    def add(self, out: Output) -> bool:
        self.num_prompt_tokens, self.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens
        if out.prompt_logprobs is not None and self.echo is not None:
            self.logprobs += [(t, None, None) if lp is None else (t, lp[0], lp[1])
                              for t, lp in zip(self.prompt_ids, out.prompt_logprobs)]
        hit = False
        self.new_tokens += len(out.token_ids)
        for i, tok in enumerate(out.token_ids):
            hit = self.detok.add(tok)
            if out.logprobs is not None:
                self.logprobs.append((tok, out.logprobs[i][0], out.logprobs[i][1]))
            if hit:
                break
        if hit:
            self.finish_reason = "stop"
        elif out.finish_reason is not None:
            self.detok.flush()
            self.finish_reason = out.finish_reason
        new = self.detok.take(final=self.finish_reason is not None)
        self.text += new
        if self.parser is not None:
            for k, v in self.parser.feed(new, final=self.finish_reason is not None).items():
                self.parsed[k] += v
                self.unsent[k] += v
            if self.finish_reason == "stop" and self.parser.tool_calls:
                self.finish_reason = "tool_calls"
        return hit

    def delta(self) -> dict | None:
        new, self.sent = self.text[self.sent:], len(self.text)
        lps, self.sent_logprobs = self.logprobs[self.sent_logprobs:], len(self.logprobs)
        if self.echo is not None and not self.echoed and not self.chat:
            new, self.echoed = self.echo + new, True  # the prompt comes with the first chunk
        if not new and not lps and not self.new_tokens and self.finish_reason is None:
            return None
        self.new_tokens = 0
        if self.chat and self.parser is not None:
            body = {"delta": {k: v for k, v in self.unsent.items() if v}}
            for k, call in enumerate(body["delta"].get("tool_calls", [])):
                call["index"] = len(self.parsed["tool_calls"]) - len(self.unsent["tool_calls"]) + k
            self.unsent = {"reasoning_content": "", "content": "", "tool_calls": []}
        elif self.chat:
            body = {"delta": {"content": new} if new else {}}
        else:
            body = {"text": new}
        return {"index": self.index, **body, "logprobs": self.render_logprobs(lps, 0),
                "finish_reason": self.finish_reason}

    def final(self) -> dict:
        if self.chat:
            msg = {"role": "assistant", "content": self.text}
            if self.parser is not None:
                p = self.parsed
                msg = {"role": "assistant", "content": p["content"] or (None if p["tool_calls"] else ""),
                       **({"reasoning_content": p["reasoning_content"]} if p["reasoning_content"] else {}),
                       **({"tool_calls": p["tool_calls"]} if p["tool_calls"] else {})}
            body = {"message": msg}
        else:
            body = {"text": (self.echo or "") + self.text}
        return {"index": self.index, **body, "logprobs": self.render_logprobs(self.logprobs, 0),
                "finish_reason": self.finish_reason}

    def render_logprobs(self, entries: list[tuple], offset: int) -> dict | None:
        if self.params.logprobs is None:
            return None
        name = self.tokenizer.token_text
        if self.chat:
            item = lambda t, lp: {"token": name(t), "logprob": lp, "bytes": list(name(t).encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(u, v) for u, v in top]}
                                for t, lp, top in entries], "refusal": None}
        texts = [name(t) for t, _, _ in entries]
        offsets, at = [], offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {name(u): v for u, v in top} for _, _, top in entries],
                "text_offset": offsets}


def usage(choices: list[Choice], n: int) -> dict:
    """Prompt tokens once per prompt (choices of one prompt share it, as OpenAI counts)."""
    prompt = sum(c.num_prompt_tokens for c in choices[::n])
    out = sum(c.num_output_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
