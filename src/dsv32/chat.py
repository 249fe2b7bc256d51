"""Chat prompts: DeepSeek-V3.2's encoding (with DSML tool calls) and ChatML for Llama-family models.

V3.2 ships no Jinja template, only a Python encoder; this module reproduces its output byte for byte
(markers, newlines, ordering, which reasoning is kept) except the natural-language guidance inside the
tools block, which is our own wording (docs/chat-format.md). Prompts are built as text segments flagged
"produced by the assistant", and every segment boundary falls on an added token (BOS, `<｜Assistant｜>`,
`<think>`, `</think>`, EOS, `<|im_end|>`, ...), so tokenising segment by segment gives exactly the ids of
the whole text and an exact SFT mask.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsv32.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"

CALLS_OPEN = f"<{DSML}function_calls>"
CALLS_CLOSE = f"</{DSML}function_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_CLOSE = f"</{DSML}parameter>"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

FAMILIES = ("deepseek-v3.2", "chatml")
_FAMILY_ALIASES = {"deepseek-v3.2": "deepseek-v3.2", "dsv32": "deepseek-v3.2", "chatml": "chatml"}

Message = Mapping[str, Any]
Segment = tuple[str, bool]  # (text, produced by the assistant)

# Our own wording; the markers, layout and the trailing <functions> list follow V3.2's encoder exactly.
_TOOLS_GUIDANCE = """## Tools

You can call the functions listed at the end of this section. To call one or more of them, end your \
reply with a block in exactly this form:

<{dsml}function_calls>
<{dsml}invoke name="FUNCTION_NAME">
<{dsml}parameter name="PARAMETER_NAME" string="true">text value</{dsml}parameter>
<{dsml}parameter name="OTHER_PARAMETER" string="false">["a", "JSON", "value"]</{dsml}parameter>
</{dsml}invoke>
</{dsml}function_calls>

Use one invoke element per call; several calls may share one block. Set string="true" when the value \
is a string and write it as it is, with no quotes and no escaping. Set string="false" for every other \
type (number, boolean, null, array, object) and write the value as JSON.

The results come back in a <function_results> block, one <result> per call, in the order of the calls. \
When thinking is enabled, think again about the results before you answer or call more functions:

<function_results>
...
</function_results>

{think}...your reasoning about the results...{end_think}

