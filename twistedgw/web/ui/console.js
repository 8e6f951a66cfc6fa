// The twistedgw browser console (served at /ui by the gateway; see README "Browser console").
// REST calls send the token as `Authorization: Bearer`, WebSockets as `?access_token=`
// (browsers cannot set headers on a WebSocket). The token lives in sessionStorage only.
import { Terminal } from "./vendor/xterm.mjs";
import { FitAddon } from "./vendor/addon-fit.mjs";

const TOKEN_KEY = "twistedgw.token";
const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();

// -- token and errors ------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function notice(text) {
  $("notice").textContent = text;
}

/** An API failure: `what` failed with an HTTP status and the gateway's JSON error. */
class APIFailure extends Error {
  constructor(what, status, body) {
    let detail = "";
    if (body && typeof body === "object") {
      detail = [body.error, body.message, body.entry && `entry ${body.entry}`]
        .filter(Boolean).join(": ");
    } else if (body) {
      detail = String(body).slice(0, 300);
    }
    let hint = "";
    if (status === 401) hint = " (enter a valid API token above)";
    super(`${what} failed: HTTP ${status}${detail ? ` - ${detail}` : ""}${hint}`);
    this.status = status;
  }
}

async function api(what, method, path, { json, body, headers = {}, raw = false } = {}) {
  const h = { ...headers };
  if (token()) h.Authorization = `Bearer ${token()}`;
  let payload = body;
  if (json !== undefined) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers: h, body: payload, cache: "no-store" });
  } catch (e) {
    throw new Error(`${what} failed: the gateway cannot be reached (${e.message})`);
  }
  if (!response.ok) {
    let answer = null;
    const text = await response.text();
    try { answer = JSON.parse(text); } catch { answer = text; }
    throw new APIFailure(what, response.status, answer);
  }
  if (raw) return response;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/**
 * Runs an action; any failure is shown in the error banner (and returned as null). A user's
 * action that succeeds clears the banner; a background refresh (`clear: false`) does not, so
 * an error stays until the user has seen it.
 */
async function guarded(action, { clear = true } = {}) {
  try {
    const value = await action();
    if (clear) clearError();
    return value;
  } catch (e) {
    showError(e.message);
    return null;
  }
}

function wsURL(sandboxId) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = token() ? `?access_token=${encodeURIComponent(token())}` : "";
  return `${scheme}://${location.host}/ws/${sandboxId}${query}`;
}

function time(epoch) {
  if (epoch === null || epoch === undefined) return "-";
  return new Date(epoch * 1000).toLocaleString();
}

