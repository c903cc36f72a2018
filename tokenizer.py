"""Text in, text out: the tokenizer, the chat template, and incremental detokenization with stop strings.

    tok = Tokenizer(Path("./Qwen3-0.6B"))
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False))
    detok = Detokenizer(tok, stop=["\\n\\n"]); [detok.add(t) for t in ids]; print(detok.take(final=True))

The tokenizer is the checkpoint's tokenizer.json through `tokenizers`; a checkpoint without one falls back to
raw bytes as token ids (random-weight sizes). The chat template comes from chat_template.jinja or
tokenizer_config.json and is rendered as transformers renders it: jinja2's immutable sandbox (a checkpoint's
template is untrusted code: it cannot reach Python internals), with transformers' helpers `raise_exception`,
`strftime_now` and a `tojson` filter that keeps non-ASCII text as is. Without a template, Qwen3's format.
"""
import codecs
import json
import sys
from datetime import datetime
from pathlib import Path


class TemplateError(ValueError):
    """The chat template refused the messages (its raise_exception) or failed to render."""


class Tokenizer:
    def __init__(self, ckpt_dir: Path | None):
        self.tok, self.chat_template, self.special = None, None, {}
        if ckpt_dir is not None and (ckpt_dir / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            self.tok = HFTokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
            cfg_path = ckpt_dir / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            self.chat_template = cfg.get("chat_template")
            if (ckpt_dir / "chat_template.jinja").exists():         # what current save_pretrained writes
                self.chat_template = (ckpt_dir / "chat_template.jinja").read_text()
            # templates may print these (bos_token, eos_token, ...); added tokens come as dicts with 'content'
            self.special = {k: v if isinstance(v, str) else v.get("content") for k, v in cfg.items()
                            if k.endswith("_token") and isinstance(v, (str, dict))}
        elif ckpt_dir is not None:
            print("note: no tokenizer.json, using raw bytes as token ids", file=sys.stderr)
        self._template = None

    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text on its own, special tokens included (logprobs name tokens by it). A token that is
        part of a UTF-8 character shows as U+FFFD, as in vLLM."""
        if self.tok is None:
            return bytes([token]).decode("utf-8", errors="replace") if token < 256 else ""
        return self.tok.decode([token], skip_special_tokens=False)

    def stream_decoder(self):
        """A function token id -> new text (None or '' while a character is incomplete), for one stream."""
        if self.tok is None:
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda t: utf8.decode(bytes([t])) if t < 256 else ""
        from tokenizers.decoders import DecodeStream
        stream = DecodeStream(skip_special_tokens=True)
        return lambda t: stream.step(self.tok, t)

    def apply_chat_template(self, messages: list[dict], enable_thinking: bool = True, tools: list | None = None,
                            documents: list | None = None, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the checkpoint's template in the sandbox (TemplateError when it refuses), or
        with Qwen3's format when the checkpoint has none."""
        if not self.chat_template:
            text = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
            if add_generation_prompt:
                text += "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
            return text
        import jinja2
        if self._template is None:
            self._template = sandbox().from_string(self.chat_template)
        try:
            return self._template.render(**{**self.special, **kwargs}, messages=messages, tools=tools,
                                         documents=documents, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking)
        except jinja2.exceptions.TemplateError as e:           # SecurityError, raise_exception, syntax
            raise TemplateError(str(e)) from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"{type(e).__name__}: {e}") from None


def sandbox():
    """jinja2's immutable sandbox with transformers' template helpers."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Detokenizer:
    """Incremental decoding for one request, with stop strings. The tokenizer's stream decoder emits text as
    soon as it is whole (nothing while a multi-byte character is split across tokens)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.next_text = tokenizer.stream_decoder()
        self.ids: list[int] = []
        self.text = ""                          # all output text so far
        self.emitted = 0                        # chars of self.text already handed out
        self.hold = max((len(s) for s in stop), default=1) - 1   # a stop string may still be forming

    def add(self, token: int) -> bool:
        """Append a token; returns True when a stop string appeared (the text is then cut before it)."""
        self.ids.append(token)
        new = self.next_text(token)
        if not new:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += new
        for s in self.stop:
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
