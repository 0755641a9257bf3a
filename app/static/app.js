// videorelay playground: upload or link an image, submit, follow the status live
// (EventSource on the video's events_url), play the stored clip from its content_url. Both
// URLs are signed when the service has API keys, so neither needs a header.
// No API key is ever kept: one typed in is exchanged for a client token at once. When that
// token expires, the page asks for the credential again (it cannot renew a token by itself).
"use strict";

const $ = (id) => document.getElementById(id);
const ORDER = ["queued", "processing", "downloading", "ready"];
const TOKEN_STORE = "videorelay.clientToken";
let pickedFile = null;
// What the page sends as its bearer: a client token, or (only when the server cannot mint
// tokens) the API key typed in. `resolved` is the field value it was worked out from.
const auth = { bearer: "", resolved: "", pending: null };

const CREDENTIAL_REJECTED = ["token_expired", "invalid_token", "unauthorized"];

function looksLikeToken(value) { return /^eyJ[\w-]*\.[\w-]+\.[\w-]+$/.test(value); }
function setAuthStatus(message) { $("auth-status").textContent = message; }

async function mintToken(key) {
  const response = await fetch("v1/client-tokens", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` },
    body: JSON.stringify({ subject: "playground", ttl_seconds: 900 }),
  });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (response.status === 501 && body?.error?.code === "client_tokens_disabled") return null;
  if (!response.ok) throw new Error(body?.error?.message || `HTTP ${response.status}`);
  return body;
}

// Turns what the credential field holds into the bearer: a client token is used as is; an API
// key is exchanged for a short client token, and from then on only the token is sent or kept.
async function resolveCredential() {
  const value = $("api-key").value.trim();
  if (value === auth.resolved) return auth.pending || auth.bearer;
  auth.resolved = value;
  auth.pending = (async () => {
    if (!value) {
      auth.bearer = "";
      localStorage.removeItem(TOKEN_STORE);
      setAuthStatus("");
    } else if (looksLikeToken(value)) {
      auth.bearer = value;
      localStorage.setItem(TOKEN_STORE, value);
      setAuthStatus("using this client token");
    } else {
      const minted = await mintToken(value).catch((err) => {
        auth.resolved = "";
        setAuthStatus(`could not mint a client token: ${err.message}`);
        throw err;
      });
      if (minted) {
        auth.bearer = minted.token;
        auth.resolved = minted.token;
        $("api-key").value = minted.token;  // the key itself is not kept
        localStorage.setItem(TOKEN_STORE, minted.token);
        const until = new Date(minted.expires_at).toLocaleTimeString();
        setAuthStatus(`using a client token for "${minted.subject}" until ${until}`);
      } else {
        auth.bearer = value;
        localStorage.removeItem(TOKEN_STORE);
        setAuthStatus("client tokens are disabled on this server: using the API key itself (not kept)");
      }
    }
    auth.pending = null;
    return auth.bearer;
  })();
  return auth.pending;
}

// The credential sent (`refused`: an expired or unknown token, a wrong key, or none) was
// refused: forget it, open the credential field and say what to paste. What the user typed
// since is left alone, and so is the rest of the form: pressing Make video again resubmits
// the same image, prompt and settings.
function askForCredential(code, refused) {
  if (refused && auth.bearer === refused) {
    auth.bearer = "";
    auth.resolved = "";
    auth.pending = null;
    localStorage.removeItem(TOKEN_STORE);
  }
  if (refused && $("api-key").value.trim() === refused) $("api-key").value = "";
  $("credential").open = true;
  // Into the field, unless the user is typing somewhere else (a list refresh can end here).
  if (!["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName)) $("api-key").focus();
  const expired = code === "token_expired";
  setAuthStatus(expired
    ? "The client token has expired. Paste the API key again (it is exchanged for a new 15-minute token, not kept) or a fresh client token, then press Make video again: the image, prompt and settings are kept."
    : refused
      ? "This credential was refused. Paste a valid API key or client token, then press Make video again."
      : "This service needs a credential: paste an API key (exchanged for a 15-minute client token, not kept) or a client token.");
  // The form's own error line, shorter: the details are under Credential.
  return expired
    ? "The client token has expired: paste the credential again under Credential."
    : "The credential was refused or is missing: see Credential.";
}

async function api(path, options = {}) {
  const bearer = await resolveCredential();
  const headers = { ...options.headers };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  const response = await fetch(path, { ...options, headers });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const code = body?.error?.code;
    if (response.status === 401 && CREDENTIAL_REJECTED.includes(code)) {
      throw new Error(askForCredential(code, bearer));
    }
    throw new Error(body?.error?.message || `HTTP ${response.status}`);
  }
  return body;
}

function showError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = !message;
}

function pick(file) {
  pickedFile = file || null;
  const preview = $("preview");
  if (pickedFile) {
    preview.src = URL.createObjectURL(pickedFile);
    preview.hidden = false;
    $("drop-text").textContent = pickedFile.name;
    $("image-url").value = "";
  } else {
    preview.hidden = true;
    $("drop-text").textContent = "Drop an image here, or tap to pick one (JPEG, PNG, WebP)";
  }
}

function renderSteps(video) {
  const steps = $("steps");
  const at = ORDER.indexOf(video.status);
  steps.classList.toggle("failed", video.status === "failed");
  for (const li of steps.children) {
    const i = ORDER.indexOf(li.dataset.status);
    li.classList.toggle("done", video.status !== "failed" && i < at || video.status === "ready" && i === at);
    li.classList.toggle("active", i === at && video.status !== "ready");
  }
  const line = video.status === "failed"
    ? `failed: ${video.error?.code} — ${video.error?.message}`
    : video.status === "ready" ? `ready · ${(video.size_bytes / 1024).toFixed(0)} KiB · sha256 ${video.sha256.slice(0, 12)}…`
    : `${video.status}…`;
  $("status-line").textContent = line;
  $("status-line").dataset.status = video.status;
}

function play(video) {
  const player = $("player");
  player.poster = video.poster_url || "";  // a frame of the clip, shown until it plays
  player.src = video.content_url;  // signed when the service has keys; streamed with HTTP Range
  player.hidden = false;
  const download = $("download");
  download.href = video.content_url;  // the same signed URL; `download` saves instead of playing
  download.download = `${video.id}.mp4`;  // the name the server gives it too
  download.hidden = false;
}

// The request just made, as a curl command for a terminal. The credential is never written
// out: the command reads $VIDEORELAY_TOKEN (a client token, or your API key on a server).
function shellQuote(text) { return `'${text.replaceAll("'", `'\\''`)}'`; }

function curlFor(body, withCredential) {
  const parts = [`curl -sS -X POST ${shellQuote(new URL("v1/videos", location.href).href)}`];
  if (withCredential) parts.push('-H "Authorization: Bearer $VIDEORELAY_TOKEN"');
  parts.push("-H 'Content-Type: application/json'", `-d ${shellQuote(JSON.stringify(body))}`);
  return parts.join(" \\\n  ");
}

function offerCurl(body, withCredential) {
  $("curl").textContent = curlFor(body, withCredential);
  $("curl").hidden = true;
  $("curl-note").hidden = true;
  $("copy-curl").hidden = false;
}

async function copyCurl() {
  const text = $("curl").textContent;
  $("curl").hidden = false;
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    getSelection().selectAllChildren($("curl"));  // no clipboard access: select it instead
  }
  const needs = text.includes("$VIDEORELAY_TOKEN")
    ? " Set VIDEORELAY_TOKEN to a client token (or, on a server, your API key) first."
    : "";
  $("curl-note").textContent = (copied ? "Copied." : "Selected: copy it with your keyboard.") + needs;
  $("curl-note").hidden = false;
}

let events = null;

function follow(video) {
  $("current").hidden = false;
  $("player").hidden = true;
  $("download").hidden = true;
  if (events) events.close();
  // EventSource reconnects by itself (sending Last-Event-ID); the URL carries its own grant.
  const source = new EventSource(video.events_url);
  events = source;
  return new Promise((resolve) => {
    const finish = () => { source.close(); if (events === source) events = null; loadRecent(); resolve(); };
    const onEvent = (message) => {
      const current = JSON.parse(message.data);
      renderSteps(current);
      if (current.status === "ready") { play(current); finish(); }
      else if (current.status === "failed") finish();
    };
    for (const kind of ["status", "ready", "failed"]) source.addEventListener(kind, onEvent);
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        $("status-line").textContent = "lost the status stream; refresh the list to see the video";
        finish();
      } else {
        $("status-line").textContent = "reconnecting…";
      }
    };
  });
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const button = $("submit");
  button.disabled = true;
  try {
    const body = {
      prompt: $("prompt").value.trim() || undefined,
      resolution: $("resolution").value,
      duration: Number($("duration").value),
    };
    if (pickedFile) {
      const form = new FormData();
      form.append("file", pickedFile);
      const image = await api("v1/images", { method: "POST", body: form });
      body.image_id = image.id;
    } else if ($("image-url").value.trim()) {
      body.image_url = $("image-url").value.trim();
    } else {
      throw new Error("Pick an image or paste an https image URL.");
    }
    const video = await api("v1/videos", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    renderSteps(video);
    offerCurl(body, Boolean(auth.bearer));
    $("current").hidden = false;
    const motion = matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth";
    $("current").scrollIntoView({ behavior: motion, block: "start" });
    loadRecent();
    await follow(video);
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

async function loadRecent() {
  const list = $("recent");
  try {
    const page = await api("v1/videos?limit=10");
    list.replaceChildren(...page.items.map((video) => {
      const li = document.createElement("li");
      const when = new Date(video.created_at).toLocaleString();
      const label = document.createElement("div");
      label.className = "item";
      label.innerHTML = '<span class="prompt"></span><span class="meta"><span class="status"></span> <span class="muted"></span></span>';
      const prompt = label.querySelector(".prompt");
      prompt.textContent = video.prompt || "(no prompt)";  // one line, cut with an ellipsis
      prompt.title = video.prompt || "";
      prompt.classList.toggle("muted", !video.prompt);
      const status = label.querySelector(".status");
      status.textContent = video.status;
      status.classList.add(video.status);
      label.querySelector(".meta .muted").textContent = `· ${video.duration} s · ${video.resolution} · ${when}`;
      li.append(label);
      if (video.status === "ready") {
        const button = document.createElement("button");
        button.className = "link";
        button.textContent = "play";
        button.onclick = () => {
          $("current").hidden = false;
          $("copy-curl").hidden = $("curl").hidden = $("curl-note").hidden = true;
          renderSteps(video);
          play(video);
          $("current").scrollIntoView({ block: "start" });
        };
        li.append(button);
      }
      return li;
    }));
    if (!page.items.length) list.innerHTML = '<li class="muted">No videos yet.</li>';
  } catch (err) {
    list.innerHTML = "";
    const li = document.createElement("li");
    li.className = "error";
    li.textContent = err.message;
    list.append(li);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localStorage.removeItem("videorelay.apiKey");  // older pages kept the key itself
  $("api-key").value = localStorage.getItem(TOKEN_STORE) || "";
  $("api-key").addEventListener("change", () => { resolveCredential().then(loadRecent, () => {}); });
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  $("image-url").addEventListener("input", () => { if ($("image-url").value) pick(null); });
  $("duration").addEventListener("input", () => { $("duration-value").textContent = $("duration").value; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
  $("submit-form").addEventListener("submit", submit);
  $("refresh").addEventListener("click", loadRecent);
  $("copy-curl").addEventListener("click", copyCurl);
  loadRecent();
});
