"""Chat encoding: byte-exact V3.2 renderings, the SFT mask, reasoning-drop rules, DSML parsing, ChatML.

The expected strings were written from the rules of DeepSeek's `encoding_dsv32.py` and its `test_output.txt`
(DeepSeek-V3.2 release, mirrored in huggingface/transformers @ 220c122b) for a conversation of our own; the
only deliberate difference from upstream is the wording of the tools block's guidance (`render_tools`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv32.chat import (
    END_THINK,
    IM_END,
    ChatFormatError,
    ChatView,
    check_tokenizer,
    encode_chat,
    held_suffix,
    parse_completion,
    render_chat,
    render_chat_text,
    render_tool_calls,
    render_tools,
)
from dsv32.tokenizer import Tokenizer, load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current local time in a time zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert money — e.g. USD to JPY",
            "parameters": {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "to": {"type": "string"}, "round": {"type": "boolean"}},
            },
        },
    },
]


def _call(name: str, args: dict[str, Any], id_: str) -> dict[str, Any]:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def conversation() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What time is it in Tokyo, and what is 12.5 USD in yen?"},
        {
            "role": "assistant",
            "reasoning_content": "Need the time and a conversion.",
            "content": "",
            "tool_calls": [
                _call("get_time", {"tz": "Asia/Tokyo"}, "a1"),
                _call("convert", {"amount": 12.5, "to": "JPY", "round": True}, "a2"),
            ],
        },
        {"role": "tool", "tool_call_id": "a1", "content": "2025-01-02T09:00:00+09:00"},
        {"role": "tool", "tool_call_id": "a2", "content": '{"value": 1875, "currency": "JPY"}'},
        {
            "role": "assistant",
            "reasoning_content": "Both results are in.",
            "content": "It is 09:00 in Tokyo; 12.5 USD is about 1875 JPY.",
        },
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "reasoning_content": "Polite close.", "content": "You're welcome."},
    ]


CALLS = (
    "\n\n<｜DSML｜function_calls>\n"
    '<｜DSML｜invoke name="get_time">\n'
    '<｜DSML｜parameter name="tz" string="true">Asia/Tokyo</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="convert">\n'
    '<｜DSML｜parameter name="amount" string="false">12.5</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="to" string="true">JPY</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="round" string="false">true</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜function_calls><｜end▁of▁sentence｜>"
)
RESULTS = (
    "\n\n<function_results>\n"
    "<result>2025-01-02T09:00:00+09:00</result>\n"
    '<result>{"value": 1875, "currency": "JPY"}</result>\n'
    "</function_results>\n\n"
)
ANSWER = "It is 09:00 in Tokyo; 12.5 USD is about 1875 JPY.<｜end▁of▁sentence｜>"
Q1 = "<｜User｜>What time is it in Tokyo, and what is 12.5 USD in yen?<｜Assistant｜>"


def header() -> str:
    return BOS + "You are a concise assistant." + "\n\n" + render_tools(TOOLS)


# Thinking mode: the first exchange precedes the last user message, so its reasoning is dropped and its
# turns close with </think>; the last exchange opens <think> and keeps its reasoning.
EXPECTED_THINKING_TAIL = (
    Q1
    + "</think>"
    + CALLS
    + RESULTS
    + "</think>"
    + ANSWER
    + "<｜User｜>Thanks!<｜Assistant｜><think>"
    + "Polite close.</think>You're welcome.<｜end▁of▁sentence｜>"
)
# Chat mode: every turn closes with </think> and no reasoning is rendered.
EXPECTED_CHAT_TAIL = (
    Q1
    + "</think>"
    + CALLS
    + RESULTS
    + "</think>"
    + ANSWER
    + "<｜User｜>Thanks!<｜Assistant｜></think>"
    + "You're welcome.<｜end▁of▁sentence｜>"
)
# Thinking with the tool round trip after the last user message: reasoning kept across the tool calls.
EXPECTED_TOOL_TURN_TAIL = (
    Q1
    + "<think>"
    + "Need the time and a conversion.</think>"
    + CALLS
    + RESULTS
    + "<think>"
    + "Both results are in.</think>"
    + ANSWER
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


# ------------------------------------------------------------------------------------------ rendering


def test_tools_block_structure() -> None:
    block = render_tools(TOOLS)
    assert block.startswith("## Tools\n\n")
    schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in TOOLS)
    assert block.endswith("\n<functions>\n" + schemas + "\n</functions>\n")
    assert "Convert money — e.g. USD to JPY" in block  # ensure_ascii=False, as upstream
    assert render_tools([t["function"] for t in TOOLS]) == block  # bare schemas accepted too


def test_render_thinking_with_tools_exact() -> None:
    text = render_chat_text(conversation(), tools=TOOLS, thinking=True)
    assert text == header() + EXPECTED_THINKING_TAIL


def test_render_chat_mode_exact() -> None:
    text = render_chat_text(conversation(), tools=TOOLS, thinking=False)
    assert text == header() + EXPECTED_CHAT_TAIL


def test_render_tool_turn_keeps_reasoning() -> None:
    text = render_chat_text(conversation()[:6], tools=TOOLS, thinking=True)
    assert text == header() + EXPECTED_TOOL_TURN_TAIL


def test_generation_prompts() -> None:
    msgs = conversation()
    assert render_chat_text(msgs[:2], thinking=True).endswith(Q1 + "<think>")
    assert render_chat_text(msgs[:2], thinking=False).endswith(Q1 + "</think>")
    # After tool results the next assistant turn opens with <think> (thinking) or </think> (chat).
    assert render_chat_text(msgs[:5], thinking=True).endswith("</function_results>\n\n<think>")
    assert render_chat_text(msgs[:5], thinking=False).endswith("</function_results>\n\n</think>")


def test_tools_on_message_equal_tools_argument() -> None:
    msgs = conversation()
    msgs[0] = {**msgs[0], "tools": TOOLS}
    assert render_chat_text(msgs, thinking=True) == header() + EXPECTED_THINKING_TAIL
    with pytest.raises(ChatFormatError, match="both"):
        render_chat(msgs, tools=TOOLS)


def test_system_added_for_tools_and_response_format() -> None:
    rf = {"type": "json_object"}
    text = render_chat_text([{"role": "user", "content": "hi"}], tools=TOOLS, response_format=rf)
    assert text == (
        BOS
        + "\n\n"
        + render_tools(TOOLS)
        + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        + '{"type": "json_object"}'
        + "<｜User｜>hi<｜Assistant｜></think>"
    )


def test_developer_role() -> None:
    msgs = [{"role": "developer", "content": "hi", "tools": TOOLS}]
    assert render_chat_text(msgs, thinking=True) == (
        BOS + "<｜User｜>\n\n" + render_tools(TOOLS) + "\n\n# The user's message is: hi<｜Assistant｜><think>"
    )


def test_reasoning_drop_rules() -> None:
    msgs = conversation()
    thinking = render_chat_text(msgs, thinking=True)
    assert "Need the time" not in thinking and "Both results are in" not in thinking  # before the last user
    assert "Polite close.</think>" in thinking
    assert "Polite close" not in render_chat_text(msgs, thinking=False)
    # Earlier reasoning is never rendered, drop_thinking or not (as upstream).
    assert render_chat_text(msgs, thinking=True, drop_thinking=False) == thinking
    # drop_thinking also drops developer turns before the last user turn (thinking mode only).
    dev = [{"role": "developer", "content": "be brief"}, {"role": "assistant", "content": "ok"}, *msgs[1:2]]
    assert "be brief" not in render_chat_text(dev, thinking=True)
    assert "be brief" in render_chat_text(dev, thinking=True, drop_thinking=False)
    assert "be brief" in render_chat_text(dev, thinking=False)


def test_segments_flag_assistant_text() -> None:
    segs = render_chat(conversation(), tools=TOOLS, thinking=True)
    assistant = [t for t, a in segs if a]
    assert assistant == [CALLS, ANSWER, "Polite close.</think>You're welcome.<｜end▁of▁sentence｜>"]
    assert segs[0][0].startswith(BOS) and sum(t.count(BOS) for t, _ in segs) == 1


def test_render_errors() -> None:
    with pytest.raises(ChatFormatError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="tool result"):
        render_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    msgs = conversation()
    with pytest.raises(ChatFormatError, match="missing"):
        render_chat(msgs[:4] + msgs[6:])  # one of two results missing before the next user turn
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [_call("f", {}, "1")]}]
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{oops"
    with pytest.raises(ChatFormatError, match="not valid JSON"):
        render_chat(bad)
    with pytest.raises(ValueError, match="family"):
        render_chat(msgs, family="alpaca")


# --------------------------------------------------------------------------------------- ids and mask


@pytest.mark.parametrize("thinking", [True, False])
def test_encode_chat_mask_is_exact(tok: Tokenizer, thinking: bool) -> None:
    msgs = conversation()
    ids, mask = encode_chat(msgs, tools=TOOLS, thinking=thinking, tokenizer=tok)
    text = render_chat_text(msgs, tools=TOOLS, thinking=thinking)
    assert ids == tok.encode(text)  # segment boundaries fall on added tokens
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    expected = [CALLS, ANSWER, ("Polite close.</think>" if thinking else "") + "You're welcome." + EOS]
    # The masked tokens are exactly the assistant's text, each run ending with its EOS (id 1).
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == expected
    assert all(r[-1] == tok.eos_id for r in runs)
    assert ids[0] == tok.bos_id and mask[0] == 0 and ids.count(tok.bos_id) == 1


def test_encode_chat_default_tokenizer_and_marker_check(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, mask = encode_chat(msgs)
    assert ids[:2] == [0, 128803] and ids[-1] == 1 and mask[-2:] == [1, 1]
    with pytest.raises(ChatFormatError, match="<|im_start|>"):
        encode_chat(msgs, family="chatml", tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        encode_chat(msgs, family="chatml")


# ------------------------------------------------------------------------------------------- parsing

TRICKY_ARGS: dict[str, Any] = {
    "query": 'He said "hi"\nthen left\t— naïve café 日本 😀 \\ back',
    "empty": "",
    "count": 3,
    "ratio": -0.25,
    "flag": False,
    "nothing": None,
    "items": [1, "two", {"three": [3, "3"]}],
    "nested": {"a": {"b": ["c", {"d": True}]}, "s": "x</y>"},
    "numeric_string": "42",
}


def _assistant_completion(message: dict[str, Any], *, thinking: bool) -> str:
    """The assistant's own text for `message` as the last turn after a user message."""
    segs = render_chat([{"role": "user", "content": "q"}, message], thinking=thinking)
    return segs[-1][0]