function requestId(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return prefix + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function button(label, action, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  row.append(td);
  return td;
}

// -- one WebSocket to a sandbox, reconnected while wanted --------------------------------------

/** A WebSocket to /ws/{id}: JSON messages in and out, reconnects after a drop. */
class SandboxSocket {
  constructor(sandboxId, { onMessage, onOpen, onState }) {
    this.sandboxId = sandboxId;
    this.onMessage = onMessage;
    this.onOpen = onOpen;
    this.onState = onState;
    this.wanted = true;
    this.delay = 500;
    this.ws = null;
    this.connect();
  }

  connect() {
    this.onState("connecting");
    const ws = new WebSocket(wsURL(this.sandboxId));
    this.ws = ws;
    ws.onopen = () => {
      this.delay = 500;
      this.onState("connected");
      this.onOpen();
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      this.onMessage(message);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws || !this.wanted) return;
      if (event.code === 4000) {
        this.wanted = false;
        this.onState(`closed: ${event.reason || "sandbox removed"}`);
        showError(`Sandbox ${this.sandboxId}: ${event.reason || "removed"}`);
        return;
      }
      this.onState(`disconnected (${event.code}); reconnecting`);
      this.explain();
      setTimeout(() => { if (this.wanted) this.connect(); }, this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }

  /** A refused handshake has no readable status in a browser: ask REST why. */
  async explain() {
    try {
      await api("Opening the sandbox's WebSocket", "GET", `/sandboxes/${this.sandboxId}`);
    } catch (e) {
      showError(e.message);
      if (e.status === 404) this.close();
    }
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  close() {
    this.wanted = false;
    if (this.ws) this.ws.close(1000);
  }
}

// -- the terminal ------------------------------------------------------------------------------

/**
 * An xterm.js terminal showing one process: a new PTY (`start`) or an existing process
 * (`attach`, replayed from offset 0). Keystrokes go to the process as `stdin`, the window's
 * size as `resize`; after a dropped connection it re-attaches from the last offset it showed.
 */
class TerminalView {
  constructor(container) {
    this.term = new Terminal({ cursorBlink: true, scrollback: 10000, fontSize: 14 });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);
    this.term.open(container);
    this.fit.fit();
    this.socket = null;
    this.pid = null;
    this.rid = null;
    this.offsets = {};
    this.finished = false;
    this.term.onData((data) => this.input(data));
    this.term.onResize(({ cols, rows }) => this.resize(cols, rows));
    // Ctrl+Shift+C copies the selection (Ctrl+C goes to the process, as in a terminal);
    // pasting is the browser's own (Ctrl+Shift+V / Ctrl+V / middle click).
    this.term.attachCustomKeyEventHandler((event) => {
      if (event.type === "keydown" && event.ctrlKey && event.shiftKey && event.code === "KeyC") {
        const text = this.term.getSelection();
        if (text && navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
        return false;
      }
      return true;
    });
    this.onWindowResize = () => this.fit.fit();
    window.addEventListener("resize", this.onWindowResize);
  }

  /** Text of the terminal's buffer (what a person sees, scrollback included). */
  text() {
    const buffer = this.term.buffer.active;
    const lines = [];
    for (let i = 0; i < buffer.length; i++) {
      const line = buffer.getLine(i);
      if (line) lines.push(line.translateToString(true));
    }
    return lines.join("\n");
  }

  /** Starts a login shell on a new PTY in `sandboxId`. */
  start(sandboxId) {
    this.reset(sandboxId);
    this.rid = requestId("pty");
    this.first = () => this.socket.send({
      type: "pty", request_id: this.rid, cols: this.term.cols, rows: this.term.rows,
    });
    this.open(sandboxId);
  }

  /** Shows process `pid` of `sandboxId` from its first byte, then live. */
  attach(sandboxId, pid, rid, isPty) {
    this.reset(sandboxId);
    this.pid = pid;
    this.rid = rid || null;
    this.isPty = Boolean(isPty);
    this.first = () => this.sendAttach(true);
    this.open(sandboxId);
  }

  reset(sandboxId) {
    this.dispose();
    this.term.reset();
    this.sandboxId = sandboxId;
    this.pid = null;
    this.offsets = {};
    this.finished = false;
    this.isPty = true;
  }

  open(sandboxId) {
    this.fit.fit();
    let opened = false;
    this.socket = new SandboxSocket(sandboxId, {
      onOpen: () => {
        if (!opened) { opened = true; this.first(); } else if (!this.finished) this.sendAttach(false);
      },
      onMessage: (m) => this.received(m),
      onState: (state) => { $("terminal-state").textContent = state; },
    });
  }

  /** Attaches to the process: from its first byte, or after a drop from what was shown. */
  sendAttach(fromStart) {
    if (this.pid === null) return;
    // A PTY has one stream; a command's offsets are per stream.
    let since = this.isPty ? 0 : { stdout: 0, stderr: 0 };
    if (!fromStart) {
      since = this.offsets.pty !== undefined ? this.offsets.pty
        : { stdout: this.offsets.stdout || 0, stderr: this.offsets.stderr || 0 };
    }
    // No request_id: with one, attach names the process by both.
    this.socket.send({ type: "attach", pid: this.pid, since });
  }

  mine(m) {
    if (this.pid !== null && m.pid === this.pid) return true;
    // Errors about a message that had no usable request_id (a binary frame, say).
    if (m.type === "error" && (m.request_id === null || m.request_id === undefined)) return true;
    return this.rid !== null && m.request_id === this.rid;
  }

  received(m) {
    if (!this.mine(m)) return;
    switch (m.type) {
      case "started":
      case "attached":
        if (m.pid !== undefined) this.pid = m.pid;
        if (m.request_id) this.rid = m.request_id;
        if (m.type === "attached" && m.state === "exited") this.finished = true;
        // The window's size wins over whatever the PTY had.
        if (m.type === "attached") this.resize(this.term.cols, this.term.rows);
        break;
      case "resized":
        break;
      case "taken_over":
        notice(`Another client took over terminal ${m.pid}: watching only`);
        break;
      case "output": {
        const stream = m.stream || "stdout";
        const bytes = encoder.encode(m.data).length;
        const start = typeof m.offset === "number" ? m.offset : (this.offsets[stream] || 0);
        const seen = this.offsets[stream] || 0;
        if (start + bytes <= seen && bytes > 0) break; // already shown before a reconnect
        this.offsets[stream] = start + bytes;
        // Pipes carry bare newlines; a PTY already sends CR LF.
        this.term.write(stream === "pty" ? m.data : m.data.replace(/\r?\n/g, "\r\n"));
        break;
      }
      case "error":
        showError(`Terminal: ${m.error_code || "error"}: ${m.error || m.message || ""}`);
        break;
      default:
        if ("returncode" in m) {
          this.finished = true;
          this.term.write(`\r\n[process exited with code ${m.returncode}]\r\n`);
          $("terminal-state").textContent = "exited";
        }
    }
  }

  input(data) {
    if (this.rid === null || this.finished || !this.isPty) return;
    this.socket.send({ type: "stdin", request_id: this.rid, data });
  }

  resize(cols, rows) {
    if (this.pid === null || this.finished || !this.isPty || !this.socket) return;
    this.socket.send({ type: "resize", pid: this.pid, cols, rows });
  }

  dispose() {
    if (this.socket) this.socket.close();
    this.socket = null;
  }
}

// -- the page ----------------------------------------------------------------------------------

const state = { selected: null, terminal: null };

async function refreshSandboxes({ background = false } = {}) {
  const list = await guarded(
    () => api("Listing sandboxes", "GET", "/sandboxes?details=true"), { clear: !background });
  if (list === null) return;
  const body = $("sandboxes").tBodies[0];
  body.replaceChildren();
  $("sandboxes-empty").hidden = list.length > 0;
  for (const sb of list) {
    const row = document.createElement("tr");
    row.dataset.id = sb.sandbox_id;
    if (sb.sandbox_id === state.selected) row.classList.add("selected");
    const code = document.createElement("code");
    code.textContent = sb.sandbox_id;
    cell(row, code);
    cell(row, sb.paused ? `${sb.status} (paused)` : sb.status);
    cell(row, sb.template || "default");
    cell(row, time(sb.created_at));
    // The lifetime's end if it has one; else the idle rule (reset by use and Keep alive).
    if (sb.expires_at) cell(row, time(sb.expires_at));
    else cell(row, sb.idle_timeout ? `after ${Math.round(sb.idle_timeout)} s idle` : "-");
    const actions = cell(row, button("Open", "open", () => select(sb.sandbox_id)));
    actions.append(
      button("Keep alive", "keepalive", () => keepAlive(sb.sandbox_id)),
      button("Delete", "delete", () => remove(sb.sandbox_id)),
    );
    body.append(row);
  }
  if (state.selected && !list.some((sb) => sb.sandbox_id === state.selected)) deselect();
}

async function refreshTemplates() {
  const templates = await guarded(() => api("Listing templates", "GET", "/templates"));
  if (templates === null) return;
  const select = $("create-template");
  select.replaceChildren();
  for (const t of templates) {
    const option = document.createElement("option");
    option.value = t.name;
    option.textContent = t.present === false ? `${t.name} (image missing)` : t.name;
    select.append(option);
  }
}

async function create(event) {
  event.preventDefault();
  const options = {};
  const template = $("create-template").value;
  if (template) options.template = template;
  if ($("create-network").value) options.network = $("create-network").value;
  if ($("create-idle").value) options.idle_timeout = Number($("create-idle").value);
  if ($("create-lifetime").value) options.max_lifetime = Number($("create-lifetime").value);
  if ($("create-cpus").value) options.cpus = Number($("create-cpus").value);
  if ($("create-memory").value) options.memory = $("create-memory").value.trim();
  $("create").disabled = true;
  notice("Creating a sandbox...");
  try {
    const made = await guarded(() => api("Creating a sandbox", "POST", "/sandboxes", { json: options }));
    notice(made ? `Created ${made.sandbox_id}` : "");
    await refreshSandboxes({ background: true });
    if (made) select(made.sandbox_id);
  } finally {
    $("create").disabled = false;
  }
}

async function keepAlive(id) {
  const details = await guarded(() => api("Keep alive", "POST", `/sandboxes/${id}/keepalive`));
  if (details) notice(`Kept ${id} alive (idle timer reset${details.expires_at ? `; lifetime ends ${time(details.expires_at)}` : ""})`);
  await refreshSandboxes({ background: true });
}

async function remove(id) {
  if (state.selected === id) deselect();
  const done = await guarded(() => api("Deleting the sandbox", "DELETE", `/sandboxes/${id}`));
  if (done) notice(done.message);
  await refreshSandboxes({ background: true });
}

function select(id) {
  if (state.selected === id) return;
  state.selected = id;
  for (const row of $("sandboxes").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.id === id);
  }
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  if (!state.terminal) state.terminal = new TerminalView($("terminal"));
  state.terminal.start(id);
  state.terminal.term.focus();
  $("files").tBodies[0].replaceChildren();
  refreshProcesses({ background: true });
}

function deselect() {
  state.selected = null;
  if (state.terminal) state.terminal.dispose();
  $("detail").hidden = true;
}

/** One request over a short-lived WebSocket (the `processes` listing). */
function ask(id, message, replyType) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsURL(id));
    const timer = setTimeout(() => { ws.close(); reject(new Error(`${replyType}: no answer`)); }, 10000);
    ws.onopen = () => ws.send(JSON.stringify(message));
    ws.onmessage = (event) => {
      const m = JSON.parse(event.data);
      if (m.request_id !== message.request_id) return;
      clearTimeout(timer);
      ws.close(1000);
      if (m.type === "error") reject(new Error(`${m.error_code}: ${m.error || ""}`));
      else resolve(m);
    };
    ws.onerror = () => {
      clearTimeout(timer);
      reject(new Error("the sandbox's WebSocket was refused (token? sandbox gone?)"));
    };
  });
}

