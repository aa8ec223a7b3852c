// alpaca-local chat page: plain JavaScript, no framework, no network beyond this server.
// It talks to the server's own /v1/chat/completions (streamed, SSE), so the Alpaca template
// lives only in the server; "Show the exact prompt" asks the server (/alpaca/prompt) for the
// text it would send. Model text is never parsed as HTML: every node is built with
// createElement/textContent (the server's Content-Security-Policy also forbids inline script).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  conversation: $("conversation"), status: $("status"), model: $("model"), form: $("composer"),
  instruction: $("instruction"), input: $("input"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  keyBox: $("key-box"), apiKey: $("api-key"), send: $("send"), stop: $("stop"), clear: $("clear"),
  showPrompt: $("show-prompt"), hidePrompt: $("hide-prompt"), promptView: $("prompt-view"),
  promptText: $("prompt-text"), promptTokens: $("prompt-tokens"),
};
const turns = []; // finished turns: {instruction, input, response}, sent as history
let controller = null; // AbortController of the answer being streamed
let epoch = 0; // bumped by New conversation: an answer from before it is not kept

// ---------------------------------------------------------------------------------------
// Safe Markdown: a small subset (paragraphs, headings, lists, code, bold, italics, links)
// turned into DOM nodes. Text only ever reaches the page through textContent / text nodes.
// ---------------------------------------------------------------------------------------

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|(\[[^\]\n]+\]\((https?:\/\/[^\s)]+)\))/g;

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) parent.appendChild(el("code", m[1].slice(1, -1)));
    else if (m[2]) parent.appendChild(el("strong", m[2].slice(2, -2)));
    else if (m[3]) parent.appendChild(el("em", m[3].slice(1, -1)));
    else {
      const link = el("a", m[4].slice(1, m[4].indexOf("](")));
      link.href = m[5]; // http(s) only, by the pattern: never javascript: or data:
      link.rel = "noopener noreferrer nofollow";
      link.target = "_blank";
      parent.appendChild(link);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  return parent;
}

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let para = [], list = null;
  const flushPara = () => {
    if (para.length) out.appendChild(inline(el("p"), para.join("\n")));
    para = [];
  };
  const flushList = () => { if (list) out.appendChild(list); list = null; };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if (line.startsWith("```")) { // fenced code, shown as typed (an unclosed fence runs to the end)
      flushPara(); flushList();
      const body = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) body.push(lines[i]);
      const pre = el("pre");
      pre.appendChild(el("code", body.join("\n")));
      out.appendChild(pre);
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara(); flushList();
      out.appendChild(inline(el("h" + Math.min(6, m[1].length + 2)), m[2]));
    } else if ((m = line.match(/^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/))) {
      flushPara();
      const tag = m[1] ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) { flushList(); list = el(tag); }
      list.appendChild(inline(el("li"), m[3]));
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out;
}

// ---------------------------------------------------------------------------------------
// Talking to the server
// ---------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function messages(instruction, input) {
  const list = [];
  for (const t of turns) {
    list.push(t.input ? { role: "user", content: t.instruction, input: t.input } : { role: "user", content: t.instruction });
    list.push({ role: "assistant", content: t.response });
  }
  list.push(input ? { role: "user", content: instruction, input } : { role: "user", content: instruction });
  return list;
}

// One line for a failed response: what happened and what to do.
async function explain(res) {
  let detail = "";
  try { detail = (await res.json()).error.message || ""; } catch (e) { /* not JSON */ }
  if (res.status === 401) {
    els.keyBox.hidden = false;
    return "This server needs an API key: enter it in the API key box and send again.";
  }
  if (res.status === 503) {
    const wait = res.headers.get("Retry-After");
    return "The server is busy (too many requests waiting)" + (wait ? "; try again in " + wait + " s." : ".");
  }
  if (res.status === 400 && /context/.test(detail)) return detail + " (New conversation starts afresh.)";
  return "The server refused the request (" + res.status + "): " + (detail || res.statusText);
}

const DOWN = "Cannot reach the server: is alpaca-local serve still running?";

function setStatus(text, error) {
  els.status.textContent = text;
  els.status.classList.toggle("error", Boolean(error));
}

async function refreshStatus() {
  try {
    const res = await fetch("alpaca/status", { headers: headers() });
    if (!res.ok) { setStatus(await explain(res), true); return; }
    const s = await res.json();
    els.model.textContent = s.model + " · context " + s.context;
    setStatus(s.queue.running || s.queue.waiting ? "busy: " + s.queue.waiting + " waiting" : "ready");
  } catch (e) {
    setStatus(DOWN, true);
  }
}

// Read an SSE body: call onData with each `data:` payload (pings and comments skipped).
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length && onData(data.join("\n")) === false) return;
    }
  }
}

// ---------------------------------------------------------------------------------------
// The conversation
// ---------------------------------------------------------------------------------------

