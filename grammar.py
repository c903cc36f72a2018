"""Structured output: a JSON schema, any JSON object, or a tool call, enforced by masking the logits each step.

    spec = ("json_schema", '{"type": "object", ...}')     # or ("json_object", ""), or ("tool_call", tools JSON)
    grammars = Grammars(tokenizer, vocab_size, eos_ids)     # one per engine: the vocabulary and compiled grammars
    m = grammars.matcher(spec)                              # one per request
    grammars.mask(logits_rows, [m, ...])                    # before sampling: disallowed tokens get -inf
    m.accept_token(token)                                   # after it is drawn

The grammar engine is xgrammar (what vLLM and SGLang use): an optional dependency, imported only when a request
asks for structured output; without it such a request answers 400. The mask is filled on the host (xgrammar
walks its automaton) and applied on the GPU; a constrained request is stepped with its last token on the host
since the next mask depends on it. Constraints start at the first output token, unless the request lets the
model think first (SamplingParams.think_first, which the server sets for chat with Qwen3's reasoning parser, as
vLLM's reasoning-aware structured output does): then the first token may also be <think>, and from it to
</think> nothing is masked; a prompt that opened the think block itself (Thinking-2507 templates) starts there.
"""
import json

from chat import THINK_END, THINK_START, TOOL_END, TOOL_START


def require_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output needs the optional package xgrammar: pip install xgrammar") from None
    return xgrammar


def check_spec(spec: tuple[str, str]):
    """Refuse a schema xgrammar cannot compile (ValueError, the server's 400) before it reaches the engine."""
    xgr = require_xgrammar()
    kind, text = spec
    try:
        if kind in ("json_schema", "tool_call"):
            xgr.Grammar.from_json_schema(text)
    except Exception as e:                            # xgrammar reports schema errors as RuntimeError
        raise ValueError(f"unusable JSON schema: {str(e).splitlines()[-1][:300]}") from None


def tool_call_spec(tools: list[dict], name: str | None) -> tuple[str, str]:
    """A tool call block for the named tool (or any of the tools): {"name": ..., "arguments": <its parameters>}."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    one = lambda f: {"type": "object", "properties": {"name": {"const": f["name"]},
                                                      "arguments": f.get("parameters") or {"type": "object"}},
                     "required": ["name", "arguments"]}
    schema = one(functions[0]) if len(functions) == 1 else {"anyOf": [one(f) for f in functions]}
    return "tool_call", json.dumps(schema)


class Constraint:
    """One request's structured output: its grammar's matcher, held off while the model thinks. think: the ids of
    <think> and </think> when the model may think first (else None); thinking: the prompt opened the block."""

    def __init__(self, matcher, think: tuple[int, int] | None, thinking: bool):
        self.matcher, self.think = matcher, think
        self.thinking = think is not None and thinking        # nothing is masked until </think>
        self.first = think is not None and not thinking       # the next token may be <think> beside the grammar's

    def accept_token(self, tok: int):
        if self.thinking:
            self.thinking = tok != self.think[1]
        elif self.first and tok == self.think[0]:
            self.thinking = True
        else:
            self.matcher.accept_token(tok)
        self.first = False

    def is_terminated(self) -> bool:
        return not self.thinking and self.matcher.is_terminated()


class Grammars:
    """The engine's vocabulary as xgrammar sees it, and the grammars compiled for it (cached by spec)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        xgr = self.xgr = require_xgrammar()
        if tokenizer.tok is None:                     # raw bytes as token ids
            vocab, kind = [bytes([i]) for i in range(256)] + [b""] * (vocab_size - 256), xgr.VocabType.RAW
        else:                                         # byte-level BPE pieces, in id order (padding ids: empty)
            vocab, kind = [""] * vocab_size, xgr.VocabType.BYTE_LEVEL
            for piece, i in tokenizer.tok.get_vocab(with_added_tokens=True).items():
                if i < vocab_size:
                    vocab[i] = piece
        info = xgr.TokenizerInfo(vocab, kind, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler, self.cache = xgr.GrammarCompiler(info), {}
        ids = [tokenizer.encode(t) if tokenizer.tok is not None else [] for t in (THINK_START, THINK_END)]
        self.think = (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None   # a vocabulary with them

    def constraint(self, spec: tuple[str, str], think_first: bool = False, thinking: bool = False) -> Constraint:
        """A request's Constraint: think_first, the model may think before the grammar applies (when the
        vocabulary has <think> and </think> tokens); thinking, its prompt opened the think block."""
        return Constraint(self.matcher(spec), self.think if think_first else None, thinking)

    def matcher(self, spec: tuple[str, str]):
        if spec not in self.cache:
            xgr, (kind, text) = self.xgr, spec
            if kind == "json_object":
                compiled = self.compiler.compile_builtin_json_grammar()
            elif kind == "json_schema":            # compact JSON: no free whitespace to wander off into
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "tool_call":
                compiled = self.compiler.compile_grammar(xgr.Grammar.concat(
                    xgr.Grammar.from_ebnf(f'root ::= "{TOOL_START}\\n"'), xgr.Grammar.from_json_schema(text, any_whitespace=False),
                    xgr.Grammar.from_ebnf(f'root ::= "\\n{TOOL_END}"')))
            else:
                raise ValueError(f"unknown structured output kind {kind!r}")
            self.cache[spec] = compiled
        return self.xgr.GrammarMatcher(self.cache[spec])

    def mask(self, logits, constraints: list):
        """logits (B, V) fp32, constraints[b] a row's Constraint or None: disallowed tokens of those rows -> -inf
        (none while a row thinks; <think> kept where a row may start thinking)."""
        rows = [i for i, c in enumerate(constraints) if c is not None and not c.thinking]
        if not rows:
            return
        bitmask = self.xgr.allocate_token_bitmask(len(constraints), logits.shape[1])   # all allowed
        for i in rows:
            constraints[i].matcher.fill_next_token_bitmask(bitmask, i)
        may_think = [i for i in rows if constraints[i].first]
        kept = logits[may_think, self.think[0]].clone() if may_think else None
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        if may_think:
            logits[may_think, self.think[0]] = kept
