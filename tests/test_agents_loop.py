"""The agent loop (dsv32.agents.loop): the in-process engine path producing an RL `Rollout` that equals the chat
encoder's ids, V3.2's thinking-retention rule, tool errors fed back, the three context-management strategies,
and OpenAI-compatible endpoints (a scripted HTTP endpoint, and our own `dsv32 serve` app on loopback).

Models: the real tiny V3.2 (MLA + DSA + MoE) steered onto scripted replies by a large logit bonus (its routes,
log-probs and cache are real; only the choice of token is scripted), and the server tests' scripted model.
Environment tools and verifiers run in the real sandbox (unsafe mode only where none works, said in the skip
message of the sandbox tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent_fakes import TASK, FakeEndpoint, tc, write_shop_env
from dsv32 import chat
from dsv32.agents.cli import cli_main as agent_main
from dsv32.agents.loop import (
    SUMMARY_PROMPT,
    AgentConfig,
    EngineBackend,
    OpenAIBackend,
    discard_rounds,
    load_task,
    request_messages,
    run_env_task,
    schema_errors,
    tool_rounds,
)
from dsv32.agents.sandbox import sandbox_available
from dsv32.engine import Engine
from dsv32.rl import rollout as rollout_io
from serving_fakes import ScriptedModel, byte_tokenizer, peaked_tiny_v32

UNSAFE = not sandbox_available()[0]  # our own test environment's code is trusted; the sandbox is used when it works
TOK = byte_tokenizer()

@pytest.fixture(scope="module")
def env_dir(tmp_path_factory) -> Path:
    return write_shop_env(tmp_path_factory.mktemp("envs") / "shop-0000")


def calls(*pairs: tuple[str, dict]) -> str:
    return chat.render_tool_calls([{"name": n, "arguments": a} for n, a in pairs])


# two turns: look up a price (and one item that does not exist: a tool error), then submit
REPLIES = [
    "I need the price of apples." + chat.END_THINK + "Let me look it up."
    + calls(("get_price", {"item": "apples"}), ("get_price", {"item": "kiwis"})),
    "Apples cost 3 and there are no kiwis, so two apples cost 6." + chat.END_THINK
    + calls(("submit_result", {"answer": 6})),
]


def reply_index(hist: list[int], think: int, eos: int) -> tuple[int, int]:
    """(which reply, offset in it): reply r follows the r-th EOS and starts after the last `<think>`; offset -1
    before any (a prompt chunk still being prefilled)."""
    if think not in hist:
        return 0, -1
    start = len(hist) - 1 - hist[::-1].index(think)
    return hist.count(eos), len(hist) - 1 - start


class Steered(torch.nn.Module):
    """The real tiny V3.2 model; the next-token logit of the scripted reply gets +margin (then EOS). Reply r
    answers the r-th request (a request's prompt ends with the `<think>` opener), so it follows the turns even
    when context management rewrites the conversation."""

    def __init__(self, model: torch.nn.Module, replies: list[str], margin: float = 1000.0):
        super().__init__()
        self.model, self.config, self.margin = model, model.config, margin
        self.replies = [TOK.encode(r) for r in replies]
        self.hist = torch.zeros(1, 1, dtype=torch.long)
        self.requests = 0

    def new_cache(self, batch_size: int, max_len: int):
        self.hist = torch.zeros(batch_size, max_len, dtype=torch.long)
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids, *, cache, positions, cache_rows, **kw):
        out = self.model(input_ids, cache=cache, positions=positions, cache_rows=cache_rows, **kw)
        logits = out.logits if hasattr(out, "logits") else out
        think = TOK.token_to_id(chat.THINK)
        for b in range(input_ids.shape[0]):
            row = int(cache_rows[b])
            self.hist[row, positions[b]] = input_ids[b]
            if int(input_ids[b, -1]) == think:
                self.requests += 1
            _, k = reply_index(self.hist[row, : int(positions[b, -1]) + 1].tolist(), think, TOK.eos_id)
            reply = self.replies[self.requests - 1] if 0 < self.requests <= len(self.replies) else []
            if k >= 0:
                logits[b, -1, reply[k] if k < len(reply) else TOK.eos_id] += self.margin
        return out


class TurnScripted(ScriptedModel):
    """The server tests' scripted model, one reply per turn (for `dsv32 serve` in thinking mode)."""

    def __init__(self, replies: list[str]):
        super().__init__(TOK.vocab_size, [], trigger=[TOK.token_to_id(chat.THINK)], eos_id=TOK.eos_id)
        self.replies = [TOK.encode(r) for r in replies]

    def _next(self, hist: list[int]) -> int:
        r, k = reply_index(hist, TOK.token_to_id(chat.THINK), TOK.eos_id)
        reply = self.replies[r] if r < len(self.replies) else []
        return reply[k] if 0 <= k < len(reply) else TOK.eos_id


@pytest.fixture(scope="module")
def engine_run(env_dir):
    torch.manual_seed(0)
    engine = Engine(Steered(peaked_tiny_v32(), REPLIES), max_slots=1, max_len=4096)
    try:
        backend = EngineBackend(engine, TOK)
        cfg = AgentConfig(max_turns=4, max_tokens=400, temperature=1.0, top_p=0.9, seed=3)
        traj = run_env_task(backend, env_dir, load_task(env_dir), cfg, unsafe=UNSAFE)
        yield traj, engine.model.model
    finally:
        engine.shutdown()


def test_engine_trajectory_is_the_encoders_conversation(engine_run, env_dir):
    traj, _ = engine_run
    assert (traj.stop, traj.verdict, traj.answer, traj.reward) == ("submit", "correct", 6, 1.0)
    # the tool error was fed back as a tool message and the loop went on
    results = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert results[0] == "3" and results[1].startswith("Error:") and "kiwis" in results[1]
    ro = traj.rollout
    tools = json.loads((env_dir / "env.json").read_text())
    schemas = [*tools["tools"], tools["submit_tool"]]
    # the conversation the model saw: the submit call's own result (last message) was never fed back
    assert traj.messages[-1] == {"role": "tool", "tool_call_id": "call_0", "content": "Answer submitted."}
    ids, mask = chat.encode_chat(traj.messages[:-1], tools=schemas, thinking=True, tokenizer=TOK)
    assert ro.prompt_ids + ro.completion_ids == ids
    # token_mask: 1 on what the policy sampled, 0 exactly on the tool results segment
    assert ro.token_mask == mask[len(ro.prompt_ids):]
    zero = [t for t, m in zip(ro.completion_ids, ro.token_mask) if m == 0]
    assert TOK.decode(zero).startswith("\n\n<function_results>\n<result>3</result>\n<result>Error:")
    assert TOK.decode(zero).endswith("</result>\n</function_results>\n\n" + chat.THINK)
    # the sampled turns, verbatim, end with EOS; reasoning of the first turn is still in the context
    sampled = [t for t, m in zip(ro.completion_ids, ro.token_mask) if m == 1]
    assert TOK.decode(sampled) == "".join(r + chat.EOS for r in REPLIES)
    assert ro.reward == 1.0 and ro.verdict == "correct" and ro.task == "shop-0"


def test_engine_rollout_carries_sampler_records(engine_run, tmp_path):
    traj, model = engine_run
    ro = traj.rollout
    n = len(ro.prompt_ids) + len(ro.completion_ids)
    # sampler log-probs and kept sets (top_p 0.9 truncates) on sampled tokens, nothing on tool tokens
    for t, m, lp, kept in zip(ro.completion_ids, ro.token_mask, ro.logprobs, ro.kept):
        if m:
            assert lp <= 0 and kept is not None and t in kept.tolist()
        else:
            assert lp == 0.0 and kept is None
    # MoE routes for every computed position; they agree with one full forward of the whole sequence
    assert len(ro.routes) == 2 and all(r.shape == (n - 1, 2) for r in ro.routes)
    with torch.no_grad():
        out = model(torch.tensor([ro.prompt_ids + ro.completion_ids]), return_routes=True)
    same = [(a.sort(-1).values == b[: n - 1].sort(-1).values).all(-1).float().mean().item()
            for a, b in zip(ro.routes, out.routes)]
    assert min(same) > 0.97, same
    rollout_io.save([ro], tmp_path / "r.jsonl")
    back = rollout_io.load(tmp_path / "r.jsonl")[0]
    assert back.completion_ids == ro.completion_ids and back.token_mask == ro.token_mask
    assert all(torch.equal(a, b) for a, b in zip(back.routes, ro.routes))


# --------------------------------------------------------------------------------------- thinking retention

CONV = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "", "reasoning_content": "R1",
     "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
    {"role": "tool", "tool_call_id": "a", "content": "out1"},
    {"role": "assistant", "content": "answer one", "reasoning_content": "R2"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "", "reasoning_content": "R3",
     "tool_calls": [{"id": "b", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 2}"}}]},
    {"role": "tool", "tool_call_id": "b", "content": "out2"},
]
F_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_thinking_retention_matches_the_encoder():
    sent = request_messages(CONV)
    assert [m.get("reasoning_content") for m in sent if m["role"] == "assistant"] == [None, None, "R3"]
    assert [m.get("tool_calls") is not None for m in sent] == [m.get("tool_calls") is not None for m in CONV]
    assert [m["content"] for m in sent if m["role"] == "tool"] == ["out1", "out2"]
    full = chat.render_chat_text(CONV, tools=F_TOOL, thinking=True)
    assert chat.render_chat_text(sent, tools=F_TOOL, thinking=True) == full
    # byte-exact: the reasoning after the last user turn stays, the earlier is gone, calls and results stay
    assert "R3" + chat.END_THINK in full and "R1" not in full and "R2" not in full
    assert "<result>out1</result>" in full and "<result>out2</result>" in full
    assert full.count('invoke name="f"') == 2 and 'string="false">1<' in full and 'string="false">2<' in full
    # without the second user turn nothing is dropped
    sent = request_messages(CONV[:5])
    assert [m.get("reasoning_content") for m in sent if m["role"] == "assistant"] == ["R1", "R2"]


# --------------------------------------------------------------------------------------- scripted endpoint


def by_turn(replies):
    """Reply k to the request that follows k assistant messages."""
    return lambda req: replies[sum(m["role"] == "assistant" for m in req["messages"])]


def test_endpoint_loop_tool_errors_and_retention(env_dir):
    replies = [
        {"content": "", "reasoning_content": "look up", "tool_calls": [
            tc(0, "get_price", {"item": "apples"}), tc(1, "get_price", {"item": "kiwis"})]},
        {"content": "", "reasoning_content": "retry", "tool_calls": [
            tc(2, "get_price", {"item": 7}), tc(3, "get_price", "{not json"), tc(4, "nope", {})]},
        {"content": "6", "reasoning_content": "done"},
    ]
    ep = FakeEndpoint(by_turn(replies))
    try:
        backend = OpenAIBackend(ep.url)
        assert backend.model == "fake" and backend.window == 4096
        events = []
        traj = run_env_task(backend, env_dir, load_task(env_dir), AgentConfig(max_turns=5), unsafe=UNSAFE,
                            on_event=lambda k, v: events.append(k))
    finally:
        ep.close()
    assert (traj.stop, traj.verdict, traj.answer, traj.turns) == ("answer", "correct", 6, 3)
    assert [c["valid"] for c in traj.calls] == [True, True, False, False, False]
    assert [c["ok"] for c in traj.calls] == [True, False, False, False, False]
    tool_msgs = [m["content"] for m in traj.messages if m["role"] == "tool"]
    assert tool_msgs[0] == "3" and "no item named 'kiwis'" in tool_msgs[1]
    assert "expected string" in tool_msgs[2] and "not valid JSON" in tool_msgs[3] and "unknown function" in tool_msgs[4]
    # every request carries the tools, thinking on, and the earlier reasoning of this user turn
    last = ep.requests[-1]
    assert last["thinking"] == {"type": "enabled"} and len(last["tools"]) == 3
    assert [m.get("reasoning_content") for m in last["messages"] if m["role"] == "assistant"] == ["look up", "retry"]
    assert [m["role"] for m in last["messages"]] == ["system", "user", "assistant", "tool", "tool", "assistant",
                                                     "tool", "tool", "tool"]
    assert events.count("call") == 5 and events.count("result") == 5


def test_schema_errors():
    s = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "string"}},
                                          "c": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}
    assert schema_errors(s, {"a": 1, "b": ["q"], "c": "x"}) == []
    errs = schema_errors(s, {"a": True, "b": ["q", 2], "c": "z", "d": 0})
    assert len(errs) == 4 and "arguments.a: expected integer" in errs[0]
    assert schema_errors(s, {}) == ["arguments: missing required property 'a'"]
    assert schema_errors({"type": ["number", "null"]}, None) == [] and schema_errors({}, {"any": 1}) == []


