"""Qwen3's chat conventions in the model's text: reasoning between <think> and </think>, then tool calls as
<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (the Hermes format Qwen3 is trained on).

    parse = ChatParser(reasoning=True, tools=True)
    parts = parse.feed("<think>hmm</think>Let me look.<tool_call>{\\"name\\": \\"f\\", \\"arguments\\": {}}</tool_call>",
                       final=True)
    # {"reasoning_content": "hmm", "content": "Let me look.", "tool_calls": [{"id": ..., "function": ...}]}

One state machine serves streams and whole outputs alike (a whole output is one final piece), so a streamed
response always adds up to the unstreamed one. Text that might still become a tag (a partial "<think" at the
end of a piece) is held back until the next piece says what it is. As vLLM's qwen3 reasoning parser does, an
output that does not begin with <think> is all content (thinking switched off renders an empty think block in
the prompt), unless the prompt itself ends by opening the think block (the templates of Qwen3's Thinking-2507
models do: their outputs start inside it, with no <think> of their own); an unfinished think block (max_tokens
reached while thinking) is all reasoning. A tool-call block whose JSON is not {"name": string, "arguments":
object} stays in the content, as text: never an error.
"""
import json
import uuid

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"


def held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of text could be the start of tag (so must wait for more text)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def tool_call(block: str) -> dict | None:
    """The OpenAI tool call of one block's JSON, or None when it is not a well-formed call."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(
            obj.get("arguments", {}), dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}


def opens_think(prompt_tail: str) -> bool:
    """Whether a rendered prompt (its last few tokens' text will do) ends inside an opened think block."""
    return prompt_tail.rstrip().endswith(THINK_START)


class ChatParser:
    """Splits a chat completion's text, piece by piece, into reasoning, content and tool calls. thinking: the
    prompt opened the think block (opens_think), so the text starts as reasoning."""

    def __init__(self, reasoning: bool, tools: bool, thinking: bool = False):
        self.tools = tools
        self.phase = ("think" if thinking else "start") if reasoning else "content"   # start -> think -> content
        self.buf = ""                                          # text not yet handed out
        self.tool_calls: list[dict] = []

    def feed(self, piece: str, final: bool) -> dict:
        """New text in; out: {"reasoning_content": str, "content": str, "tool_calls": [...]}, each only when
        there is something of it."""
        self.buf += piece
        out = {"reasoning_content": "", "content": "", "tool_calls": []}
        while True:
            if self.phase == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_START):
                    self.buf, self.phase = head[len(THINK_START):], "think"
                elif THINK_START.startswith(head) and not final:
                    break                                      # too little text yet to tell
                else:
                    self.phase = "content"
            elif self.phase == "think":
                at = self.buf.find(THINK_END)
                if at >= 0:
                    out["reasoning_content"] += self.buf[:at]
                    self.buf, self.phase = self.buf[at + len(THINK_END):], "content"
                    continue
                keep = 0 if final else held_prefix(self.buf, THINK_END)
                out["reasoning_content"] += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            else:
                if not self.tools:
                    out["content"] += self.buf
                    self.buf = ""
                    break
                at = self.buf.find(TOOL_START)
                if at < 0:
                    keep = 0 if final else held_prefix(self.buf, TOOL_START)
                    out["content"] += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                out["content"] += self.buf[:at]
                end = self.buf.find(TOOL_END, at)
                if end < 0:
                    if final:                                  # never closed: it stays text
                        out["content"] += self.buf[at:]
                        self.buf = ""
                    else:
                        self.buf = self.buf[at:]
                    break
                call = tool_call(self.buf[at + len(TOOL_START):end].strip())
                if call is None:
                    out["content"] += self.buf[at:end + len(TOOL_END)]
                else:
                    out["tool_calls"].append(call)
                    self.tool_calls.append(call)
                self.buf = self.buf[end + len(TOOL_END):]
        return {k: v for k, v in out.items() if v}