Available functions, one JSON Schema per line:
<functions>
{schemas}
</functions>
"""

_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

# ChatML tool convention (models whose own template defines no tool format, e.g. SmolLM2): Qwen2.5's, byte for
# byte. The two instruction sentences are Qwen's prompt text kept verbatim on purpose: a model fine-tuned on
# this (Hermes-style) format recognises it only as written. See docs/chat-format.md.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CHATML_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_CHATML_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
# Our own wording (ChatML has no response-format convention of its own).
_CHATML_RESPONSE_FORMAT = (
    "# Response format\n\nReply with JSON only: one value that follows this JSON Schema.\n{schema}"
)


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered, or a completion that does not parse."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _text(content: Any) -> str:
    """Message content as text: str, None, a list of OpenAI content parts, or a JSON value (tool output)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        parts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in parts):
            return "".join(parts)
        raise ChatFormatError("only text content parts are supported")
    return _json(content)


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The `## Tools` block: DSML instructions + one JSON schema per line. Accepts OpenAI tool entries
    (`{"type": "function", "function": {...}}`) or bare function schemas."""
    schemas = []
    for t in tools:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise ChatFormatError(f"tool without a function name: {t!r}")
        schemas.append(_json(fn))
    return _TOOLS_GUIDANCE.format(dsml=DSML, think=THINK, end_think=END_THINK, schemas="\n".join(schemas))


def render_response_format(response_format: Any) -> str:
    return _RESPONSE_FORMAT.format(schema=_json(response_format))


def _call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not name:
        raise ChatFormatError(f"tool call without a function name: {call!r}")
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"tool call {name!r}: arguments are not valid JSON ({e})") from e
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object, got {type(args).__name__}")
    return name, dict(args)


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """`\\n\\n<｜DSML｜function_calls>...</｜DSML｜function_calls>`: strings raw (string="true"), other
    values as JSON (string="false")."""
    invokes = []
    for call in tool_calls:
        name, args = _call_arguments(call)
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _json(v)}{PARAM_CLOSE}"
            for k, v in args.items()
        )
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n{INVOKE_CLOSE}')
    return "\n\n" + CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + CALLS_CLOSE


# ------------------------------------------------------------------------------------------- rendering


def render_chat(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    response_format: Any = None,
    drop_thinking: bool = True,
    add_generation_prompt: bool = True,
    family: str = "deepseek-v3.2",
) -> list[Segment]:
    """The prompt as ordered `(text, produced_by_assistant)` segments; `"".join(t for t, _ in segs)` is the text.

    V3.2: `tools`/`response_format` go into the leading system message (an empty one is added when there
    is none). The generation prompt is part of V3.2's user and tool-result templates, so
    `add_generation_prompt` only matters for ChatML, where it is added unless the last message is the
    assistant's. See docs/chat-format.md for every rule.
    """
    fam = _family(family)
    if fam == "chatml":
        return _merge(_render_chatml(messages, tools, response_format, add_generation_prompt))
    return _merge(_render_dsv32(messages, tools, thinking, response_format, drop_thinking))


def render_chat_text(messages: Sequence[Message], **kw: Any) -> str:
    """`render_chat` joined into one string (what a server feeds the tokenizer)."""
    return "".join(text for text, _ in render_chat(messages, **kw))


def _family(family: str) -> str:
    try:
        return _FAMILY_ALIASES[family.lower()]
    except KeyError:
        raise ValueError(f"unknown chat family {family!r}; choose one of {', '.join(FAMILIES)}") from None


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for text, flag in segments:
        if not text:
            continue
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        else:
            out.append((text, flag))
    return out


def _last_user_index(messages: Sequence[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _render_dsv32(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    thinking: bool,
    response_format: Any,
    drop_thinking: bool,
) -> list[Segment]:
    msgs = [dict(m) for m in messages]
    for i, m in enumerate(msgs):
        if m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ChatFormatError(f"message {i}: unknown role {m.get('role')!r}")
    if tools or response_format is not None:
        if not msgs or msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": ""})
        for key, val in (("tools", tools), ("response_format", response_format)):
            if val:
                if msgs[0].get(key):
                    raise ChatFormatError(f"{key} given both as an argument and on the system message")
                msgs[0][key] = val
    if thinking and drop_thinking:
        # Upstream quirk kept for exactness: in thinking mode, developer turns before the last user turn
        # are dropped. (Earlier assistant reasoning is never rendered, with or without drop_thinking.)
        last = _last_user_index(msgs)
        msgs = [m for i, m in enumerate(msgs) if m["role"] != "developer" or i >= last]

    last_user = _last_user_index(msgs)
    segs: list[Segment] = [(BOS, False)]
    pending = n_calls = 0  # tool results still owed to the latest assistant's calls, out of n_calls
    for i, m in enumerate(msgs):
        role, content = m["role"], _text(m.get("content"))
        if pending and role != "tool":
            raise ChatFormatError(f"message {i}: {pending} tool result(s) missing before this {role} message")
        if role == "system":
            text = content
            if m.get("tools"):
                text += "\n\n" + render_tools(m["tools"])
            if m.get("response_format") is not None:
                text += "\n\n" + render_response_format(m["response_format"])
            segs.append((text, False))
        elif role in ("user", "developer"):
            if role == "developer":
                if not content:
                    raise ChatFormatError(f"message {i}: developer message without content")
                extra = "\n\n" + render_tools(m["tools"]) if m.get("tools") else ""
                if m.get("response_format") is not None:
                    extra += "\n\n" + render_response_format(m["response_format"])
                content = f"{extra}\n\n# The user's message is: {content}"
            opener = THINK if thinking and i == last_user else END_THINK
            segs.append((USER + content + ASSISTANT + opener, False))
        elif role == "assistant":
            reasoning = ""
            if thinking and i > last_user:
                reasoning = _text(m.get("reasoning_content")) + END_THINK
            calls = m.get("tool_calls") or []
            body = content + (render_tool_calls(calls) if calls else "") + EOS
            segs.append((reasoning + body, True))
            pending = len(calls)
            n_calls = pending
        else:  # tool
            if not pending:
                raise ChatFormatError(f"message {i}: tool result without a pending assistant tool call")
            text = "\n\n<function_results>" if pending == n_calls else ""
            text += f"\n<result>{content}</result>"
            pending -= 1
            if not pending:
                text += "\n</function_results>\n\n" + (THINK if thinking and i >= last_user else END_THINK)
            segs.append((text, False))
    if pending and pending != n_calls:
        raise ChatFormatError(f"conversation ends with {pending} of {n_calls} tool result(s) missing")
    return segs


def render_chatml_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """ChatML's `# Tools` section: one OpenAI tool entry per line as JSON (bare function schemas are wrapped
    as `{"type": "function", "function": ...}`), then the call format."""
    lines = []
    for t in tools:
        entry = t if isinstance(t, Mapping) and "function" in t else {"type": "function", "function": t}
        fn = entry.get("function")
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise ChatFormatError(f"tool without a function name: {t!r}")
        lines.append(_json(entry))
    return _CHATML_TOOLS_HEAD + "".join("\n" + line for line in lines) + _CHATML_TOOLS_TAIL


def render_chatml_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call, joined by newlines."""
    blocks = []
    for call in tool_calls:
        name, args = _call_arguments(call)
        blocks.append(f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {_json(args)}}}\n{TOOL_CALL_CLOSE}')
    return "\n".join(blocks)