async function refreshProcesses({ background = false } = {}) {
  const id = state.selected;
  if (!id) return;
  const reply = await guarded(async () => {
    try {
      return await ask(id, { type: "processes", request_id: requestId("ps") }, "processes");
    } catch (e) {
      throw new Error(`Listing processes failed: ${e.message}`);
    }
  }, { clear: !background });
  if (reply === null || state.selected !== id) return;
  const body = $("processes").tBodies[0];
  body.replaceChildren();
  for (const p of reply.processes) {
    const row = document.createElement("tr");
    row.dataset.pid = p.pid;
    cell(row, String(p.pid));
    cell(row, p.pty ? `[terminal] ${p.command || "bash -l"}` : p.command || "");
    cell(row, p.state === "exited" ? `exited (${p.returncode})` : p.state);
    cell(row, time(p.started_at));
    cell(row, button("Reattach", "reattach", () => {
      notice(`Reattached to process ${p.pid}`);
      state.terminal.attach(id, p.pid, p.request_id, p.pty);
      state.terminal.term.focus();
    }));
    body.append(row);
  }
}

function filesPath(id, route, path, extra = "") {
  return `/sandboxes/${id}/files${route}?path=${encodeURIComponent(path)}${extra}`;
}

async function upload(event) {
  event.preventDefault();
  const id = state.selected;
  const file = $("upload-file").files[0];
  if (!file) { showError("Upload: choose a file first"); return; }
  const dir = $("upload-dir").value.trim().replace(/\/+$/, "");
  const target = dir ? `${dir}/${file.name}` : file.name;
  notice(`Uploading ${file.name}...`);
  const done = await guarded(() => api(`Uploading ${file.name}`, "PUT",
    filesPath(id, "", target, "&mkdirs=true"), { body: file }));
  if (done) {
    notice(`Uploaded ${done.path} (${done.size} bytes)`);
    await listFiles(null, dir);
  }
}

