// Plain JS client of the captioning API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];

function key() { return localStorage.getItem("repic-api-key") || ""; }

function setStatus(text) { $("status").textContent = text; $("error").textContent = ""; }
function setError(text) { $("error").textContent = text; }

async function api(path, options = {}) {
  const headers = Object.assign({ "X-API-Key": key() }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const body = await res.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    throw new Error(`${res.status}: ${detail}`);
  }
  return res;
}

async function refreshConcepts() {
  const list = $("concept-list");
  list.innerHTML = "";
  const concepts = await (await api("/v1/concepts")).json();
  for (const c of concepts) {
    const li = document.createElement("li");
    li.dataset.name = c.name;
    const img = document.createElement("img");
    img.alt = c.name;
    // Images need the key header, so fetch them and show a blob URL.
    api(c.image_urls[0]).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); });
    li.appendChild(img);
    li.appendChild(document.createTextNode(`${c.name} (${c.category}) ${c.info} `));
    const del = document.createElement("button");
    del.textContent = "Delete";
    del.className = "delete";
    del.onclick = async () => {
      try { await api(`/v1/concepts/${encodeURIComponent(c.name)}`, { method: "DELETE" });
            setStatus(`deleted ${c.name}`); await refreshConcepts(); }
      catch (e) { setError(e.message); }
    };
    li.appendChild(del);
    list.appendChild(li);
  }
}

async function useKey() {
  localStorage.setItem("repic-api-key", $("api-key").value.trim());
  try {
    const me = await (await api("/v1/me")).json();
    $("whoami").textContent = `signed in as ${me.name}`;
    setStatus("key accepted");
    await refreshConcepts();
  } catch (e) { $("whoami").textContent = ""; setError(e.message); }
}

async function register(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("concept-name").value.trim());
  form.append("category", $("concept-category").value.trim() || "object");
  form.append("info", $("concept-info").value.trim());
  for (const f of $("concept-images").files) form.append("images", f);
  try {
    const c = await (await api("/v1/concepts", { method: "POST", body: form })).json();
    setStatus(`registered ${c.name}`);
    await refreshConcepts();
  } catch (e) { setError(e.message); }
}

function drawResult(file, result) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const canvas = $("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      // Boxes are in pixels of the uploaded image, which is what the canvas shows.
      const sx = img.naturalWidth / result.width, sy = img.naturalHeight / result.height;
      const drawn = [];
      result.concepts.forEach((c, i) => {
        if (!c.box) return;
        const [x1, y1, x2, y2] = c.box;
        ctx.strokeStyle = ctx.fillStyle = COLOURS[i % COLOURS.length];
        ctx.lineWidth = Math.max(2, canvas.width / 200);
        ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
        ctx.font = `${Math.max(12, canvas.width / 30)}px sans-serif`;
        ctx.fillText(c.name, x1 * sx + 3, Math.max(12, y1 * sy - 3));
        drawn.push({ name: c.name, box: c.box });
      });
      canvas.dataset.boxes = JSON.stringify(drawn);
      resolve();
    };
    img.src = URL.createObjectURL(file);
  });
}

async function caption(event) {
  event.preventDefault();
  const file = $("caption-image").files[0];
  const form = new FormData();
  form.append("image", file);
  const names = $("caption-concepts").value.trim();
  if (names) form.append("concepts", names);
  else form.append("top_k", $("caption-topk").value);
  setStatus("captioning...");
  try {
    const result = await (await api("/v1/captions", { method: "POST", body: form })).json();
    $("caption-text").textContent = result.caption;
    $("caption-model").textContent =
      `model ${result.model}, ${result.mode}: ${result.concepts.map((c) => c.name).join(", ")}`;
    await drawResult(file, result);
    setStatus("done");
  } catch (e) { setError(e.message); }
}

$("api-key").value = key();
$("save-key").onclick = useKey;
$("register-form").onsubmit = register;
$("caption-form").onsubmit = caption;
if (key()) useKey();