def _render_chatml(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    response_format: Any,
    add_generation_prompt: bool,
) -> list[Segment]:
    """ChatML turns; tools and tool results in Qwen2.5's layout (docs/chat-format.md). Unlike Qwen's template,
    no default system prompt is invented: without a system message the system turn holds only the sections."""
    msgs = list(messages)
    system: str | None = None
    if msgs and msgs[0].get("role") == "system" and (tools or response_format is not None):
        system, msgs = _text(msgs[0].get("content")), msgs[1:]
    segs: list[Segment] = []
    if tools or response_format is not None:
        parts = [system] if system else []
        if response_format is not None:
            parts.append(_CHATML_RESPONSE_FORMAT.format(schema=_json(response_format)))
        if tools:
            parts.append(render_chatml_tools(tools))
        segs.append((f"{IM_START}system\n" + "\n\n".join(parts) + IM_END + "\n", False))
    offset = len(messages) - len(msgs)
    calls_open = False  # the previous assistant turn made tool calls (tool results may follow)
    for k, m in enumerate(msgs):
        i, role = k + offset, m.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            raise ChatFormatError(f"message {i}: unknown role {role!r}")
        content = _text(m.get("content"))
        if role == "tool":
            if not calls_open:
                raise ChatFormatError(f"message {i}: tool result without a preceding assistant tool call")
            first = k == 0 or msgs[k - 1].get("role") != "tool"
            last = k == len(msgs) - 1 or msgs[k + 1].get("role") != "tool"
            text = (f"{IM_START}user" if first else "") + f"\n<tool_response>\n{content}\n</tool_response>"
            segs.append((text + (IM_END + "\n" if last else ""), False))
            continue
        calls = m.get("tool_calls") or []
        calls_open = bool(calls) if role == "assistant" else False
        segs.append((f"{IM_START}{role}\n", False))
        if role == "assistant":
            body = content
            if calls:
                body += ("\n" if content else "") + render_chatml_tool_calls(calls)
            segs += [(body + IM_END, True), ("\n", False)]
        elif calls:
            raise ChatFormatError(f"message {i}: only assistant messages may carry tool_calls")
        else:
            segs.append((content + IM_END + "\n", False))
    if add_generation_prompt and (not messages or messages[-1].get("role") != "assistant"):
        segs.append((f"{IM_START}assistant\n", False))
    return segs


