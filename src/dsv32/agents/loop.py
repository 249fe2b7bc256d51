"""The agent loop (issue 13 item 2): a model calls tools until it answers, then the environment's verifier
scores the answer inside the sandbox.

One loop, two ways to reach a model:
- `EngineBackend`: our `Engine` in-process. The token sequence only ever grows: the sampled ids of a turn are
  appended verbatim (never decoded and re-encoded) and tool results are rendered by `dsv32.chat` and appended
  as new segments (every segment boundary falls on an added token, so this equals encoding the conversation
  in one go). The trajectory becomes one `dsv32.rl.rollout.Rollout`: `token_mask` 1 on sampled tokens, 0 on
  tool output, the sampler's log-probabilities, kept sets and MoE routes, so the RL trainer consumes it as is.
- `OpenAIBackend`: any OpenAI-compatible endpoint through the official `openai` client (evaluation; the
  trajectory is kept as messages).

Thinking retention (V3.2 report §3.2, "thinking in tool use"): earlier reasoning is dropped only when a new
user message arrives; assistant tool calls and tool results always stay. `request_messages` applies the rule
to what is sent over the wire (the V3.2 encoder applies the same rule when it renders, see
docs/chat-format.md), and the in-process trace keeps the reasoning because tool results are only appended.

Test-time context management (V3.2 report §4.4, evaluation only, never in RL rollouts): when the context
passes `context_share` of the window, `discard-all` drops every earlier tool-call round, `discard-75` the
oldest 75% of them, and `summary` has the model summarise its progress and restarts from the task plus the
summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv32 import chat
from dsv32.agents.envs.base import SUBMIT_TOOL, read_tasks
from dsv32.agents.notebook import NotebookSession
from dsv32.agents.sandbox import hand_over, sandbox_uid
from dsv32.agents.synth import run_jobs
from dsv32.agents.tools import Toolbox, ToolResult
from dsv32.engine import Engine, LogitsMask, SamplingParams
from dsv32.rl.rollout import Rollout

STRATEGIES = ("none", "discard-all", "discard-75", "summary")

SYSTEM_PROMPT = (
    "You are an agent that solves the user's task with the tools provided. Look up every fact you need with "
    "the tools instead of guessing; you may call several tools at once. When you know the answer, call "
    "submit_result with it in the form the task asks for."
)

SUMMARY_PROMPT = (
    "The conversation is getting too long. Summarise your progress on the task so far: the facts you found "
    "with the tools (names, numbers), what you have ruled out, and what is left to do. Write only the summary."
)


@dataclass
class AgentConfig:
    """Settings of one trajectory.

    context: the context window in tokens (None: the engine's slot length, or the endpoint's
        `max_model_len` when it reports one); the loop stops before a prompt would not fit.
    context_strategy / context_share: test-time context management (module docstring); "none" in RL.
    keep_routes: record MoE routes (None: when the model has routed experts).
    """

    max_turns: int = 16
    max_tokens: int = 1024
    context: int | None = None
    thinking: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    context_strategy: str = "none"
    context_share: float = 0.8
    keep_routes: bool | None = None
    system: str | None = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.context_strategy not in STRATEGIES:
            raise ValueError(f"context_strategy {self.context_strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if not 0 < self.context_share <= 1:
            raise ValueError(f"context_share must be in (0, 1], got {self.context_share}")
        if self.max_turns < 1 or self.max_tokens < 1:
            raise ValueError("max_turns and max_tokens must be >= 1")


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of one model turn: a function of (trajectory seed, turn) only, so a trajectory is
    reproducible whatever else the engine is batching."""
    key = f"dsv32.agent:{seed}:{turn}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# ------------------------------------------------------------------------------------------- messages


