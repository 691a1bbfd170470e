// feedbackcam page: predict + explain, paint feedback, watch the model learn. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGE = 384; // CSS pixels of the image on screen
const state = {
  token: sessionStorage.getItem("feedbackcam-token"),
  me: null,
  shown: null, // the prediction on screen: {image_id, version, predicted, probabilities, size, saliency, photo}
  undo: [],
  k: 1, // paint-canvas pixels per image pixel
  submittedRegion: null, // the region sent with the last feedback, for the comparison
};

// ------------------------------------------------------------------ API
async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.blob();
}

async function loadImage(src) {
  const image = new Image();
  image.src = src;
  await image.decode();
  return image;
}

async function authedImage(url) {
  return loadImage(URL.createObjectURL(await api(url)));
}

function say(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
  el.hidden = !text;
}

// ------------------------------------------------------------------ sign in
async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("/api/me");
  } catch (error) {
    state.token = null;
    sessionStorage.removeItem("feedbackcam-token");
    say("page-message", `Sign-in failed: ${error.message}`, true);
    return;
  }
  sessionStorage.setItem("feedbackcam-token", token);
  say("page-message", "");
  $("signin").hidden = true;
  $("whoami").hidden = false;
  $("user-name").textContent = state.me.name;
  $("user-role").textContent = state.me.role;
  $("app").hidden = false;
  const canGiveFeedback = state.me.role !== "viewer";
  $("viewer-note").hidden = canGiveFeedback;
  $("paint").classList.toggle("disabled", !canGiveFeedback);
  $("admin").hidden = state.me.role !== "admin";
  await Promise.all([loadGallery(), refreshStatus(), state.me.role === "admin" ? loadVersions() : null]);
}

function signOut() {
  sessionStorage.removeItem("feedbackcam-token");
  window.location.hash = "";
  window.location.reload();
}

// ------------------------------------------------------------------ gallery and predict
async function loadGallery() {
  const list = $("gallery");
  list.replaceChildren();
  const entries = await api("/api/gallery");
  $("gallery-title").textContent = entries.length
    ? "or pick one from the gallery"
    : "No gallery: this data dir has no gallery/ folder.";
  for (const entry of entries) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    const label = entry.label ? `${entry.name} (labelled ${entry.label})` : entry.name;
    button.setAttribute("aria-label", `Pick ${label}`);
    button.title = label;
    button.dataset.imageId = entry.image_id;
    const img = document.createElement("img");
    img.alt = "";
    button.append(img);
    button.addEventListener("click", () => predict({ image_id: entry.image_id }));
    item.append(button);
    list.append(item);
    authedImage(entry.image_url).then((image) => { img.src = image.src; }).catch(() => {});
  }
}

async function predict(input) {
  const form = new FormData();
  if (input.file) form.append("file", input.file);
  else form.append("image_id", input.image_id);
  say("feedback-status", "Predicting...");
  try {
    const result = await api("/api/predict", { method: "POST", body: form });
    await show(await decodePrediction(result));
    $("compare").hidden = true;
    if (window.matchMedia("(max-width: 1100px)").matches) $("view").scrollIntoView();
    say("feedback-status", "");
  } catch (error) {
    say("feedback-status", `Could not predict: ${error.message}`, true);
  }
}

async function decodePrediction(result) {
  const grey = await loadImage(result.saliency_png);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = result.size;
  const context = canvas.getContext("2d");
  context.drawImage(grey, 0, 0);
  const pixels = context.getImageData(0, 0, result.size, result.size).data;
  const saliency = new Float32Array(result.size * result.size);
  for (let i = 0; i < saliency.length; i++) saliency[i] = pixels[4 * i] / 255;
  const photo = await authedImage(result.image_url);
  return { ...result, saliency, photo };
}