@pytest.mark.parametrize("thinking", [True, False])
def test_parse_round_trips_tool_calls(thinking: bool) -> None:
    msg = {
        "role": "assistant",
        "reasoning_content": "Plan: search, then compute.\nOK.",
        "content": "Let me look.\n",
        "tool_calls": [_call("search", TRICKY_ARGS, "x"), _call("noop", {}, "y")],
    }
    text = _assistant_completion(msg, thinking=thinking)
    out = parse_completion(text, thinking=thinking)
    assert out["content"] == "Let me look.\n"
    assert out["reasoning_content"] == (msg["reasoning_content"] if thinking else None)
    assert [c["id"] for c in out["tool_calls"]] == ["call_0", "call_1"]
    assert [c["function"]["name"] for c in out["tool_calls"]] == ["search", "noop"]
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == TRICKY_ARGS
    assert json.loads(out["tool_calls"][1]["function"]["arguments"]) == {}
    # Re-rendering the parsed message gives the same text back.
    assert render_tool_calls(out["tool_calls"]) + EOS == render_tool_calls(msg["tool_calls"]) + EOS


def test_parse_through_token_ids(tok: Tokenizer) -> None:
    msg = {"role": "assistant", "reasoning_content": "r", "content": "", "tool_calls": [_call("f", TRICKY_ARGS, "z")]}
    text = _assistant_completion(msg, thinking=True)
    decoded = tok.decode(tok.encode(text))
    out = parse_completion(decoded, thinking=True)
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == TRICKY_ARGS