def request_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as sent to a model, under V3.2's thinking-retention rule: `reasoning_content` is kept
    on the assistant turns after the last user message (an agent's reasoning survives its tool rounds) and
    dropped before it; tool calls and tool results are always kept."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and (i < last_user or not m.get("reasoning_content")):
            m.pop("reasoning_content", None)
        out.append(m)
    return out


def tool_rounds(messages: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """`[start, end)` index ranges of the tool-call rounds after the last user message: an assistant message
    with tool calls plus the tool results that follow it."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    rounds = []
    i = last_user + 1
    while i < len(messages):
        if messages[i].get("role") == "assistant" and messages[i].get("tool_calls"):
            j = i + 1
            while j < len(messages) and messages[j].get("role") == "tool":
                j += 1
            rounds.append((i, j))
            i = j
        else:
            i += 1
    return rounds


def discard_rounds(messages: Sequence[Mapping[str, Any]], share: float) -> list[dict[str, Any]]:
    """Drop the oldest `ceil(share * rounds)` tool-call rounds (share 1.0: Discard-all; 0.75: Discard-75%)."""
    rounds = tool_rounds(messages)
    drop = rounds[: math.ceil(share * len(rounds))]
    gone = {k for a, b in drop for k in range(a, b)}
    return [dict(m) for i, m in enumerate(messages) if i not in gone]


# ------------------------------------------------------------------------------------ argument checks

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def schema_errors(schema: Mapping[str, Any], value: Any, where: str = "arguments") -> list[str]:
    """What is wrong with `value` under a JSON schema, for the keywords tool schemas use: type (one or a
    list), enum, properties, required, additionalProperties (false or a schema), items. [] = valid."""
    errs: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        unknown = [k for k in kinds if k not in _TYPES]
        if unknown:
            return [f"{where}: the schema uses unknown type(s) {unknown}"]
        if not any(_TYPES[k](value) for k in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{where}: missing required property {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += schema_errors(props[k], v, f"{where}.{k}")
            elif extra is False:
                errs.append(f"{where}: unknown property {k!r}")
            elif isinstance(extra, Mapping):
                errs += schema_errors(extra, v, f"{where}.{k}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, v in enumerate(value):
            errs += schema_errors(schema["items"], v, f"{where}[{i}]")
    return errs


def call_errors(tools: Sequence[Mapping[str, Any]], call: Mapping[str, Any]) -> list[str]:
    """Why a tool call is not valid (unknown function, arguments not a JSON object, schema violations)."""
    fn = call.get("function", call)
    by_name = {t.get("function", t)["name"]: t.get("function", t) for t in tools}
    name = fn.get("name")
    if name not in by_name:
        return [f"unknown function {name!r}"]
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            return [f"arguments are not valid JSON ({e})"]
    if args is None:
        args = {}
    return schema_errors(by_name[name].get("parameters") or {"type": "object"}, args)


# ------------------------------------------------------------------------------------------- tools


class EnvTools:
    """A synthesized environment's tools (`tools.py`, untrusted) served from one sandboxed interpreter that
    lives for the trajectory: the environment directory is mounted read-only and each call is one notebook
    cell, so a call costs a pipe round trip rather than a sandbox start."""

    def __init__(self, env_dir: str | Path, *, unsafe: bool = False, timeout: float = 30.0, memory_mb: int = 1024):
        self.env_dir = Path(env_dir).resolve()
        meta = json.loads((self.env_dir / "env.json").read_text(encoding="utf-8"))
        self.meta = meta
        self.schemas: list[dict] = list(meta["tools"])
        self.submit: dict = meta.get("submit_tool") or SUBMIT_TOOL
        self.names = {s["function"]["name"] for s in self.schemas}
        self.scratch = Path(tempfile.mkdtemp(prefix="dsv32-envtools-"))
        uid = None if unsafe else sandbox_uid()
        hand_over(self.scratch, uid)
        self.session = NotebookSession(self.scratch, ro_paths=[self.env_dir], timeout=timeout, memory_mb=memory_mb,
                                       unsafe=unsafe, uid=uid)
        self._loaded = False

    def call(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        if name not in self.names or not name.isidentifier():
            return ToolResult(False, f"Error: unknown tool {name!r}")
        if not self._loaded:
            r = self.session.execute(f"import json, sys\nsys.path.insert(0, {str(self.env_dir)!r})\n"
                                     "import tools as _env_tools\n")
            if not r.ok:
                return ToolResult(False, f"Error: the environment's tools did not load: {r.error}")
            self._loaded = True
        cell = (f"print(json.dumps(_env_tools.{name}(**json.loads({json.dumps(dict(arguments))!r})), "
                "ensure_ascii=False, default=str))")
        r = self.session.execute(cell)
        if r.restarted:
            self._loaded = False
        if not r.ok:
            lines = [s for s in (r.error or "").strip().splitlines() if s.strip()]
            return ToolResult(False, f"Error: {lines[-1] if lines else 'the tool failed'}")
        return ToolResult(True, r.output.strip())

    def close(self) -> None:
        self.session.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


class ToolRuntime:
    """What one trajectory may call: an environment's tools and its submit tool, plus (optionally) the
    general tools of a `Toolbox` (python, bash, files, search, calculator). `call` never raises."""

    def __init__(self, env: EnvTools | None = None, toolbox: Toolbox | None = None):
        self.env, self.toolbox = env, toolbox
        env_names = env.names | {env.submit["function"]["name"]} if env is not None else set()
        clash = env_names & set(toolbox.names if toolbox is not None else ())
        if clash:
            raise ValueError(f"tool name(s) {sorted(clash)} defined by both the environment and the toolbox")

    def schemas(self) -> list[dict]:
        out: list[dict] = []
        if self.env is not None:
            out += [*self.env.schemas, self.env.submit]
        if self.toolbox is not None:
            out += self.toolbox.schemas()
        return out

    @property
    def submit_name(self) -> str | None:
        return self.env.submit["function"]["name"] if self.env is not None else None

    def call(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        if name == self.submit_name:
            return ToolResult(True, "Answer submitted.")
        if self.env is not None and name in self.env.names:
            return self.env.call(name, arguments)
        if self.toolbox is not None and name in self.toolbox.names:
            return self.toolbox.call(name, dict(arguments))
        return ToolResult(False, f"Error: unknown tool {name!r}; available: "
                                 f"{', '.join(s['function']['name'] for s in self.schemas())}")

    def new_thinking_span(self) -> None:
        if self.toolbox is not None:
            self.toolbox.new_thinking_span()

    def close(self) -> None:
        for part in (self.env, self.toolbox):
            if part is not None:
                part.close()


# ------------------------------------------------------------------------------------------- backends


@dataclass
class Reply:
    """One model turn. `message` is OpenAI-shaped (role, content, reasoning_content, tool_calls); a completion
    that does not parse keeps its text as content and says why in `parse_error`."""

    message: dict[str, Any]
    finish_reason: str
    completion_tokens: int
    parse_error: str | None = None


class ContextExceeded(Exception):
    """The endpoint refused the prompt as too long for its context."""


@dataclass
class TokenTrace:
    """The in-process trajectory as the model saw it (module docstring). Routes are per MoE layer and per
    position, each taken from the request that first computed that position: the prompt prefill for prompt
    and tool-output positions, the decode steps for sampled ones (what a prefix cache would have held)."""

    ids: list[int]
    prompt_len: int
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kept: list[torch.Tensor | None] = field(default_factory=list)
    routes: list[list[torch.Tensor]] | None = None  # per layer: chunks of [n, K] rows, concatenated at the end
    routed: int = 0  # positions whose routes are recorded
    truncates: bool = False
    rewritten: bool = False  # context management re-encoded the conversation: no longer one append-only record

    def append(self, ids: Sequence[int], *, sampled: bool, logprobs: Sequence[float] = (),
               kept: Sequence[torch.Tensor | None] = ()) -> None:
        self.ids += list(ids)
        self.mask += [int(sampled)] * len(ids)
        self.logprobs += list(logprobs) if sampled else [0.0] * len(ids)
        self.kept += [k.long() if k is not None else None for k in kept] if sampled else [None] * len(ids)


class EngineBackend:
    """The model in-process through `Engine` (module docstring). `prepare` brings the token trace up to date
    with the conversation (appending only tool results; anything else re-encodes and marks the trace
    rewritten); `complete` samples one turn onto it.

    logits_mask: per turn, an optional factory of an engine `LogitsMask` (a grammar, say) that constrains what
    the turn may sample. The engine's log-probabilities and kept sets then describe the constrained
    distribution, so RL's Keep Sampling Mask trains on the same action subspace the sampler used.
    """

    def __init__(self, engine: Engine, tokenizer: Any, *, family: str = "deepseek-v3.2",
                 logits_mask: Callable[[int], Callable[[], LogitsMask] | None] | None = None):
        self.engine, self.tok, self.family = engine, tokenizer, chat._family(family)
        self.logits_mask = logits_mask
        stop = [tokenizer.token_to_id(chat.IM_END)] if self.family == "chatml" else []
        self.stop_ids = tuple(t for t in [*stop, tokenizer.eos_id] if t is not None)
        self.window = engine.max_len
        self.trace: TokenTrace | None = None
        self._covered: list[dict[str, Any]] = []  # the messages the trace holds
        self._tools: list[dict] | None = None

    @property
    def moe(self) -> bool:
        return bool(getattr(getattr(self.engine.model, "config", None), "n_routed_experts", 0))

    def _encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                thinking: bool) -> list[chat.Segment]:
        return chat.render_chat(messages, tools=tools or None, thinking=thinking, family=self.family)

    def prepare(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                thinking: bool) -> int:
        """Sync the trace with `messages`; returns the context length in tokens."""
        msgs = [dict(m) for m in messages]
        n = len(self._covered)
        tail = msgs[n:]
        appendable = (self.trace is not None and msgs[:n] == self._covered and tools == self._tools
                      and all(m.get("role") == "tool" for m in tail))
        if appendable and tail:
            segs = self._encode(msgs, tools, thinking)
            last = max(i for i, (_, by_assistant) in enumerate(segs) if by_assistant)
            text = "".join(t for t, _ in segs[last + 1:])
            self.trace.append(self.tok.encode(text), sampled=False)  # type: ignore[union-attr]
        elif not appendable:
            ids = [i for piece in self.tok.encode_batch([t for t, _ in self._encode(msgs, tools, thinking)])
                   for i in piece]
            rewritten = self.trace is not None
            self.trace = TokenTrace(list(ids), prompt_len=len(ids), rewritten=rewritten)
        self._covered, self._tools = msgs, None if tools is None else list(tools)
        return len(self.trace.ids)  # type: ignore[union-attr]

    def complete(self, cfg: AgentConfig, turn: int, thinking: bool) -> Reply:
        tr = self.trace
        assert tr is not None, "prepare() first"
        keep_routes = self.moe if cfg.keep_routes is None else cfg.keep_routes
        params = SamplingParams(
            max_tokens=max(1, min(cfg.max_tokens, self.window - len(tr.ids))), temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, seed=turn_seed(cfg.seed, turn), stop_token_ids=self.stop_ids,
            return_allowed=True, return_routes=keep_routes,
            logits_mask=self.logits_mask(turn) if self.logits_mask is not None else None)
        res = self.engine.generate(tr.ids, params)
        if res.error is not None:
            raise RuntimeError(f"agent turn {turn}: the engine failed: {res.error}")
        seq = res.sequences[0]
        # a kept set exists wherever the sampler removed ids (top-k/top-p, or a logits mask at the steps it cut)
        tr.truncates = tr.truncates or any(a is not None for a in seq.allowed)
        if keep_routes and res.prompt_routes is not None:
            P = len(tr.ids)
            if tr.routes is None:
                tr.routes = [[] for _ in res.prompt_routes]
            fed = seq.routes[1:]  # positions P .. P+C-2 (token 0 was sampled from the last prompt position)
            for layer, pr in enumerate(res.prompt_routes):
                tr.routes[layer].append(pr[tr.routed:P].long())
                if fed:
                    tr.routes[layer].append(torch.stack([r[layer] for r in fed]).long())
            tr.routed = P + len(seq.tokens) - 1
        tr.append(seq.tokens, sampled=True, logprobs=seq.logprobs, kept=seq.allowed)
        text = self.tok.decode(seq.tokens)
        try:
            msg = chat.parse_completion(text, thinking=thinking, family=self.family)
            err = None
        except chat.ChatFormatError as e:
            msg = chat.ChatView(thinking=thinking, family=self.family).message(text)
            err = str(e)
        msg = {k: v for k, v in msg.items() if v not in (None, [])}
        msg.setdefault("content", "")
        self._covered.append(msg)
        return Reply(msg, seq.finish_reason or "stop", len(seq.tokens), err)

    def context_tokens(self) -> int:
        return len(self.trace.ids) if self.trace is not None else 0

    def rollout(self) -> Rollout:
        """The trajectory as one RL record (reward and verdict are the caller's)."""
        tr = self.trace
        if tr is None:
            raise ValueError("no trajectory yet")
        if tr.rewritten:
            raise ValueError("context management rewrote this trajectory; it is not one append-only rollout "
                             "(context management is evaluation-only)")
        P = tr.prompt_len
        # tool output appended after the last sampled token (a trajectory stopped by the context limit) was
        # never fed to the model: it has no routes and nothing to train, so the record ends at that token
        end = max((i + 1 for i, m in enumerate(tr.mask) if m), default=0)
        routes = None
        if tr.routes is not None:
            routes = [torch.cat(chunks)[: P + end - 1] for chunks in tr.routes]
        return Rollout(prompt_ids=tr.ids[:P], completion_ids=tr.ids[P:P + end], token_mask=tr.mask[:end],
                       logprobs=tr.logprobs[:end], kept=tr.kept[:end] if tr.truncates else None, routes=routes)


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (the official `openai` client). Thinking is requested DeepSeek's way
    (`thinking: {"type": "enabled"}`) and reasoning read from `reasoning_content`; the retention rule is
    applied to every request (`request_messages`). The context size is the last reply's `usage.total_tokens`
    plus an estimate (4 characters a token) for what was added since."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0):
        import openai  # optional dependency (the serve extra); only this backend needs it

        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=1)
        try:  # the served model's name (when not given) and its context length (when the server says)
            cards = list(self.client.models.list())
        except openai.APIError:
            cards = []
        if model is None:
            if not cards:
                raise ValueError(f"{base_url}: no model name given and the endpoint lists none")
            model = cards[0].id
        self.model = model
        card = next((c for c in cards if c.id == model), None)
        extra = (card.model_extra or {}) if card is not None else {}
        self.window: int | None = extra.get("max_model_len")
        self._messages: list[dict[str, Any]] = []
        self._tools: list[dict] | None = None
        self._used = 0
        self._counted = 0  # messages already inside `_used`

    def prepare(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                thinking: bool) -> int:
        msgs = [dict(m) for m in messages]
        if msgs[: self._counted] != self._messages[: self._counted]:
            self._used = self._counted = 0  # rewritten: estimate from scratch
        new = msgs[self._counted:]
        extra = sum(len(json.dumps(m, ensure_ascii=False)) for m in new) // 4
        if self._counted == 0 and tools:
            extra += len(json.dumps(list(tools))) // 4
        self._messages, self._tools = msgs, list(tools) if tools else None
        return self._used + extra

    def complete(self, cfg: AgentConfig, turn: int, thinking: bool) -> Reply:
        kw: dict[str, Any] = {"model": self.model, "messages": request_messages(self._messages),
                              "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                              "seed": turn_seed(cfg.seed, turn) % 2**31}
        if cfg.top_p < 1:
            kw["top_p"] = cfg.top_p
        if self._tools:
            kw["tools"] = self._tools
        extra: dict[str, Any] = {}
        if thinking:
            extra["thinking"] = {"type": "enabled"}
        if cfg.top_k:
            extra["top_k"] = cfg.top_k
        try:
            resp = self.client.chat.completions.create(**kw, extra_body=extra or None)
        except self._openai.BadRequestError as e:
            if "context" in str(e).lower() or "too long" in str(e).lower() or "tokens" in str(e).lower():
                raise ContextExceeded(str(e)) from e
            raise
        choice = resp.choices[0]
        m = choice.message
        msg: dict[str, Any] = {"role": "assistant", "content": m.content or ""}
        reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content")
        if reasoning:
            msg["reasoning_content"] = reasoning
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        self._messages.append(msg)
        usage = resp.usage
        self._used = usage.total_tokens if usage is not None else self._used
        self._counted = len(self._messages)
        n = usage.completion_tokens if usage is not None else 0
        return Reply(msg, choice.finish_reason or "stop", n)

    def context_tokens(self) -> int:
        return self._used


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class Trajectory:
    """What happened: the full conversation (reasoning included), per-call records, the answer and its score.

    calls: one dict per attempted tool call {turn, name, arguments, valid, errors, ok, result}.
    stop: "submit" (the submit tool), "answer" (a reply without calls), "max_turns", "length" (a turn hit
        max_tokens), "context" (the window is full), "malformed" (a completion that did not parse).
    """

    task_id: str | None
    messages: list[dict[str, Any]]
    calls: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    completion_tokens: int = 0
    context_tokens: int = 0
    malformed: int = 0
    context_events: list[dict[str, Any]] = field(default_factory=list)
    answer: Any = None
    answered: bool = False
    stop: str = ""
    verdict: str | None = None
    reason: str = ""
    reward: float = 0.0
    rollout: Rollout | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task_id, "verdict": self.verdict, "reward": self.reward, "answer": self.answer,
                "stop": self.stop, "reason": self.reason, "turns": self.turns, "calls": self.calls,
                "malformed": self.malformed, "completion_tokens": self.completion_tokens,
                "context_tokens": self.context_tokens, "context_events": self.context_events,
                "messages": self.messages}


def _answer_from_text(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_agent(backend: EngineBackend | OpenAIBackend, runtime: ToolRuntime, prompt: str, cfg: AgentConfig, *,
              task_id: str | None = None, on_event: Callable[[str, Any], None] | None = None) -> Trajectory:
    """Run one trajectory: model turn, tool calls, tool results, ... until an answer or a limit."""
    emit = on_event or (lambda kind, value: None)
    if isinstance(backend, EngineBackend) and backend.family == "chatml" and cfg.thinking:
        raise ValueError("ChatML models have no thinking mode; set thinking=False")
    messages: list[dict[str, Any]] = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
    messages.append({"role": "user", "content": prompt})
    traj = Trajectory(task_id, messages)
    tools = runtime.schemas()
    window = min(w for w in (cfg.context, backend.window) if w) if cfg.context or backend.window else None
    for turn in range(cfg.max_turns):
        used = backend.prepare(messages, tools, cfg.thinking)
        if window and cfg.context_strategy != "none" and used > cfg.context_share * window:
            messages[:] = _manage_context(backend, messages, tools, cfg, turn, traj, emit)
            used = backend.prepare(messages, tools, cfg.thinking)
        if window and used >= window - 1:
            traj.stop = "context"
            break
        emit("turn", turn)
        try:
            reply = backend.complete(cfg, turn, cfg.thinking)
        except ContextExceeded as e:
            traj.stop, traj.reason = "context", str(e)
            break
        traj.turns += 1
        traj.completion_tokens += reply.completion_tokens
        msg = reply.message
        messages.append(msg)
        if msg.get("reasoning_content"):
            emit("reasoning", msg["reasoning_content"])
        if msg.get("content"):
            emit("content", msg["content"])
        if reply.finish_reason == "length":
            traj.stop = "length"
            break
        if reply.parse_error is not None:
            traj.malformed += 1
            traj.stop, traj.reason = "malformed", reply.parse_error
            emit("error", f"the completion did not parse: {reply.parse_error}")
            break
        calls = msg.get("tool_calls") or []
        if not calls:
            traj.stop, traj.answer, traj.answered = "answer", _answer_from_text(msg.get("content", "")), True
            break
        for call in calls:
            fn = call["function"]
            errors = call_errors(tools, call)
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = None
            emit("call", {"name": fn["name"], "arguments": args if args is not None else fn.get("arguments")})
            if errors:
                result = ToolResult(False, "Error: invalid call: " + "; ".join(errors))
            else:
                result = runtime.call(fn["name"], args or {})
                if fn["name"] == runtime.submit_name:
                    traj.answer, traj.answered = (args or {}).get("answer"), True
                    traj.stop = "submit"
            emit("result", {"name": fn["name"], "ok": result.ok, "content": result.content})
            traj.calls.append({"turn": turn, "name": fn["name"], "arguments": fn.get("arguments"),
                               "valid": not errors, "errors": errors, "ok": result.ok})
            messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result.content})
        if traj.stop:
            break
    else:
        traj.stop = "max_turns"
    runtime.new_thinking_span()
    traj.context_tokens = backend.context_tokens()
    if isinstance(backend, EngineBackend) and not backend.trace.rewritten:  # type: ignore[union-attr]
        traj.rollout = backend.rollout()
    return traj


def _manage_context(backend: EngineBackend | OpenAIBackend, messages: list[dict[str, Any]], tools: list[dict],
                    cfg: AgentConfig, turn: int, traj: Trajectory,
                    emit: Callable[[str, Any], None]) -> list[dict[str, Any]]:
    """Apply the configured §4.4 strategy to a conversation past `context_share` of the window."""
    before = len(messages)
    if cfg.context_strategy in ("discard-all", "discard-75"):
        out = discard_rounds(messages, 1.0 if cfg.context_strategy == "discard-all" else 0.75)
    else:  # summary: the model summarises (no tools offered), then the task restarts from the summary
        ask = [*messages, {"role": "user", "content": SUMMARY_PROMPT}]
        backend.prepare(ask, None, cfg.thinking)
        reply = backend.complete(cfg, 10_000 + turn, cfg.thinking)
        traj.completion_tokens += reply.completion_tokens
        summary = reply.message.get("content", "").strip()
        head = [m for m in messages if m["role"] == "system"]
        task = next(m for m in messages if m["role"] == "user")
        out = [*head, {"role": "user", "content": f"{task['content']}\n\nYour progress so far (a summary of your "
                                                  f"earlier work on this task):\n{summary}"}]
    traj.context_events.append({"turn": turn, "strategy": cfg.context_strategy, "messages_before": before,
                                "messages_after": len(out)})
    emit("context", f"{cfg.context_strategy}: {before} -> {len(out)} messages")
    return out


# ------------------------------------------------------------------------------------------- environments


def load_task(env_dir: str | Path, task_id: str | None = None) -> dict[str, Any]:
    """A task of an environment directory by id (None: the first)."""
    tasks = read_tasks(Path(env_dir))
    if not tasks:
        raise ValueError(f"{env_dir}: tasks.jsonl holds no tasks")
    if task_id is None:
        return tasks[0]
    for t in tasks:
        if t["id"] == task_id:
            return t
    raise KeyError(f"{env_dir}: no task {task_id!r} (ids: {', '.join(t['id'] for t in tasks[:10])} ...)")


def score(env_dir: str | Path, task: Mapping[str, Any], traj: Trajectory, *, unsafe: bool = False) -> None:
    """Run the task's verifier on the trajectory's answer inside the sandbox; sets verdict/reward/reason."""
    score_many(env_dir, [(task, traj)], unsafe=unsafe)


def score_many(env_dir: str | Path, pairs: Sequence[tuple[Mapping[str, Any], Trajectory]], *,
               unsafe: bool = False) -> None:
    """`score` for many (task, trajectory) pairs of one environment: one sandboxed verifier process for all of
    them (an RL step verifies a whole group at once)."""
    jobs, todo = [], []
    for k, (task, traj) in enumerate(pairs):
        if not traj.answered or traj.answer in (None, "", [], {}):
            traj.verdict, traj.reward, traj.reason = "no_answer", 0.0, traj.reason or f"stopped: {traj.stop}"
        else:
            jobs.append({"op": "verify", "id": f"{k}:{task['id']}", "verifier": task["verifier"],
                         "answer": traj.answer})
            todo.append(traj)
    for traj, out in zip(todo, run_jobs(Path(env_dir), jobs, unsafe=unsafe) if jobs else []):
        if "fatal" in out:
            traj.verdict, traj.reward, traj.reason = "error", 0.0, str(out["fatal"])[-500:]
        else:
            ok = bool(out.get("ok"))
            traj.verdict, traj.reward, traj.reason = ("correct" if ok else "wrong"), float(ok), str(out.get("reason"))
    for task, traj in pairs:
        if traj.rollout is not None:
            traj.rollout.reward, traj.rollout.verdict, traj.rollout.task = traj.reward, traj.verdict, task["id"]


def run_env_task(backend: EngineBackend | OpenAIBackend, env_dir: str | Path, task: Mapping[str, Any],
                 cfg: AgentConfig, *, toolbox_tools: Sequence[str] = (), unsafe: bool = False,
                 on_event: Callable[[str, Any], None] | None = None, verify: bool = True) -> Trajectory:
    """One task of a synthesized environment, end to end: tools in the sandbox, the loop, the verifier
    (``verify=False``: the caller scores it later, e.g. a whole RL group with `score_many`)."""
    env = EnvTools(env_dir, unsafe=unsafe)
    box = Toolbox(tools=list(toolbox_tools), unsafe=unsafe) if toolbox_tools else None
    runtime = ToolRuntime(env, box)
    try:
        traj = run_agent(backend, runtime, task["prompt"], cfg, task_id=task["id"], on_event=on_event)
    finally:
        runtime.close()
    if verify:
        score(env_dir, task, traj, unsafe=unsafe)
    if traj.rollout is not None:
        ro = traj.rollout
        ro.temperature, ro.top_p, ro.top_k, ro.max_tokens, ro.seed = (
            cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_tokens, cfg.seed)
        ro.finish_reason = traj.stop
        ro.meta = {"env": str(env_dir), "turns": traj.turns, "tool_calls": len(traj.calls)}
    return traj