// ------------------------------------------------------------------ drawing the explanation
function jet(v) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function heatCanvas(p) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = p.size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(p.size, p.size);
  p.saliency.forEach((v, i) => {
    image.data.set([...jet(v), 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
  return canvas;
}

// Marching squares: segments of the 0.5 level line, in image pixel units (centres at +0.5).
function contourSegments(values, size, level = 0.5) {
  const at = (x, y) => values[y * size + x];
  const segments = [];
  const cross = (x0, y0, v0, x1, y1, v1) => {
    const t = (level - v0) / (v1 - v0);
    return [x0 + t * (x1 - x0) + 0.5, y0 + t * (y1 - y0) + 0.5];
  };
  for (let y = 0; y < size - 1; y++) {
    for (let x = 0; x < size - 1; x++) {
      const a = at(x, y), b = at(x + 1, y), c = at(x + 1, y + 1), d = at(x, y + 1);
      const points = [];
      if ((a >= level) !== (b >= level)) points.push(cross(x, y, a, x + 1, y, b));
      if ((b >= level) !== (c >= level)) points.push(cross(x + 1, y, b, x + 1, y + 1, c));
      if ((c >= level) !== (d >= level)) points.push(cross(x + 1, y + 1, c, x, y + 1, d));
      if ((d >= level) !== (a >= level)) points.push(cross(x, y + 1, d, x, y, a));
      for (let i = 0; i + 1 < points.length; i += 2) segments.push([points[i], points[i + 1]]);
    }
  }
  return segments;
}

function drawContour(context, p, scale, values = p.saliency, colour = "#ffe600") {
  context.lineCap = "round";
  for (const [width, stroke] of [[4, "rgba(0,0,0,0.7)"], [2, colour]]) {
    context.beginPath();
    for (const [[x0, y0], [x1, y1]] of contourSegments(values, p.size)) {
      context.moveTo(x0 * scale, y0 * scale);
      context.lineTo(x1 * scale, y1 * scale);
    }
    context.lineWidth = width;
    context.strokeStyle = stroke;
    context.stroke();
  }
}

function composite(canvas, p, region = null, opacity = 0.45) {
  const side = p.size * Math.max(1, Math.ceil(256 / p.size));
  canvas.width = canvas.height = side;
  const context = canvas.getContext("2d");
  context.drawImage(p.photo, 0, 0, side, side);
  context.globalAlpha = opacity;
  context.drawImage(heatCanvas(p), 0, 0, side, side);
  context.globalAlpha = 1;
  drawContour(context, p, side / p.size);
  if (region) drawContour(context, p, side / p.size, region, "#ff2bd6");
}

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1)} %`;
}

async function show(p) {
  state.shown = p;
  state.k = Math.max(1, Math.ceil(STAGE / p.size));
  const side = p.size * state.k;
  $("view-empty").hidden = true;
  $("view").hidden = false;
  $("photo").src = p.photo.src;
  const heat = $("heat");
  heat.width = heat.height = p.size;
  heat.getContext("2d").drawImage(heatCanvas(p), 0, 0);
  const contour = $("contour");
  contour.width = contour.height = side;
  drawContour(contour.getContext("2d"), p, state.k);
  const paint = $("paint");
  paint.width = paint.height = side;
  state.undo = [];
  applyViewControls();

  $("prediction").hidden = false;
  $("predicted-class").textContent = p.predicted;
  $("predicted-prob").textContent = percent(p.probabilities[p.predicted]);
  $("predicted-version").textContent = `model version ${p.version}`;
  const rows = Object.entries(p.probabilities).map(([name, prob]) => {
    const row = document.createElement("tr");
    if (name === p.predicted) row.className = "top-class";
    row.innerHTML = `<th scope="row"></th><td class="bar"><span aria-hidden="true"></span></td><td class="value"></td>`;
    row.querySelector("th").textContent = name;
    row.querySelector(".bar span").style.width = `${(100 * prob).toFixed(1)}%`;
    row.querySelector(".value").textContent = percent(prob);
    return row;
  });
  $("probs").tBodies[0].replaceChildren(...rows);

  const classes = $("classes");
  classes.replaceChildren();
  for (const name of Object.keys(p.probabilities)) {
    const label = document.createElement("label");
    label.className = "check";
    label.innerHTML = `<input type="radio" name="label" required> <span></span>`;
    label.querySelector("input").value = name;
    label.querySelector("input").checked = name === p.predicted;
    label.querySelector("span").textContent = name;
    classes.append(label);
  }
  $("feedback").hidden = state.me.role === "viewer";
  setVersionBadge(p.version);
}

function applyViewControls() {
  const opacity = Number($("opacity").value);
  $("opacity-value").textContent = `${opacity} %`;
  $("heat").style.opacity = opacity / 100;
  $("contour").hidden = !$("show-contour").checked;
  $("paint").style.visibility = $("show-mask").checked ? "visible" : "hidden";
}

function setVersionBadge(version) {
  const badge = $("version-badge");
  badge.hidden = false;
  badge.textContent = `Model version ${version}`;
}

// ------------------------------------------------------------------ painting
const MASK_COLOUR = "rgb(255, 43, 214)";
const paintContext = () => $("paint").getContext("2d", { willReadFrequently: true });

function pushUndo() {
  const canvas = $("paint");
  state.undo.push(paintContext().getImageData(0, 0, canvas.width, canvas.height));
  if (state.undo.length > 30) state.undo.shift();
}

function toCanvas(event) {
  const canvas = $("paint");
  const box = canvas.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * canvas.width) / box.width,
    ((event.clientY - box.top) * canvas.height) / box.height,
  ];
}

function stroke(from, to) {
  const canvas = $("paint");
  const context = paintContext();
  const erase = document.querySelector("input[name=tool]:checked").value === "erase";
  context.globalCompositeOperation = erase ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = MASK_COLOUR;
  context.lineCap = context.lineJoin = "round";
  context.lineWidth = (Number($("brush").value) * canvas.width) / canvas.getBoundingClientRect().width;
  context.beginPath();
  context.moveTo(...from);
  context.lineTo(...to);
  context.stroke();
}

function setUpPainting() {
  const canvas = $("paint");
  let last = null;
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.shown || state.me.role === "viewer") return;
    canvas.setPointerCapture(event.pointerId);
    pushUndo();
    $("show-mask").checked = true;
    applyViewControls();
    last = toCanvas(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = toCanvas(event);
    stroke(last, point);
    last = point;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("undo").addEventListener("click", () => {
    const previous = state.undo.pop();
    if (previous) paintContext().putImageData(previous, 0, 0);
  });
  $("clear").addEventListener("click", () => {
    pushUndo();
    paintContext().clearRect(0, 0, canvas.width, canvas.height);
  });
  $("from-model").addEventListener("click", () => {
    const p = state.shown;
    if (!p) return;
    pushUndo();
    const small = document.createElement("canvas");
    small.width = small.height = p.size;
    const context = small.getContext("2d");
    const image = context.createImageData(p.size, p.size);
    p.saliency.forEach((v, i) => {
      if (v >= 0.5) image.data.set([255, 43, 214, 255], 4 * i);
    });
    context.putImageData(image, 0, 0);
    const target = paintContext();
    target.globalCompositeOperation = "source-over";
    target.clearRect(0, 0, canvas.width, canvas.height);
    target.imageSmoothingEnabled = false;
    target.drawImage(small, 0, 0, canvas.width, canvas.height);
    $("show-mask").checked = true;
    applyViewControls();
  });
}

// The painted region at the image's size: an image pixel is in it when at least half of its
// k x k block on the canvas is painted. Returns {blob: PNG, region: values in {0, 1}}, or null
// when nothing is painted.
async function maskBlob() {
  const { size } = state.shown;
  const k = state.k;
  const painted = paintContext().getImageData(0, 0, size * k, size * k).data;
  const out = document.createElement("canvas");
  out.width = out.height = size;
  const context = out.getContext("2d");
  const mask = context.createImageData(size, size);
  let any = false;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      let count = 0;
      for (let dy = 0; dy < k; dy++) {
        for (let dx = 0; dx < k; dx++) {
          if (painted[4 * ((y * k + dy) * size * k + x * k + dx) + 3] > 127) count++;
        }
      }
      const on = 2 * count >= k * k;
      any ||= on;
      const v = on ? 255 : 0;
      mask.data.set([v, v, v, 255], 4 * (y * size + x));
    }
  }
  if (!any) return null;
  context.putImageData(mask, 0, 0);
  const region = new Float32Array(size * size).map((_, i) => mask.data[4 * i] / 255);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  return { blob, region };
}

// ------------------------------------------------------------------ feedback and learning
async function sendFeedback(agree) {
  const p = state.shown;
  const form = new FormData();
  form.append("image_id", p.image_id);
  form.append("shown_version", p.version);
  form.append("predicted", p.predicted);
  if (agree) {
    form.append("agree", "true");
    state.submittedRegion = null;
  } else {
    form.append("label", document.querySelector("input[name=label]:checked").value);
    const mask = await maskBlob();
    if (mask) form.append("mask", mask.blob, "mask.png");
    state.submittedRegion = mask ? mask.region : null;
  }
  $("submit").disabled = $("agree").disabled = true;
  try {
    const item = await api("/api/feedback", { method: "POST", body: form });
    say("feedback-status", `Feedback #${item.id} stored. The model is learning from it...`);
    await followUpdate(item.id, p);
  } catch (error) {
    say("feedback-status", `Not stored: ${error.message}`, true);
  } finally {
    $("submit").disabled = $("agree").disabled = false;
  }
}