# --------------------------------------------------------------------------------------- context management


def long_run_script(n_rounds: int):
    """Keep calling list_items until `n_rounds` calls were made in all, then answer 6; answer a summary request."""
    def script(req):
        msgs = req["messages"]
        if msgs[-1]["role"] == "user" and msgs[-1]["content"] == SUMMARY_PROMPT:
            return {"content": "apples cost 3 each"}
        made = int(getattr(script, "made", 0))
        if made < n_rounds:
            script.made = made + 1
            return {"content": "", "tool_calls": [tc(made, "list_items", {})]}
        return {"content": "6"}
    return script


def test_discard_rounds_unit():
    rounds = tool_rounds(CONV)
    assert rounds == [(6, 8)]  # only the rounds after the last user message count
    conv = CONV[:2] + [m for k in range(4) for m in (
        {"role": "assistant", "content": "", "tool_calls": [tc(k, "f", {})]},
        {"role": "tool", "tool_call_id": f"c{k}", "content": f"r{k}"})]
    assert len(tool_rounds(conv)) == 4
    assert [m["content"] for m in discard_rounds(conv, 1.0)] == ["sys", "first question"]
    kept = discard_rounds(conv, 0.75)
    assert [m["content"] for m in kept if m["role"] == "tool"] == ["r3"]


