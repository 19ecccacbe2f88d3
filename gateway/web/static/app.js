// 工单核对台: the little JavaScript the pages need (no framework).
"use strict";

const csrf = () => document.body.dataset.csrf || "";
const PENDING_KEY = "workbench.pendingEdit";

function notice(text, kind) {
  const box = document.getElementById("notice");
  if (!box) return;
  box.textContent = text;
  box.className = "notice " + (kind || "info");
  box.hidden = !text;
}

// POST JSON with the CSRF token; an expired session keeps the edit and goes to the login page.
async function postJSON(url, body, pending) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), "X-Page": location.pathname + location.search },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: "服务器返回了无法解析的结果" }; }
  if (response.status === 401) {
    if (pending) sessionStorage.setItem(PENDING_KEY, JSON.stringify({ ...pending, page: location.pathname }));
    notice("登录已过期，修改已暂存，正在跳转到登录页……", "error");
    location.assign(data.login || "/login?next=" + encodeURIComponent(location.pathname));
    throw new Error("session expired");
  }
  if (!response.ok) throw new Error(data.error || ("请求失败：" + response.status));
  return data;
}

function setBars() {
  document.querySelectorAll("[data-w]").forEach((el) => { el.style.width = el.dataset.w + "%"; });
}

// ---------------------------------------------------------------- ticket page
function ticketPage() {
  const dataEl = document.getElementById("ticket-data");
  if (!dataEl) return;
  const ticket = JSON.parse(dataEl.textContent);
  const base = "/api/tickets/" + encodeURIComponent(ticket.ticket_id);
  const player = document.getElementById("player");

  document.querySelectorAll("#transcript [data-start]").forEach((el) => {
    el.addEventListener("click", () => {
      if (!player) return;
      player.currentTime = parseFloat(el.dataset.start);
      const playing = player.play();
      if (playing && playing.catch) playing.catch(() => {});
      document.querySelectorAll("#transcript .current").forEach((c) => c.classList.remove("current"));
      el.classList.add("current");
    });
  });
  // keyboard: Tab reaches the first word of each segment; arrow keys move word by word (Enter plays there)
  const allWords = Array.from(document.querySelectorAll("#transcript .w"));
  allWords.forEach((w, i) => {
    w.tabIndex = w === w.parentElement.querySelector(".w") ? 0 : -1;
    w.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); w.click(); return; }
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      const next = allWords[i + step];
      if (next) next.focus();
    });
  });

  // selecting words with the mouse fills the re-recognition range
  const rrForm = document.getElementById("rerec-form");
  if (rrForm) document.addEventListener("selectionchange", () => {
    const selection = document.getSelection();
    if (!selection || selection.isCollapsed) return;
    const picked = allWords.filter((w) => selection.containsNode(w, true));
    if (picked.length < 2) return;
    rrForm.start.value = Math.max(0, parseFloat(picked[0].dataset.start) - 0.2).toFixed(1);
    rrForm.end.value = (parseFloat(picked[picked.length - 1].dataset.end) + 0.2).toFixed(1);
  });

  if (player) {
    const words = allWords;
    player.addEventListener("timeupdate", () => {
      const t = player.currentTime;
      words.forEach((w) => w.classList.toggle("playing", t >= parseFloat(w.dataset.start) && t < parseFloat(w.dataset.end)));
    });
  }

  async function save(field, value) {
    const row = document.querySelector(`.field[data-field="${field}"]`);
    const result = await postJSON(base + "/correct", { field, value }, { kind: "correct", field, value });
    row.dataset.value = result.value;
    document.getElementById("value-" + field).textContent = result.display || "—";
    const badge = document.getElementById("badge-" + field);
    badge.textContent = "人工确认";
    badge.className = "badge human";
    badge.title = `${result.corrected_by} 于 ${result.corrected_at.replace("T", " ")} 确认`;
    const log = document.getElementById("ticket-audit");
    if (log) {
      const item = document.createElement("li");
      item.textContent = `${result.corrected_at.replace("T", " ")} ${result.corrected_by} 修改字段：${row.querySelector(".flabel").textContent} → ${result.display}`;
      log.prepend(item);
    }
    return result;
  }

  document.querySelectorAll(".field").forEach((row) => {
    const button = row.querySelector(".edit");
    const form = row.querySelector(".editor");
    const input = form.querySelector("[name=value]");
    const close = () => { form.hidden = true; button.setAttribute("aria-expanded", "false"); button.focus(); };
    button.addEventListener("click", () => {
      form.hidden = !form.hidden;
      button.setAttribute("aria-expanded", String(!form.hidden));
      if (!form.hidden) input.focus();
    });
    form.querySelector(".cancel").addEventListener("click", close);
    form.addEventListener("keydown", (event) => { if (event.key === "Escape") close(); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await save(row.dataset.field, input.value);
        notice(`已保存：${row.querySelector(".flabel").textContent}`, "ok");
        close();
      } catch (error) {
        if (error.message !== "session expired") notice(error.message, "error");
      }
    });
  });

  // an edit made just before the session expired: saved now that the user is back
  const pendingText = sessionStorage.getItem(PENDING_KEY);
  if (pendingText) {
    sessionStorage.removeItem(PENDING_KEY);
    const pending = JSON.parse(pendingText);
    if (pending.page === location.pathname && pending.kind === "correct") {
      save(pending.field, pending.value)
        .then(() => notice("登录过期前未保存的修改已保存", "ok"))
        .catch((error) => notice("暂存的修改未能保存：" + error.message, "error"));
    }
  }

  const statusForm = document.getElementById("status-form");
  if (statusForm) statusForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const result = await postJSON(base + "/status", { status: statusForm.status.value });
      const h = result.handling;
      const fmt = (v) => (v || "").replace("T", " ").slice(0, 16);
      document.getElementById("status-times").textContent =
        `受理 ${fmt(h.opened_at)}` + (h.dispatched_at ? ` · 派单 ${fmt(h.dispatched_at)}` : "") + (h.closed_at ? ` · 办结 ${fmt(h.closed_at)}` : "");
      notice("状态已更新：" + result.label, "ok");
    } catch (error) { if (error.message !== "session expired") notice(error.message, "error"); }
  });

  const reviewed = document.getElementById("mark-reviewed");
  if (reviewed) reviewed.addEventListener("click", async () => {
    try {
      const result = await postJSON(base + "/reviewed", {});
      document.getElementById("reviewed-info").textContent = `已由 ${result.handling.reviewed_by} 于 ${result.handling.reviewed_at.replace("T", " ").slice(0, 16)} 核对`;
      notice("已标记为已核对", "ok");
    } catch (error) { if (error.message !== "session expired") notice(error.message, "error"); }
  });

  const rr = document.getElementById("rerec-form");
  if (rr && player) {
    document.getElementById("rr-start-now").addEventListener("click", () => { rr.start.value = player.currentTime.toFixed(1); });
    document.getElementById("rr-end-now").addEventListener("click", () => { rr.end.value = player.currentTime.toFixed(1); });
    rr.addEventListener("submit", async (event) => {
      event.preventDefault();
      const out = document.getElementById("rerec-result");
      out.textContent = "识别中……";
      try {
        const result = await postJSON(base + "/rerecognize", { start: rr.start.value, end: rr.end.value, hotwords: rr.hotwords.value });
        out.textContent = "";
        result.segments.forEach((seg) => {
          const p = document.createElement("p");
          const at = document.createElement("button");
          at.type = "button";
          at.className = "segtime";
          at.textContent = seg.start_s.toFixed(1) + " 秒";
          at.addEventListener("click", () => { player.currentTime = seg.start_s; player.play().catch(() => {}); });
          p.append(at, " " + seg.text);
          out.append(p);
        });
        if (!result.segments.length) out.textContent = "这一段没有识别出文字";
      } catch (error) { if (error.message !== "session expired") out.textContent = error.message; }
    });
  }
}