def test_parse_plain_and_thinking() -> None:
    assert parse_completion("Hello!" + EOS) == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": None,
        "tool_calls": [],
    }
    out = parse_completion("Because.</think>Answer." + EOS, thinking=True)
    assert (out["reasoning_content"], out["content"]) == ("Because.", "Answer.")
    out = parse_completion("still thinking about", thinking=True)  # stopped by max_tokens
    assert (out["reasoning_content"], out["content"]) == ("still thinking about", "")
    assert parse_completion("no eos yet")["content"] == "no eos yet"


def test_parse_upstream_shaped_completion() -> None:
    text = (
        "Look up first.</think>\n\n<｜DSML｜function_calls>\n"
        '<｜DSML｜invoke name="get_datetime">\n'
        '<｜DSML｜parameter name="timezone" string="true">Asia/Shanghai</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>" + EOS
    )
    out = parse_completion(text, thinking=True)
    assert out["reasoning_content"] == "Look up first." and out["content"] == ""
    assert out["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_datetime", "arguments": '{"timezone": "Asia/Shanghai"}'},
        }
    ]


P = '<｜DSML｜parameter name="k" string="true">v</｜DSML｜parameter>'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("\n\n<｜DSML｜function_calls>\n" + '<｜DSML｜invoke name="f">\n' + P, "unclosed invoke"),
        ("\n\n<｜DSML｜function_calls>\n", "unclosed"),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k" string="true">v',
            "unclosed parameter",
        ),
        (
            "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
            "missing name",
        ),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>',
            "empty function name",
        ),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" string="false">'
            "{bad json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
            "not valid JSON",
        ),
        ('\n\n<｜DSML｜function_calls>\n<｜DSML｜call name="f">\n</｜DSML｜function_calls>', "expected an invoke"),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜arg>1</｜DSML｜arg>\n</｜DSML｜invoke>\n'
            "</｜DSML｜function_calls>",
            "expected a parameter",
        ),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n' + P + "\n" + P + "\n</｜DSML｜invoke>\n"
            "</｜DSML｜function_calls>",
            "duplicate",
        ),
        (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'
            "and more",
            "after the function calls",
        ),
        ("text with a stray ｜DSML｜ marker", "unexpected ｜DSML｜"),
        ("answer" + EOS + "more", "continues after"),
    ],
)
def test_parse_malformed_raises(text: str, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match):
        parse_completion(text + EOS if EOS not in text else text)
    assert issubclass(ChatFormatError, ValueError)