@pytest.mark.parametrize("strategy", ["discard-all", "discard-75", "summary"])
def test_context_strategies(env_dir, strategy):
    # the endpoint reports 100 tokens per message in a 1,000-token window: management starts past 800
    ep = FakeEndpoint(long_run_script(6), max_model_len=1000, total_tokens=lambda req: 100 * len(req["messages"]))
    try:
        cfg = AgentConfig(max_turns=12, context_strategy=strategy)
        traj = run_env_task(OpenAIBackend(ep.url), env_dir, load_task(env_dir), cfg, unsafe=UNSAFE)
    finally:
        ep.close()
    assert traj.verdict == "correct" and traj.context_events, traj.to_json()
    sizes = [len(r["messages"]) for r in ep.requests]
    # never past the window, but for the summary request itself (the task's messages + the request to summarise)
    assert max(n for n, r in zip(sizes, ep.requests) if r["messages"][-1]["content"] != SUMMARY_PROMPT) <= 10
    ev = traj.context_events[0]
    assert ev["strategy"] == strategy and ev["messages_after"] < ev["messages_before"]
    after = ep.requests[next(i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1])]["messages"]
    if strategy == "discard-all":
        assert [m["role"] for m in after] == ["system", "user"]
    elif strategy == "discard-75":
        assert [m["role"] for m in after][:2] == ["system", "user"] and sum(m["role"] == "tool" for m in after) == 1
    else:
        assert [m["role"] for m in after] == ["system", "user"] and "apples cost 3 each" in after[1]["content"]
        assert any(r["messages"][-1]["content"] == SUMMARY_PROMPT and "tools" not in r for r in ep.requests)


