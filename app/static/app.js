// videorelay playground: upload or link an image, submit, follow the status live (SSE read
// with fetch so an API key can be sent), play the stored clip.
"use strict";

const $ = (id) => document.getElementById(id);
const ORDER = ["queued", "processing", "downloading", "ready"];
let pickedFile = null;

function apiKey() { return $("api-key").value.trim(); }
function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const message = body?.error?.message || `HTTP ${response.status}`;
    throw new Error(message);
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

async function play(video) {
  const player = $("player");
  if (apiKey()) {  // a <video> can't send the key: fetch the clip and play it from memory
    const response = await fetch(video.content_url, { headers: headers() });
    player.src = URL.createObjectURL(await response.blob());
  } else {
    player.src = video.content_url;  // streamed with HTTP Range, so seeking works
  }
  player.hidden = false;
}

async function follow(id) {
  $("current").hidden = false;
  $("player").hidden = true;
  let lastId = null;
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      const response = await fetch(`/v1/videos/${id}/events`, {
        headers: headers(lastId ? { "Last-Event-ID": lastId } : {}),
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = {};
          for (const line of block.split("\n")) {
            const m = line.match(/^(\w+): ?(.*)$/);
            if (m) event[m[1]] = m[2];
          }
          if (!event.data) continue;
          lastId = event.id || lastId;
          const video = JSON.parse(event.data);
          renderSteps(video);
          if (video.status === "ready") { await play(video); loadRecent(); return; }
          if (video.status === "failed") { loadRecent(); return; }
        }
      }
    } catch (err) {
      $("status-line").textContent = `reconnecting… (${err.message})`;
    }
    await new Promise((r) => setTimeout(r, 1500));
  }
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
      const image = await api("/v1/images", { method: "POST", body: form });
      body.image_id = image.id;
    } else if ($("image-url").value.trim()) {
      body.image_url = $("image-url").value.trim();
    } else {
      throw new Error("Pick an image or paste an https image URL.");
    }
    const video = await api("/v1/videos", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    renderSteps(video);
    loadRecent();
    await follow(video.id);
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

async function loadRecent() {
  const list = $("recent");
  try {
    const page = await api("/v1/videos?limit=10");
    list.replaceChildren(...page.items.map((video) => {
      const li = document.createElement("li");
      const when = new Date(video.created_at).toLocaleString();
      const label = document.createElement("span");
      label.innerHTML = `<span class="status ${video.status}"></span> <span class="muted"></span>`;
      label.children[0].textContent = video.status;
      label.children[1].textContent = `${video.duration}s ${video.resolution} · ${when}`;
      li.append(label);
      if (video.status === "ready") {
        const button = document.createElement("button");
        button.className = "link";
        button.textContent = "play";
        button.onclick = () => { $("current").hidden = false; renderSteps(video); play(video); };
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
  $("api-key").value = localStorage.getItem("videorelay.apiKey") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("videorelay.apiKey", apiKey()); loadRecent(); });
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  $("image-url").addEventListener("input", () => { if ($("image-url").value) pick(null); });
  $("duration").addEventListener("input", () => { $("duration-value").textContent = $("duration").value; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0]); });
  $("submit-form").addEventListener("submit", submit);
  $("refresh").addEventListener("click", loadRecent);
  loadRecent();
});