# ------------------------------------------------------------------------------------------- ChatML


@pytest.fixture(scope="module")
def chatml_tok() -> Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["system user assistant Hello there, how are you?"] * 20, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>")


def test_chatml_rendering() -> None:
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert render_chat_text(msgs, family="chatml") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # No default system prompt is invented; no generation prompt after an assistant turn or when disabled.
    only_user = render_chat_text(msgs[1:], family="chatml")
    assert only_user == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    full = [*msgs, {"role": "assistant", "content": "Hello there"}]
    assert render_chat_text(full, family="chatml").endswith("<|im_start|>assistant\nHello there<|im_end|>\n")
    assert render_chat_text(msgs, family="chatml", add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert parse_completion("Hello<|im_end|>", family="chatml")["content"] == "Hello"


# Expected ChatML-with-tools text, written from Qwen2.5-Instruct's chat template. Checked once, byte for byte,
# against that template rendered by transformers' Jinja environment (388 random conversations with tools,
# multi-call turns, content beside calls, consecutive tool results); the template is not copied here.
QWEN_SYSTEM = (
    "<|im_start|>system\nYou are a concise assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
    "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
QWEN_TURNS = (
    "<|im_start|>user\nWhat time is it in Tokyo, and what is 12.5 USD in yen?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "convert", "arguments": {"amount": 12.5, "to": "JPY", "round": true}}\n</tool_call>'
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n2025-01-02T09:00:00+09:00\n</tool_response>\n<tool_response>\n"
    '{"value": 1875, "currency": "JPY"}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nIt is 09:00 in Tokyo; 12.5 USD is about 1875 JPY.<|im_end|>\n"
    "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\nYou're welcome.<|im_end|>\n"
)


def test_chatml_tools_match_qwen25_template() -> None:
    text = render_chat_text(conversation(), tools=TOOLS, family="chatml")
    assert text == QWEN_SYSTEM + QWEN_TURNS
    # content beside a call: "\n" + content, then "\n<tool_call>..."
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [_call("get_time", {"tz": "UTC"}, "a")]}]
    assert render_chat_text(msgs, tools=TOOLS, family="chatml").endswith(
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n'
        "</tool_call><|im_end|>\n"
    )
    # no system message: no default identity line is invented, the turn starts with the section
    bare = render_chat_text([{"role": "user", "content": "Hi"}], tools=TOOLS[:1], family="chatml")
    assert bare.startswith("<|im_start|>system\n# Tools\n\nYou may call")
    # bare function schemas are wrapped as OpenAI tool entries
    assert render_chat_text(msgs[:1], tools=[TOOLS[0]["function"]], family="chatml") == bare
    rf = render_chat_text(msgs[:1], response_format={"type": "object"}, family="chatml")
    assert rf.startswith('<|im_start|>system\n# Response format\n\n') and '{"type": "object"}<|im_end|>' in rf
    with pytest.raises(ChatFormatError, match="without a preceding assistant tool call"):
        render_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}], family="chatml")