# -------------------------------------------------------------------------------------------- encoding


def encode_chat(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = False,
    family: str = "deepseek-v3.2",
    tokenizer: Tokenizer | None = None,
    **kw: Any,
) -> tuple[list[int], list[int]]:
    """Token ids and a same-length 0/1 mask marking the tokens the assistant produced (its reasoning,
    content, tool calls and closing EOS / `<|im_end|>`), which SFT trains on.

    `tokenizer` defaults to the bundled V3.2 tokenizer for the V3.2 family; ChatML needs one passed in.
    Extra keywords (`response_format`, `drop_thinking`, `add_generation_prompt`) go to `render_chat`.
    """
    fam = _family(family)
    if tokenizer is None:
        if fam != "deepseek-v3.2":
            raise ValueError(f"encode_chat(family={family!r}) needs tokenizer=")
        tokenizer = load_tokenizer()
    marker = USER if fam == "deepseek-v3.2" else IM_START
    if tokenizer.token_to_id(marker) is None:
        raise ChatFormatError(f"tokenizer has no {marker} token, so it cannot encode the {fam} chat format")
    segments = render_chat(messages, tools=tools, thinking=thinking, family=fam, **kw)
    # one batched call: the Rust backend releases the GIL while it works (`encode` holds it), so a server
    # tokenising a long conversation in a worker thread does not stall its event loop
    pieces = tokenizer.encode_batch([text for text, _ in segments])
    ids: list[int] = []
    mask: list[int] = []
    for piece, (_, by_assistant) in zip(pieces, segments):
        ids += piece
        mask += [int(by_assistant)] * len(piece)
    return ids, mask


# --------------------------------------------------------------------------------------------- parsing

_INVOKE_RE = re.compile(rf'<{DSML}invoke name="([^"]*)">')
_PARAM_RE = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">')
_WS = re.compile(r"\s*")