// ---------------------------------------------------------------- upload page
function uploadPage() {
  const zone = document.getElementById("dropzone");
  if (!zone) return;
  const input = document.getElementById("file-input");
  const bar = document.getElementById("upload-progress");
  const label = document.getElementById("progress-label");
  const message = document.getElementById("upload-message");
  const maxBytes = parseInt(zone.dataset.maxBytes, 10);
  const show = (text, kind) => { message.textContent = text; message.className = kind || ""; };

  function send(blob, name) {
    if (blob.size > maxBytes) {
      show(`文件太大：“${name}” 有 ${(blob.size / 1048576).toFixed(1)} MB，上限 ${(maxBytes / 1048576).toFixed(0)} MB，未上传`, "error");
      return;
    }
    const body = new FormData();
    body.append("audio", blob, name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/upload");
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    xhr.setRequestHeader("X-Page", "/upload");
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) {
        bar.value = Math.round((event.loaded / event.total) * 100);
        label.textContent = `上传中 ${bar.value}%`;
      }
    };
    xhr.upload.onload = () => { bar.removeAttribute("value"); label.textContent = "上传完成，正在识别和生成工单……"; };
    xhr.onerror = () => { show("网络错误，上传失败", "error"); label.textContent = "上传失败"; };
    xhr.onload = () => {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = { error: "服务器返回了无法解析的结果" }; }
      if (xhr.status === 401) { location.assign(data.login || "/login?next=/upload"); return; }
      if (xhr.status >= 400 || !data.ok) {
        bar.value = 0;
        label.textContent = "未完成";
        show(data.error || ("上传失败：" + xhr.status), "error");
        return;
      }
      bar.value = 100;
      label.textContent = "完成";
      show(`识别完成，工单 ${data.ticket_id}，正在打开……`, "ok");
      location.assign(data.url);
    };
    show("", "");
    bar.value = 0;
    label.textContent = `准备上传 ${name}`;
    xhr.send(body);
  }

  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { if (input.files.length) send(input.files[0], input.files[0].name); input.value = ""; });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) send(file, file.name);
  });

  // microphone: MediaRecorder -> one blob -> the same upload
  const start = document.getElementById("rec-start");
  const stop = document.getElementById("rec-stop");
  const clock = document.getElementById("rec-time");
  let recorder = null, chunks = [], timer = null, began = 0;
  start.addEventListener("click", async () => {
    if (!navigator.mediaDevices || !window.MediaRecorder) { show("此浏览器不支持录音", "error"); return; }
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); }
    catch (error) { show("无法使用麦克风：" + error.message, "error"); return; }
    chunks = [];
    const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"].find((t) => MediaRecorder.isTypeSupported(t)) || "";
    recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
    recorder.ondataavailable = (event) => { if (event.data.size) chunks.push(event.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      clearInterval(timer);
      const blob = new Blob(chunks, { type: recorder.mimeType });
      const ext = recorder.mimeType.includes("ogg") ? "ogg" : "webm";
      send(blob, `麦克风录音.${ext}`);
    };
    recorder.start(250);
    began = Date.now();
    timer = setInterval(() => {
      const s = Math.floor((Date.now() - began) / 1000);
      clock.textContent = String(Math.floor(s / 60)).padStart(2, "0") + ":" + String(s % 60).padStart(2, "0");
    }, 250);
    start.disabled = true;
    stop.disabled = false;
    stop.focus();
    label.textContent = "录音中……";
  });
  stop.addEventListener("click", () => {
    if (recorder && recorder.state !== "inactive") recorder.stop();
    start.disabled = false;
    stop.disabled = true;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setBars();
  ticketPage();
  uploadPage();
});
