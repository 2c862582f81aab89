"use strict";
// The chat page: conversations, streamed replies, documents, memory panel.

const $ = (id) => document.getElementById(id);
let info = null;     // /api/info
let current = null;  // the open conversation
let busy = false;

async function failure(response) {
  const data = await response.json().catch(() => ({}));
  return new Error(data.error ? data.error.message : `HTTP ${response.status}`);
}

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST and read the server-sent events of the reply (EventSource cannot POST).
async function postEvents(path, body, handlers) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && handlers[event]) handlers[event](JSON.parse(data));
    }
  }
}

function fmtBytes(n) {
  const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, size] of units) if (Math.abs(n) >= size) return `${(n / size).toFixed(2)} ${unit}`;
  return `${n} B`;
}

function setStatus(text) { $("status").textContent = text || ""; }

function showNotice(text, kind = "warn") {
  const notice = $("notice");
  notice.hidden = !text;
  notice.textContent = text || "";
  notice.className = kind;
}

function setBusy(value, status) {
  busy = value;
  const open = current !== null;
  for (const id of ["send", "add-doc", "prompt"]) $(id).disabled = busy || !open;
  for (const id of ["rename", "delete"]) $(id).disabled = busy || !open;
  $("new-conv").disabled = busy;
  if (status !== undefined) setStatus(status);
}

function messageElement(m) {
  const div = document.createElement("div");
  if (m.document) {
    div.className = "msg document";
    div.textContent = `Document: ${m.document.name} (${m.document.chars.toLocaleString()} characters)`;
  } else {
    div.className = `msg ${m.role}`;
    div.textContent = m.content;
  }
  return div;
}

function append(element) {
  const box = $("messages");
  box.append(element);
  box.scrollTop = box.scrollHeight;
  return element;
}

function renderMemory(mem) {
  const ids = ["mem-tokens", "mem-bytes", "mem-fp16", "mem-left", "mem-room", "mem-where", "mem-scheme"];
  if (!mem) {
    for (const id of ids) $(id).textContent = "–";
    return;
  }
  $("mem-tokens").textContent = mem.tokens.toLocaleString();
  $("mem-bytes").textContent = fmtBytes(mem.cache_bytes);
  $("mem-fp16").textContent = fmtBytes(mem.fp16_bytes) +
    (mem.cache_bytes ? ` (${(mem.fp16_bytes / mem.cache_bytes).toFixed(2)}× the cache)` : "");
  $("mem-left").textContent = `${fmtBytes(mem.budget_left)} of ${fmtBytes(mem.budget)} ` +
    `(weights ${fmtBytes(mem.weights)}, caches in memory ${fmtBytes(mem.resident_bytes)})`;
  $("mem-room").textContent = `${mem.tokens_left.toLocaleString()} more tokens ` +
    `(${mem.max_tokens.toLocaleString()} fit: ${mem.limited_by})`;
  $("mem-where").textContent = mem.resident ? "in memory" : mem.tokens ? "parked on disk" : "empty";
  $("mem-scheme").textContent = `${mem.spec}: ${mem.scheme}`;
  // Sharded over several ranks: each rank's share of this cache and its peak.
  const ranks = mem.ranks || [];
  $("mem-ranks-label").hidden = $("mem-ranks").hidden = !ranks.length;
  $("mem-ranks").replaceChildren(...ranks.map((r) => {
    const line = document.createElement("div");
    line.textContent = `rank ${r.rank} (${r.what}): ${fmtBytes(r.nbytes)}, peak ${fmtBytes(r.peak)}`;
    return line;
  }));
  if (mem.note) showNotice(mem.note);
}

function renderConversation(memory) {
  $("title").textContent = current ? current.title : "No conversation";
  $("conv-id").textContent = current ? current.id : "";
  $("messages").replaceChildren(...(current ? current.messages.map(messageElement) : []));
  $("messages").scrollTop = $("messages").scrollHeight;
  showNotice(memory ? memory.note : "");
  renderMemory(memory);
  setBusy(false);
}

async function loadList() {
  const { conversations } = await api("GET", "/api/conversations");
  const mine = current && conversations.find((c) => c.id === current.id);
  if (mine) $("title").textContent = current.title = mine.title;  // named after its first message
  $("conv-list").replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.textContent = c.title;
    li.title = `${c.title} (${c.messages} messages)`;
    li.classList.toggle("active", current !== null && c.id === current.id);
    li.addEventListener("click", () => { if (!busy) openConversation(c.id); });
    return li;
  }));
  return conversations;
}

async function openConversation(id) {
  const data = await api("GET", `/api/conversations/${encodeURIComponent(id)}`);
  current = data.conversation;
  renderConversation(data.memory);
  setStatus("");
  await loadList();
}

async function refresh() {
  if (current) await openConversation(current.id);
  else await loadList();
}

async function run(action) {
  try {
    await action();
  } catch (e) {
    showNotice(e.message, "error");
  }
}

async function newConversation() {
  const { conversation } = await api("POST", "/api/conversations", {});
  await openConversation(conversation.id);
  $("prompt").focus();
}