def parse_completion(text: str, *, thinking: bool = False, family: str = "deepseek-v3.2") -> dict[str, Any]:
    """Split a V3.2 completion (decoded with its special tokens) into an OpenAI-shaped assistant message.

    Returns `{"role", "content", "reasoning_content", "tool_calls"}`: reasoning is None unless `thinking`
    (text up to `</think>`; all of it when generation stopped before `</think>`); tool calls carry ids
    `call_0`, `call_1`, ... and JSON-string arguments. A trailing EOS is stripped. Raises ChatFormatError
    on malformed DSML or markers where none may appear.
    """
    if _family(family) == "chatml":
        body = text.removesuffix(IM_END)
        if IM_END in body:
            raise ChatFormatError(f"text continues after {IM_END}")
        start = body.find(TOOL_CALL_OPEN)
        if start < 0:
            return {"role": "assistant", "content": body, "reasoning_content": None, "tool_calls": []}
        content = body[:start].removesuffix("\n")
        return {"role": "assistant", "content": content, "reasoning_content": None,
                "tool_calls": _parse_chatml_calls(body, start)}

    body = text.removesuffix(EOS)
    if EOS in body:
        raise ChatFormatError("text continues after the end-of-sentence token")
    reasoning: str | None = None
    if thinking:
        body = body.removeprefix(THINK)
        reasoning, sep, body = body.partition(END_THINK)
        if not sep:  # generation stopped while still thinking
            body = ""
    start = body.find(CALLS_OPEN)
    tool_calls: list[dict[str, Any]] = []
    if start < 0:
        content = body
    else:
        content = body[:start].removesuffix("\n\n")
        tool_calls, end = _parse_calls(body, start + len(CALLS_OPEN))
        if body[end:].strip():
            raise ChatFormatError(f"unexpected text after the function calls: {body[end : end + 40]!r}")
    for label, part in (("content", content), ("reasoning", reasoning or "")):
        for marker in (BOS, THINK, END_THINK, DSML):
            if marker in part:
                raise ChatFormatError(f"unexpected {marker} in the {label}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


def _parse_calls(s: str, pos: int) -> tuple[list[dict[str, Any]], int]:
    """Parse invokes from `pos` (just after `<｜DSML｜function_calls>`) through the closing tag."""
    calls: list[dict[str, Any]] = []
    while True:
        pos = _WS.match(s, pos).end()
        if s.startswith(CALLS_CLOSE, pos):
            return calls, pos + len(CALLS_CLOSE)
        if pos >= len(s):
            raise ChatFormatError(f"unclosed {CALLS_OPEN} block")
        m = _INVOKE_RE.match(s, pos)
        if m is None:
            if s.startswith(f"<{DSML}invoke", pos):
                raise ChatFormatError(f"malformed invoke tag (missing name?): {s[pos : pos + 60]!r}")
            raise ChatFormatError(f"expected an invoke or {CALLS_CLOSE}, found {s[pos : pos + 60]!r}")
        name = m.group(1)
        if not name.strip():
            raise ChatFormatError("invoke tag with an empty function name")
        pos = m.end()
        args: dict[str, Any] = {}
        while True:
            pos = _WS.match(s, pos).end()
            if s.startswith(INVOKE_CLOSE, pos):
                pos += len(INVOKE_CLOSE)
                break
            if pos >= len(s):
                raise ChatFormatError(f"unclosed invoke of {name!r}")
            p = _PARAM_RE.match(s, pos)
            if p is None:
                raise ChatFormatError(f"in invoke of {name!r}: expected a parameter, found {s[pos : pos + 60]!r}")
            key, is_str = p.group(1), p.group(2) == "true"
            end = s.find(PARAM_CLOSE, p.end())
            if end < 0:
                raise ChatFormatError(f"unclosed parameter {key!r} of {name!r}")
            if not key:
                raise ChatFormatError(f"parameter without a name in invoke of {name!r}")
            if key in args:
                raise ChatFormatError(f"duplicate parameter {key!r} in invoke of {name!r}")
            raw = s[p.end() : end]
            if DSML in raw:
                raise ChatFormatError(f"parameter {key!r} of {name!r} contains a DSML tag: {raw[:60]!r}")
            if is_str:
                args[key] = raw
            else:
                try:
                    args[key] = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ChatFormatError(
                        f'parameter {key!r} of {name!r} has string="false" but is not valid JSON: {raw[:60]!r}'
                    ) from e
            pos = end + len(PARAM_CLOSE)
        calls.append(
            {
                "id": f"call_{len(calls)}",
                "type": "function",
                "function": {"name": name, "arguments": _json(args)},
            }
        )


def _parse_chatml_calls(s: str, pos: int) -> list[dict[str, Any]]:
    """`<tool_call>` blocks from ``pos`` to the end: each holds one JSON object `{"name", "arguments"}`."""
    calls: list[dict[str, Any]] = []
    while True:
        pos = _WS.match(s, pos).end()
        if pos >= len(s):
            return calls
        if not s.startswith(TOOL_CALL_OPEN, pos):
            raise ChatFormatError(f"unexpected text after the tool calls: {s[pos : pos + 40]!r}")
        end = s.find(TOOL_CALL_CLOSE, pos)
        if end < 0:
            raise ChatFormatError(f"unclosed {TOOL_CALL_OPEN} block")
        raw = s[pos + len(TOOL_CALL_OPEN) : end]
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"tool call is not valid JSON ({e}): {raw.strip()[:60]!r}") from e
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ChatFormatError(f'tool call without a "name": {raw.strip()[:60]!r}')
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            raise ChatFormatError(f"tool call {name!r}: arguments must be a JSON object, got {type(args).__name__}")
        calls.append({"id": f"call_{len(calls)}", "type": "function",
                      "function": {"name": name, "arguments": _json(args)}})
        pos = end + len(TOOL_CALL_CLOSE)