async function download(path) {
  const id = state.selected;
  const response = await guarded(() => api(`Downloading ${path}`, "GET", filesPath(id, "", path), { raw: true }));
  if (response === null) return;
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = path.split("/").pop() || "download";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  notice(`Downloaded ${path} (${blob.size} bytes)`);
}

async function listFiles(event, dir) {
  if (event) event.preventDefault();
  const id = state.selected;
  const path = dir !== undefined ? dir : $("list-path").value.trim();
  const entries = await guarded(() => api("Listing files", "GET",
    `/sandboxes/${id}/files/list${path ? `?path=${encodeURIComponent(path)}` : ""}`));
  if (entries === null) return;
  const body = $("files").tBodies[0];
  body.replaceChildren();
  for (const e of entries) {
    const row = document.createElement("tr");
    row.dataset.path = e.path;
    cell(row, e.name);
    cell(row, e.type);
    cell(row, String(e.size));
    cell(row, e.type === "file" ? button("Download", "download", () => download(e.path)) : "");
    body.append(row);
  }
}

function showToken() {
  $("token-state").textContent = token() ? "token set (this tab only)" : "no token";
}

function init() {
  $("token").value = token();
  showToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    showToken();
    refreshTemplates();
    refreshSandboxes();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    showToken();
    deselect();
    $("sandboxes").tBodies[0].replaceChildren();
  });
  $("error-close").addEventListener("click", clearError);
  $("refresh").addEventListener("click", () => refreshSandboxes());
  $("create-form").addEventListener("submit", create);
  $("terminal-new").addEventListener("click", () => {
    if (state.selected) { state.terminal.start(state.selected); state.terminal.term.focus(); }
  });
  $("processes-refresh").addEventListener("click", () => refreshProcesses());
  $("upload-form").addEventListener("submit", upload);
  $("download-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const path = $("download-path").value.trim();
    if (!path) { showError("Download: enter a path"); return; }
    download(path);
  });
  $("list-form").addEventListener("submit", listFiles);
  refreshTemplates();
  refreshSandboxes();
  setInterval(() => { if (!document.hidden) refreshSandboxes({ background: true }); }, 15000);
}

// For tests and the curious: the page's state (the terminal's buffer through `terminal.text()`).
window.twistedgwConsole = { state, refreshSandboxes, refreshProcesses };
init();