function startRename() {
  const input = $("title-input");
  input.value = current.title;
  $("title").hidden = true;
  input.hidden = false;
  input.focus();
  input.select();
}

async function finishRename(save) {
  const input = $("title-input");
  if (input.hidden) return;
  input.hidden = true;
  $("title").hidden = false;
  const title = input.value.trim();
  if (save && title && title !== current.title) {
    await api("PATCH", `/api/conversations/${current.id}`, { title });
    await refresh();
  }
}

async function deleteConversation() {
  if (!confirm(`Delete "${current.title}" with its messages and cache?`)) return;
  await api("DELETE", `/api/conversations/${current.id}`);
  current = null;
  const rest = await loadList();
  if (rest.length) await openConversation(rest[0].id);
  else renderConversation(null);
}

// Runs a streamed job; `start`..`done` update `view`; a refusal undoes `view`.
async function stream(path, body, view, onText) {
  setBusy(true, "waiting for the model…");
  let failed = false;
  try {
    await postEvents(path, body, {
      start: (d) => {
        showNotice(d.notice);
        setStatus(`${d.cached_tokens.toLocaleString()} of ${d.prompt_tokens.toLocaleString()} prompt tokens from the cache`);
      },
      progress: (d) => setStatus(`prefill ${d.done.toLocaleString()} / ${d.total.toLocaleString()} tokens`),
      text: onText,
      done: (d) => {
        renderMemory(d.memory);
        const cached = d.usage ? d.usage.cached_tokens : d.cached_tokens;
        const made = d.usage ? `${d.usage.completion_tokens} tokens generated, first after ` +
          `${d.first_token_s.toFixed(2)} s; ` : "";
        setStatus(`${made}${cached.toLocaleString()} prompt tokens were cached`);
      },
      error: (e) => { failed = true; showNotice(e.message, "error"); },
    });
  } catch (e) {
    failed = true;
    for (const element of view) element.remove();
    showNotice(e.message, "error");
  } finally {
    for (const element of view) element.classList.remove("streaming", "pending");
    setBusy(false);
  }
  if (!failed) await loadList();
  return !failed;
}

async function send(event) {
  event.preventDefault();
  const content = $("prompt").value.trim();
  if (!content || !current || busy) return;
  $("prompt").value = "";
  const question = append(messageElement({ role: "user", content }));
  const answer = append(messageElement({ role: "assistant", content: "" }));
  answer.classList.add("streaming");
  const ok = await stream(`/api/conversations/${current.id}/messages`, { content },
    [question, answer], (text) => {
      answer.textContent += text;
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  if (!ok && !question.isConnected) $("prompt").value = content;
}

async function readFile() {
  const file = $("doc-file").files[0];
  $("doc-error").hidden = true;
  if (!file) return;
  let problem = null;
  if (!/\.(txt|md)$/i.test(file.name)) problem = "Only .txt and .md files can be added.";
  else if (info && file.size > info.max_body_bytes) {
    problem = `${file.name} is ${fmtBytes(file.size)}; the server takes at most ${fmtBytes(info.max_body_bytes)}.`;
  }
  if (problem) {
    $("doc-error").textContent = problem;
    $("doc-error").hidden = false;
    $("doc-file").value = "";
    return;
  }
  $("doc-text").value = await file.text();
  $("doc-name").value = file.name;
}

async function addDocument(event) {
  if (event.submitter && event.submitter.value === "cancel") return;
  event.preventDefault();
  const name = $("doc-name").value.trim() || "pasted text";
  const text = $("doc-text").value;
  if (!text.trim()) {
    $("doc-error").textContent = "The document is empty.";
    $("doc-error").hidden = false;
    return;
  }
  $("doc-dialog").close();
  const element = append(messageElement({ role: "user", document: { name, chars: text.length } }));
  element.classList.add("pending");
  await stream(`/api/conversations/${current.id}/documents`, { name, text }, [element]);
}

function bind() {
  $("new-conv").addEventListener("click", () => run(newConversation));
  $("rename").addEventListener("click", startRename);
  $("title-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter") run(() => finishRename(true));
    if (e.key === "Escape") run(() => finishRename(false));
  });
  $("title-input").addEventListener("blur", () => run(() => finishRename(true)));
  $("delete").addEventListener("click", () => run(deleteConversation));
  $("composer").addEventListener("submit", (e) => run(() => send(e)));
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("add-doc").addEventListener("click", () => {
    $("doc-form").reset();
    $("doc-error").hidden = true;
    $("doc-dialog").showModal();
  });
  $("doc-file").addEventListener("change", () => run(readFile));
  $("doc-form").addEventListener("submit", (e) => run(() => addDocument(e)));
}

async function init() {
  bind();
  info = await api("GET", "/api/info");
  $("server-info").textContent = `${info.model} · KV ${info.spec} · budget ${fmtBytes(info.budget)}`;
  const conversations = await loadList();
  if (conversations.length) await openConversation(conversations[0].id);
  else renderConversation(null);
}

run(init);