function userBubble(instruction, input) {
  const box = el("div");
  box.className = "turn user";
  box.appendChild(el("div", "you"));
  box.lastChild.className = "who";
  const ins = el("div", instruction);
  ins.className = "field instruction";
  box.appendChild(ins);
  if (input) {
    const inp = el("div");
    inp.className = "field input";
    inp.appendChild(el("b", "Input: "));
    inp.appendChild(document.createTextNode(input));
    box.appendChild(inp);
  }
  return box;
}

function answerBubble() {
  const box = el("div");
  box.className = "turn assistant";
  box.appendChild(el("div", "model"));
  box.lastChild.className = "who";
  const answer = el("div");
  answer.className = "answer";
  const note = el("div", "waiting for the model…");
  note.className = "note";
  box.append(answer, note);
  return { box, answer, note };
}

function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.disabled = !busy;
}

async function send() {
  const instruction = els.instruction.value.trim();
  const input = els.input.value.trim();
  if (controller || !instruction) { if (!instruction) els.instruction.focus(); return; }
  const body = {
    messages: messages(instruction, input), stream: true,
    temperature: Number(els.temperature.value), max_tokens: Math.max(1, Math.floor(Number(els.maxTokens.value))),
  };
  const asked = userBubble(instruction, input);
  els.conversation.appendChild(asked);
  const bubble = answerBubble();
  els.conversation.appendChild(bubble.box);
  bubble.box.scrollIntoView({ block: "end" });
  controller = new AbortController();
  const mine = epoch;
  setBusy(true);
  setStatus("generating…");
  let text = "", finish = null, failed = null, answered = false;
  // The server answers once this request has the model; until then, say how long the line is.
  const line = setInterval(async () => {
    try {
      const r = await fetch("alpaca/status", { headers: headers() });
      const q = r.ok ? (await r.json()).queue : null;
      if (q && !answered) {
        bubble.note.textContent = "waiting for the model: " + q.waiting + (q.waiting === 1 ? " request" : " requests") +
          " in line, this one included";
      }
    } catch (e) { /* the answer's own request reports a server that is down */ }
  }, 1000);
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    answered = true;
    if (!res.ok) {
      failed = await explain(res);
    } else {
      bubble.note.textContent = "";
      await readEvents(res, (data) => {
        if (data === "[DONE]") return false;
        const chunk = JSON.parse(data);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return true;
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          bubble.box.dataset.raw = text; // the answer as the server sent it (the page shows it as Markdown)
          bubble.answer.replaceChildren(renderMarkdown(text));
          bubble.box.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        return true;
      });
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failed = text ? "The connection to the server was lost mid-answer." : DOWN;
  } finally {
    answered = true;
    clearInterval(line);
    controller = null;
    setBusy(false);
  }
  if (mine !== epoch) return;
  if (finish === "stopped" && !text) { // stopped before the first word: as if never sent
    asked.remove();
    bubble.box.remove();
    setStatus("stopped");
    return;
  }
  if (failed && !text) {
    bubble.box.classList.add("error");
    bubble.answer.replaceChildren(el("p", failed));
    bubble.note.textContent = "";
    setStatus(failed, true);
    return; // not part of the conversation: the instruction stays in the box to send again
  }
  bubble.note.textContent = finish === "stopped" ? "(stopped)" : finish === "length" ? "(max tokens reached)" : "";
  if (failed) bubble.note.textContent = failed;
  turns.push({ instruction, input, response: text });
  els.instruction.value = "";
  els.input.value = "";
  setStatus(failed ? failed : "ready", Boolean(failed));
  els.instruction.focus();
}

async function showPrompt() {
  const instruction = els.instruction.value.trim();
  if (!instruction) { setStatus("Type an instruction first: the prompt is built from it.", true); return; }
  try {
    const res = await fetch("alpaca/prompt", {
      method: "POST", headers: headers(), body: JSON.stringify({ messages: messages(instruction, els.input.value.trim()) }),
    });
    if (!res.ok) { setStatus(await explain(res), true); return; }
    const p = await res.json();
    els.promptText.textContent = p.prompt;
    els.promptTokens.textContent = "(" + p.tokens + " tokens of " + p.context + ")";
    els.promptView.hidden = false;
  } catch (e) {
    setStatus(DOWN, true);
  }
}

els.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
for (const box of [els.instruction, els.input]) {
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
}
els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
els.clear.addEventListener("click", () => {
  if (controller) controller.abort();
  epoch++;
  turns.length = 0;
  els.conversation.replaceChildren();
  els.promptView.hidden = true;
  setStatus("ready");
});
els.showPrompt.addEventListener("click", showPrompt);
els.hidePrompt.addEventListener("click", () => { els.promptView.hidden = true; });
els.apiKey.addEventListener("change", refreshStatus);
refreshStatus();
els.instruction.focus();