def test_chatml_tool_calls_parse_and_mask(chatml_tok: Tokenizer) -> None:
    turn = conversation()[2]
    completion = render_chat_text([turn], family="chatml", add_generation_prompt=False)
    completion = completion.removeprefix("<|im_start|>assistant\n").removesuffix("\n")
    msg = parse_completion(completion, family="chatml")
    assert msg["content"] == "" and [c["function"]["name"] for c in msg["tool_calls"]] == ["get_time", "convert"]
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        json.loads(c["function"]["arguments"]) for c in turn["tool_calls"]]
    with_text = parse_completion('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": [1]}}\n</tool_call>',
                                 family="chatml")
    assert with_text["content"] == "Sure." and with_text["tool_calls"][0]["function"]["arguments"] == '{"a": [1]}'
    for bad, match in [("<tool_call>\n{oops}\n</tool_call>", "not valid JSON"), ("<tool_call>\n{}", "unclosed"),
                       ('<tool_call>\n{"arguments": {}}\n</tool_call>', "name"),
                       ('<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>', "JSON object"),
                       ('<tool_call>\n{"name": "f"}\n</tool_call> trailing', "unexpected text")]:
        with pytest.raises(ChatFormatError, match=match):
            parse_completion(bad, family="chatml")
    msgs = conversation()[1:]
    ids, mask = encode_chat(msgs, tools=TOOLS, family="chatml", tokenizer=chatml_tok)
    assert ids == chatml_tok.encode(render_chat_text(msgs, tools=TOOLS, family="chatml"))
    produced = chatml_tok.decode([i for i, m in zip(ids, mask) if m])
    assert produced.startswith("<tool_call>\n") and produced.endswith("You're welcome.<|im_end|>")
    assert "<tool_response>" not in produced


def test_chat_view_streams_chatml_tool_calls() -> None:
    text = 'Let me see.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "<tool_call>"}}\n</tool_call><|im_end|>'
    view, content = ChatView(thinking=False, family="chatml"), ""
    for k in range(1, len(text) + 1):
        _, dc = view.deltas(text[:k], final=k == len(text))
        content += dc
        assert "<tool" not in content and not content.endswith("\n")
    final = view.message(text)
    assert content == final["content"] == "Let me see."
    assert json.loads(final["tool_calls"][0]["function"]["arguments"]) == {"tz": "<tool_call>"}


def test_check_tokenizer(tok: Tokenizer, chatml_tok: Tokenizer) -> None:
    check_tokenizer("deepseek-v3.2", tok)
    check_tokenizer("chatml", chatml_tok)
    with pytest.raises(ValueError, match="<｜User｜>"):
        check_tokenizer("deepseek-v3.2", chatml_tok)
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        check_tokenizer("chatml", tok)


def test_chatml_mask(chatml_tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there"}]
    ids, mask = encode_chat(msgs, family="chatml", tokenizer=chatml_tok)
    assert ids == chatml_tok.encode(render_chat_text(msgs, family="chatml"))
    assert chatml_tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello there<|im_end|>"


# ------------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_view_streams_what_the_final_message_says(thinking: bool) -> None:
    """Fed the completion one character at a time (the worst case for markers split across tokens), the
    streamed deltas add up to the parsed message, and no piece of `</think>` or DSML ever leaks out."""
    msg = {
        "role": "assistant",
        "reasoning_content": "Think about </thi and <｜DS first.",
        "content": "Checking.",
        "tool_calls": [_call("search", TRICKY_ARGS, "x")],
    }
    text = _assistant_completion(msg, thinking=thinking)
    view = ChatView(thinking=thinking, family="deepseek-v3.2")
    reasoning, content = "", ""
    for k in range(1, len(text) + 1):
        dr, dc = view.deltas(text[:k], final=k == len(text))
        reasoning, content = reasoning + dr, content + dc
        assert "｜DSML｜" not in content and END_THINK not in reasoning + content
    final = view.message(text)
    assert content == final["content"] == "Checking."
    assert reasoning == (final["reasoning_content"] or "")
    assert final["reasoning_content"] == (msg["reasoning_content"] if thinking else None)
    assert json.loads(final["tool_calls"][0]["function"]["arguments"]) == TRICKY_ARGS


def test_chat_view_chatml_and_unparsable_text() -> None:
    view = ChatView(thinking=False, family="chatml")
    assert view.deltas("Hello <|im_") == ("", "Hello ")
    assert view.deltas("Hello <|im_end|>", final=True) == ("", "")
    assert view.message("Hello" + IM_END)["content"] == "Hello"
    broken = ChatView(thinking=False, family="deepseek-v3.2").message("Hi <｜DSML｜function_calls>oops" + EOS)
    assert broken["content"] == "Hi <｜DSML｜function_calls>oops" and broken["tool_calls"] == []
    assert held_suffix("abc\n\n<", ["\n\n<tag>"]) == 3 and held_suffix("abc", ["xyz"]) == 0
