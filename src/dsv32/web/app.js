// dsv32 chat page: plain JS, no build step. Streams /v1/chat/completions (SSE) and renders every piece of
// model output with textContent, never innerHTML, so nothing the model writes can become markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status");
  const state = { model: null, messages: [], controller: null, pendingCalls: [] };

  function setState(s, text) {
    document.body.dataset.state = s;
    if (text !== undefined) statusEl.textContent = text;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function bubble(role, text) {
    const div = el("div", "msg " + role);
    div.appendChild(el("span", "role", role));
    const body = el("div", "body", text || "");
    div.appendChild(body);
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return { div, body };
  }

  function assistantBubble() {
    const div = el("div", "msg assistant");
    div.appendChild(el("span", "role", "assistant"));
    const details = el("details", "reasoning");
    details.hidden = true;
    details.appendChild(el("summary", null, "Reasoning"));
    const reasoning = el("div", "text");
    details.appendChild(reasoning);
    const content = el("div", "content");
    const tools = el("div", "tool-calls");
    const meta = el("div", "meta");
    div.append(details, content, tools, meta);
    log.appendChild(div);
    return { div, details, reasoning, content, tools, meta };
  }

  function showToolCall(target, call) {
    const fn = call.function || {};
    target.appendChild(el("div", "tool-call", "tool call " + (call.id || "") + ": " + (fn.name || "?") +
      "(" + (fn.arguments || "") + ")"));
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      return "HTTP " + resp.status + ": " + ((body.error && body.error.message) || JSON.stringify(body));
    } catch (e) {
      return "HTTP " + resp.status;
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) { setState("idle", await errorText(resp)); return; }
      const body = await resp.json();
      state.model = body.data[0].id;
      $("model").textContent = state.model + " · " + (body.data[0].max_model_len || "?") + " tokens";
      setState("idle", "");
    } catch (e) {
      setState("idle", "cannot reach the server: " + e);
    }
  }

  function requestBody() {
    const msgs = [];
    const system = $("system").value.trim();
    if (system) msgs.push({ role: "system", content: system });
    msgs.push(...state.messages);
    const body = {
      model: state.model, messages: msgs, stream: true, stream_options: { include_usage: true },
      thinking: { type: $("thinking").checked ? "enabled" : "disabled" },
    };
    const t = parseFloat($("temperature").value);
    if (!Number.isNaN(t)) body.temperature = t;
    const m = parseInt($("max-tokens").value, 10);
    if (m > 0) body.max_tokens = m;
    const tools = $("tools").value.trim();
    if (tools) body.tools = JSON.parse(tools);
    return body;
  }

  // Reads an SSE stream and calls onEvent(obj) for every `data:` JSON payload.
  async function readSSE(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  async function send(text) {
    if (document.body.dataset.state === "streaming") return;
    if (!state.model) await loadModel();
    if (state.pendingCalls.length) {       // the user's text answers the assistant's tool call(s)
      const call = state.pendingCalls.shift();
      state.messages.push({ role: "tool", tool_call_id: call.id, content: text });
      bubble("tool", call.function.name + " → " + text);
      if (state.pendingCalls.length) {
        input.placeholder = "Result of " + state.pendingCalls[0].function.name;
        return;
      }
    } else {
      state.messages.push({ role: "user", content: text });
      bubble("user", text);
    }
    input.placeholder = "Message (Enter sends, Shift+Enter for a new line)";
    let body;
    try {
      body = requestBody();
    } catch (e) {
      setState("error", "tools: " + e.message);
      return;
    }
    const view = assistantBubble();
    const msg = { role: "assistant", content: "", reasoning_content: "", tool_calls: [] };
    let finish = null, usage = null, ok = false;
    state.controller = new AbortController();
    sendBtn.disabled = true; stopBtn.disabled = false;
    setState("streaming", "generating…");
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      await readSSE(resp, (ev) => {
        if (ev.usage) usage = ev.usage;
        for (const ch of ev.choices || []) {
          const d = ch.delta || {};
          if (d.reasoning_content) {
            view.details.hidden = false;
            msg.reasoning_content += d.reasoning_content;
            view.reasoning.textContent = msg.reasoning_content;
          }
          if (d.content) {
            msg.content += d.content;
            view.content.textContent = msg.content;
          }
          for (const call of d.tool_calls || []) {
            msg.tool_calls.push(call);
            showToolCall(view.tools, call);
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      });
      const parts = ["finish: " + (finish || "?")];
      if (usage) {
        parts.push(usage.prompt_tokens + " prompt tokens (" + ((usage.prompt_tokens_details || {}).cached_tokens || 0) +
          " cached)", usage.completion_tokens + " completion tokens");
      }
      view.meta.textContent = parts.join(" · ");
      ok = true;
      setState("idle", "");
    } catch (e) {
      view.div.classList.add("error");
      view.meta.textContent = e.name === "AbortError" ? "stopped" : String(e.message || e);
      setState(e.name === "AbortError" ? "idle" : "error", view.meta.textContent);
    } finally {
      state.controller = null;
      sendBtn.disabled = false; stopBtn.disabled = true;
    }
    if (!ok) { state.messages.pop(); return; }  // forget the failed turn so the user can retry it
    const stored = { role: "assistant", content: msg.content };
    if (msg.reasoning_content) stored.reasoning_content = msg.reasoning_content;
    if (msg.tool_calls.length) {
      stored.tool_calls = msg.tool_calls.map(({ id, type, function: fn }) => ({ id, type, function: fn }));
      state.pendingCalls = stored.tool_calls.slice();
      input.placeholder = "Result of " + state.pendingCalls[0].function.name;
    }
    state.messages.push(stored);
  }

  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
  });
  stopBtn.addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = []; state.pendingCalls = [];
    log.textContent = "";
    setState("idle", "");
  });
  $("api-key").addEventListener("change", loadModel);

  window.dsv32Chat = { send, state };  // used by the browser test (and handy from the console)
  loadModel();
})();