async function followUpdate(itemId, before) {
  const deadline = Date.now() + 10 * 60 * 1000;
  while (Date.now() < deadline) {
    const item = await api(`/api/feedback/${itemId}`);
    if (item.status === "used") {
      if (item.update_status === "promoted") {
        const after = await decodePrediction(
          await api("/api/predict", { method: "POST", body: formWith("image_id", before.image_id) }),
        );
        if (state.shown && state.shown.image_id === before.image_id) {
          // the main view follows the current model; the painted region stays
          const canvas = $("paint");
          const painted = paintContext().getImageData(0, 0, canvas.width, canvas.height);
          const undo = state.undo;
          await show(after);
          paintContext().putImageData(painted, 0, 0);
          state.undo = undo;
        }
        showComparison(before, after);
        say("feedback-status", `Learned: version ${item.update_version} is now current.`);
      } else {
        say("feedback-status", `The update was not promoted, so the model is unchanged. ${item.update_reason}`);
      }
      await refreshStatus();
      if (state.me.role === "admin") await loadVersions();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 800));
  }
  say("feedback-status", "Stored; the update is taking long. It will still be learned.");
}

function formWith(key, value) {
  const form = new FormData();
  form.append(key, value);
  return form;
}

function showComparison(before, after) {
  composite($("before"), before, state.submittedRegion);
  composite($("after"), after, state.submittedRegion);
  const caption = (label, p) =>
    `${label}: version ${p.version}, ${p.predicted} ${percent(p.probabilities[p.predicted])}`;
  $("before-caption").textContent = caption("Before", before);
  $("after-caption").textContent = caption("After", after);
  $("compare-note").textContent =
    "The same image explained (predicted class; yellow: 50 % contour) before and after your " +
    "feedback" + (state.submittedRegion ? "; pink: the region you drew." : ".");
  $("compare").hidden = false;
  setVersionBadge(after.version);
}