def test_context_management_is_not_an_rl_rollout(env_dir):
    """In-process with a strategy: the conversation is re-encoded, so no Rollout comes out (evaluation only)."""
    replies = [REPLIES[0], "Two apples cost 6." + chat.END_THINK + calls(("submit_result", {"answer": 6}))]
    engine = Engine(Steered(peaked_tiny_v32(), replies), max_slots=1, max_len=4096)
    try:
        backend = EngineBackend(engine, TOK)
        n0 = backend.prepare([{"role": "user", "content": TASK["prompt"]}], None, True)
        assert n0 > 0
        cfg = AgentConfig(max_turns=4, max_tokens=400, context=3000, context_share=0.75,
                          context_strategy="discard-all", keep_routes=False)
        traj = run_env_task(backend, env_dir, load_task(env_dir), cfg, unsafe=UNSAFE)
    finally:
        engine.shutdown()
    assert traj.verdict == "correct" and traj.context_events and traj.rollout is None


# --------------------------------------------------------------------------------------- our own server


def test_loop_against_dsv32_serve(env_dir):
    pytest.importorskip("uvicorn")
    from dsv32.serve import create_app  # the serve extra (fastapi); the rest of this file does not need it
    from serving_fakes import LiveServer

    app = create_app(TurnScripted(REPLIES), TOK, model_name="scripted", max_slots=2, max_len=4096)
    with LiveServer(app) as server:
        backend = OpenAIBackend(server.url + "/v1")
        traj = run_env_task(backend, env_dir, load_task(env_dir), AgentConfig(max_turns=4, max_tokens=300),
                            unsafe=UNSAFE)
    assert backend.window == 4096
    assert (traj.stop, traj.verdict, traj.answer) == ("submit", "correct", 6)
    first = traj.messages[2]
    assert first["reasoning_content"] == "I need the price of apples." and first["content"] == "Let me look it up."
    assert [c["name"] for c in traj.calls] == ["get_price", "get_price", "submit_result"]


def test_dsv32_agent_cli_prints_the_transcript(env_dir, tmp_path, capsys):
    replies = [{"content": "", "reasoning_content": "check the price", "tool_calls": [
        tc(0, "get_price", {"item": "apples"})]},
               {"content": "", "tool_calls": [tc(1, "submit_result", {"answer": 6})]}]
    ep = FakeEndpoint(by_turn(replies))
    try:
        rc = agent_main(["--base-url", ep.url, "--env", str(env_dir), "--task", "shop-0", "--thinking", "on",
                         "--messages", str(tmp_path / "t.json"), *(["--unsafe"] if UNSAFE else [])])
    finally:
        ep.close()
    out = capsys.readouterr().out
    assert rc == 0
    for line in ["[task shop-0] What do two apples cost", "--- turn 1", "[reasoning] check the price",
                 '[call] get_price({"item": "apples"})', "[result] get_price: 3", "--- turn 2",
                 "[call] submit_result(", "[stop] submit; 2 turns, 2 tool calls (2 valid)", "[answer] 6",
                 "[verdict] correct"]:
        assert line in out, (line, out)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["verdict"] == "correct" and saved["messages"][2]["reasoning_content"] == "check the price"