def check_tokenizer(family: str, tokenizer: Tokenizer) -> None:
    """Raise ValueError when ``tokenizer`` cannot carry ``family``'s format: its turn markers must be single
    added tokens (a server checks this once at start-up rather than failing every request)."""
    fam = _family(family)
    markers = (BOS, EOS, USER, ASSISTANT, DSML) if fam == "deepseek-v3.2" else (IM_START, IM_END)
    missing = [m for m in markers if tokenizer.token_to_id(m) is None]
    if missing:
        raise ValueError(f"chat format {fam!r} needs the marker token(s) {', '.join(missing)}, which this "
                         "tokenizer lacks; choose the format the model was trained on (--chat-format auto)")


# ------------------------------------------------------------------------------------------ streaming


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into one of ``markers``: text a stream
    must hold back until the next token tells whether a marker (or stop string) begins there."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class ChatView:
    """The assistant message of a completion while it streams: ``deltas`` splits the text generated so far
    into new reasoning and new content, holding back whatever might still be the start of a marker
    (`</think>`, a DSML function-calls block, ChatML's `<|im_end|>`); ``message`` parses the finished text
    (tool calls included). The server streams through this; parsing rules live in `parse_completion`."""

    CALLS = (CALLS_OPEN, "\n\n" + CALLS_OPEN)
    CHATML_HOLD = (IM_END, TOOL_CALL_OPEN, "\n" + TOOL_CALL_OPEN)

    def __init__(self, *, thinking: bool, family: str) -> None:
        self.thinking, self.family = thinking, _family(family)
        self.sent_reasoning = self.sent_content = 0  # characters already handed out

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """-> (reasoning, content) that can be shown now (everything when ``final``)."""
        if self.family == "chatml":
            body = text.removesuffix(IM_END)
            k = body.find(TOOL_CALL_OPEN)
            if k >= 0:
                return "", body[:k].removesuffix("\n")
            return "", body if final else body[: len(body) - held_suffix(body, self.CHATML_HOLD)]
        reasoning, body = "", text
        if self.thinking:
            reasoning, sep, body = text.removeprefix(THINK).partition(END_THINK)
            if not sep:
                body = ""
                if not final:
                    reasoning = reasoning[: len(reasoning) - held_suffix(reasoning, (END_THINK,))]
        k = body.find(CALLS_OPEN)
        if k >= 0:
            body = body[:k].removesuffix("\n\n")
        elif not final:
            body = body[: len(body) - held_suffix(body, self.CALLS)]
        return reasoning, body

    def deltas(self, text: str, final: bool = False) -> tuple[str, str]:
        """-> (new reasoning, new content) since the last call."""
        reasoning, content = self.split(text, final)
        dr, dc = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return dr, dc

    def message(self, text: str) -> dict[str, Any]:
        """The final assistant message; text that does not parse (e.g. a malformed tool call) is returned as
        content rather than failing the request."""
        try:
            return parse_completion(text, thinking=self.thinking, family=self.family)
        except ChatFormatError as e:
            log.info("completion did not parse (%s); returning it as content", e)
        reasoning, content = None, text
        if self.thinking:
            reasoning, _, content = text.removeprefix(THINK).partition(END_THINK)
        return {"role": "assistant", "content": content.removesuffix(EOS).removesuffix(IM_END),
                "reasoning_content": reasoning, "tool_calls": []}