// ------------------------------------------------------------------ status and versions
async function refreshStatus() {
  const status = await api("/api/update/status");
  setVersionBadge(status.current_version);
  $("update-info").textContent = `${status.pending} pending; ${status.message}` +
    (status.last_error ? `; last error: ${status.last_error}` : "");
  return status;
}

const fmt = (v) => (typeof v === "number" ? v.toFixed(3) : "–");

async function loadVersions() {
  const rows = (await api("/api/versions")).map((v) => {
    const row = document.createElement("tr");
    if (v.current) row.className = "current";
    const cells = [`${v.id}${v.parent ? ` ← ${v.parent}` : ""}`, v.current ? `${v.status}, current` : v.status,
      fmt(v.metrics.accuracy), fmt(v.metrics.avg_sensitivity), fmt(v.metrics.jaccard_mean), v.reason];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const action = document.createElement("td");
    if (v.status === "promoted" && !v.current) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Make current";
      button.setAttribute("aria-label", `Make version ${v.id} current`);
      button.addEventListener("click", () => activate(v.id));
      action.append(button);
    }
    row.append(action);
    return row;
  });
  $("versions").replaceChildren(...rows);
}

async function activate(id) {
  try {
    await api(`/api/versions/${id}/activate`, { method: "POST" });
    await Promise.all([loadVersions(), refreshStatus()]);
    if (state.shown) await predict({ image_id: state.shown.image_id });
  } catch (error) {
    say("update-info", `Could not activate: ${error.message}`, true);
  }
}

async function updateNow() {
  try {
    await api("/api/update", { method: "POST" });
    $("update-info").textContent = "Update started.";
  } catch (error) {
    $("update-info").textContent = error.message;
  }
}

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("signout").addEventListener("click", signOut);
  $("file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) predict({ file });
    event.target.value = "";
  });
  for (const id of ["opacity", "show-contour", "show-mask"]) $(id).addEventListener("input", applyViewControls);
  $("feedback").addEventListener("submit", (event) => {
    event.preventDefault();
    sendFeedback(false);
  });
  $("agree").addEventListener("click", () => sendFeedback(true));
  $("update-now").addEventListener("click", updateNow);
  setUpPainting();
  // a token in the address's fragment (never sent to the server) signs in once, then is removed
  const fromHash = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", window.location.pathname);
  const token = fromHash || state.token;
  if (token) signIn(token);
});
