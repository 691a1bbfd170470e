// feedbackcam page: predict + explain on the original image, paint feedback, review worklists,
// and follow the updates without ever waiting for them. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEEP_COLOUR = "rgb(255, 43, 214)"; // magenta: the region that matters
const IGNORE_COLOUR = "rgb(0, 229, 255)"; // cyan: the region that must not matter
const MAX_UNDO = 20;
const state = {
  token: sessionStorage.getItem("feedbackcam-token"),
  me: null,
  // the prediction on screen: {image_id, version, predicted, probabilities, size, width, height,
  // saliency, photo, original_url, warnings}
  shown: null,
  undo: [],
  redo: [],
  view: { s: 1, tx: 0, ty: 0, w: 0, h: 0 }, // zoom, pan (stage px), fitted size (stage px)
  worklist: null, // {id, name, entries, index}
  mine: new Map(), // my feedback items followed until an update used them
  sending: false,
  spaceDown: false,
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
    if (response.status === 401 && state.me) signedOut(detail);
    throw error;
  }
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.blob();
}

function formOf(fields) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) form.append(key, value);
  return form;
}

const post = (path, body) => api(path, { method: "POST", body });
const jsonBody = (method, value) => ({
  method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(value),
});

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

// A modal question; resolves to the chosen button's value (null: dismissed).
function ask(text, choices) {
  const dialog = $("ask");
  $("ask-text").textContent = text;
  const buttons = choices.map(([value, label, primary]) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.value = value;
    if (primary) button.className = "primary";
    return button;
  });
  $("ask-buttons").replaceChildren(...buttons);
  return new Promise((resolve) => {
    const done = (value) => { dialog.close(); resolve(value); };
    buttons.forEach((b) => b.addEventListener("click", () => done(b.dataset.value)));
    dialog.addEventListener("cancel", () => resolve(null), { once: true });
    dialog.showModal();
    buttons[0].focus();
  });
}

const isTouch = () => window.matchMedia("(pointer: coarse)").matches;

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
  $("admin").hidden = state.me.role !== "admin";
  $("worklist-folder-form").hidden = state.me.role !== "admin";
  $("worklist-files").disabled = !canGiveFeedback;
  warnExpiry();
  await Promise.all([loadGallery(), loadWorklists(), refreshStatus(),
    state.me.role === "admin" ? loadVersions() : null, canGiveFeedback ? loadMine() : null]);
  setInterval(poll, 1500);
}

// The token stopped working (expired or revoked): say so and ask for a new one on top of the
// page, which stays as it is: the image, the painting and the undo history are kept.
function signedOut(detail) {
  if (!state.me) return;
  state.signedOutAs = state.me;
  state.me = null;
  sessionStorage.removeItem("feedbackcam-token");
  $("resign-text").textContent = `Your sign-in has ended (${detail}). Ask an admin for a new ` +
    "token and paste it here to go on; what you painted is kept.";
  $("resign-token").value = "";
  if (!$("resign").open) $("resign").showModal();
}

async function resume(token) {
  state.token = token;
  try {
    const me = await api("/api/me");
    state.me = me;
  } catch (error) {
    $("resign-text").textContent = `That token does not sign in (${error.message}). Try another.`;
    return;
  }
  sessionStorage.setItem("feedbackcam-token", token);
  $("resign").close();
  $("user-name").textContent = state.me.name;
  $("user-role").textContent = state.me.role;
  warnExpiry();
  say("feedback-status", `Signed in again as ${state.me.name}; your work is as you left it.`);
}

// A token about to expire is said ahead of time, not discovered by losing the page.
function warnExpiry() {
  const expires = state.me && state.me.expires ? new Date(state.me.expires) : null;
  const soon = expires && expires - new Date() < 24 * 3600 * 1000;
  $("expiry").hidden = !soon;
  if (soon) {
    $("expiry").textContent = `Your sign-in expires at ${expires.toLocaleString()}. Ask an admin ` +
      "for a new token before then; if it runs out, the page asks for the new one and keeps your work.";
  }
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
    button.addEventListener("click", () => {
      leaveWorklist();
      predict({ image_id: entry.image_id }, entry.name);
    });
    item.append(button);
    list.append(item);
    authedImage(entry.image_url).then((image) => { img.src = image.src; }).catch(() => {});
  }
}

async function predict(input, name = "") {
  say("feedback-status", "Predicting...");
  try {
    const result = await post("/api/predict", formOf(input));
    await show(await decodePrediction(result), name);
    if (window.matchMedia("(max-width: 1100px)").matches) $("view").scrollIntoView();
    say("feedback-status", "");
    return result;
  } catch (error) {
    say("feedback-status", `Could not predict: ${error.message}`, true);
    return null;
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
  const photo = await authedImage(result.original_url);
  return { ...result, saliency, photo };
}

// ------------------------------------------------------------------ drawing the explanation
// viridis (matplotlib), 9 stops: perceptually uniform and colour-blind safe
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 82, 139], [44, 114, 142], [33, 145, 140],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

function viridis(v) {
  const x = Math.min(1, Math.max(0, v)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const t = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + t * (VIRIDIS[i + 1][k] - c)));
}

function heatCanvas(p) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = p.size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(p.size, p.size);
  p.saliency.forEach((v, i) => { image.data.set([...viridis(v), 255], 4 * i); });
  context.putImageData(image, 0, 0);
  return canvas;
}

// Marching squares: segments of the 0.5 level line, in model pixel units (centres at +0.5).
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

function drawContour(context, p, sx, sy, values = p.saliency, colour = "#ffe600") {
  context.lineCap = "round";
  for (const [width, stroke] of [[4, "rgba(0,0,0,0.7)"], [2, colour]]) {
    context.beginPath();
    for (const [[x0, y0], [x1, y1]] of contourSegments(values, p.size)) {
      context.moveTo(x0 * sx, y0 * sy);
      context.lineTo(x1 * sx, y1 * sy);
    }
    context.lineWidth = width;
    context.strokeStyle = stroke;
    context.stroke();
  }
}

// The original with the explanation over it, aspect ratio kept, `width` px wide.
function composite(canvas, p, region = null, width = 320, opacity = 0.45) {
  canvas.width = width;
  canvas.height = Math.round((width * p.height) / p.width);
  const context = canvas.getContext("2d");
  context.drawImage(p.photo, 0, 0, canvas.width, canvas.height);
  context.globalAlpha = opacity;
  context.drawImage(heatCanvas(p), 0, 0, canvas.width, canvas.height);
  context.globalAlpha = 1;
  const sx = canvas.width / p.size, sy = canvas.height / p.size;
  drawContour(context, p, sx, sy);
  if (region) drawContour(context, p, sx, sy, region, "#ff2bd6");
}

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1)} %`;
}

async function show(p, name = "") {
  state.shown = p;
  $("version-notice").hidden = true;
  $("view-empty").hidden = true;
  $("view").hidden = false;
  $("image-name").textContent = name ? `· ${name}` : "";
  $("photo").src = p.photo.src;
  const heat = $("heat");
  heat.width = heat.height = p.size;
  heat.getContext("2d").drawImage(heatCanvas(p), 0, 0);
  for (const id of ["paint", "ignore-layer"]) {
    $(id).width = p.width;
    $(id).height = p.height;
  }
  state.undo = [];
  state.redo = [];
  fitView();
  applyViewControls();
  for (const thumb of document.querySelectorAll(".thumb")) {
    const current = thumb.dataset.imageId === p.image_id;
    thumb.classList.toggle("current", current);
    thumb.setAttribute("aria-current", current ? "true" : "false");
  }

  $("prediction").hidden = false;
  $("predicted-class").textContent = p.predicted;
  $("predicted-prob").textContent = percent(p.probabilities[p.predicted]);
  $("predicted-version").textContent = `model version ${p.version}`;
  $("prediction").classList.toggle("uncertain", p.warnings.length > 0);
  const warnings = $("warnings");
  warnings.replaceChildren(...p.warnings.map((text) => {
    const line = document.createElement("p");
    line.textContent = `⚠ ${text}`;
    return line;
  }));
  if (p.warnings.length && p.familiarity && p.familiarity.features != null) {
    // the engineer's numbers, one click away
    const f = p.familiarity;
    warnings.append(numbersDetails(
      `feature distance ${f.features.toFixed(1)} (flagged above ${f.features_threshold.toFixed(1)}), ` +
      `image-statistics distance ${f.image.toFixed(1)} (above ${f.image_threshold.toFixed(1)}), top class ${percent(p.probabilities[p.predicted])}`));
  }
  warnings.hidden = p.warnings.length === 0;
  const rows = Object.entries(p.probabilities).map(([cls, prob]) => {
    const row = document.createElement("tr");
    if (cls === p.predicted) row.className = "top-class";
    row.innerHTML = `<th scope="row"></th><td class="bar"><span aria-hidden="true"></span></td><td class="value"></td>`;
    row.querySelector("th").textContent = cls;
    row.querySelector(".bar span").style.width = `${(100 * prob).toFixed(1)}%`;
    row.querySelector(".value").textContent = percent(prob);
    return row;
  });
  $("probs").tBodies[0].replaceChildren(...rows);

  const classes = $("classes");
  classes.replaceChildren();
  for (const cls of Object.keys(p.probabilities)) {
    const label = document.createElement("label");
    label.className = "check";
    label.innerHTML = `<input type="radio" name="label" required> <span></span>`;
    label.querySelector("input").value = cls;
    label.querySelector("input").checked = cls === p.predicted;
    label.querySelector("span").textContent = cls;
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
  const showMasks = $("show-mask").checked;
  const outlines = $("outline-only").checked;
  for (const id of ["paint", "ignore-layer"]) $(id).style.visibility = showMasks && !outlines ? "visible" : "hidden";
  $("outline").hidden = !(showMasks && outlines);
  if (showMasks && outlines) drawOutlines();
  $("brush-value").textContent = `${$("brush").value} px`;
}

function setVersionBadge(version) {
  const badge = $("version-badge");
  badge.hidden = false;
  badge.textContent = `Model version ${version}`;
}

// ------------------------------------------------------------------ zoom and pan
// The layers are sized to fit the stage (aspect ratio kept) and moved with one CSS transform,
// translate(tx, ty) scale(s); every layer, the paint canvases included, moves together, so a
// pointer maps to the same image pixel on all of them.
function fitView() {
  const p = state.shown;
  if (!p) return;
  const stage = $("stage");
  const maxW = stage.parentElement.clientWidth;
  const maxH = Math.max(240, Math.min(window.innerHeight * 0.7, 760));
  const k = Math.min(maxW / p.width, maxH / p.height);
  state.view = { s: 1, tx: 0, ty: 0, w: Math.round(p.width * k), h: Math.round(p.height * k) };
  stage.style.width = `${state.view.w}px`;
  stage.style.height = `${state.view.h}px`;
  const layers = $("layers");
  layers.style.width = `${state.view.w}px`;
  layers.style.height = `${state.view.h}px`;
  const contour = $("contour");
  const dpr = window.devicePixelRatio || 1;
  contour.width = Math.round(state.view.w * dpr * 2);
  contour.height = Math.round(state.view.h * dpr * 2);
  drawContour(contour.getContext("2d"), p, contour.width / p.size, contour.height / p.size);
  applyTransform();
}

function applyTransform() {
  const v = state.view;
  v.tx = Math.min(0, Math.max(v.w * (1 - v.s), v.tx));
  v.ty = Math.min(0, Math.max(v.h * (1 - v.s), v.ty));
  $("layers").style.transform = `translate(${v.tx}px, ${v.ty}px) scale(${v.s})`;
  $("zoom-value").textContent = `${Math.round(100 * v.s)} %`;
}

function zoomAt(factor, cx = state.view.w / 2, cy = state.view.h / 2) {
  const v = state.view;
  const s = Math.min(16, Math.max(1, v.s * factor));
  v.tx = cx - ((cx - v.tx) * s) / v.s;
  v.ty = cy - ((cy - v.ty) * s) / v.s;
  v.s = s;
  applyTransform();
}

// ------------------------------------------------------------------ painting
const layer = (which) => $(which === "ignore" ? "ignore-layer" : "paint");
const ctx = (canvas) => canvas.getContext("2d", { willReadFrequently: true });
const tool = () => document.querySelector("input[name=tool]:checked").value;

function setTool(value) {
  document.querySelector(`input[name=tool][value=${value}]`).checked = true;
  updateCursorLook();
}

// Fill and lasso paint the region chosen beside them (keep unless the user picks ignore), never
// silently the layer of whichever brush was used last.
const fillInto = () => document.querySelector("input[name=into]:checked").value;

function snapshot() {
  const p = state.shown;
  return ["paint", "ignore-layer"].map((id) => ctx($(id)).getImageData(0, 0, p.width, p.height));
}

function restore(shot) {
  ["paint", "ignore-layer"].forEach((id, k) => ctx($(id)).putImageData(shot[k], 0, 0));
  afterEdit();
}

function pushUndo() {
  state.undo.push(snapshot());
  if (state.undo.length > MAX_UNDO) state.undo.shift();
  state.redo = [];
}

function undo() {
  if (!state.undo.length) return;
  state.redo.push(snapshot());
  restore(state.undo.pop());
}

function redo() {
  if (!state.redo.length) return;
  state.undo.push(snapshot());
  restore(state.redo.pop());
}

function afterEdit() {
  if ($("outline-only").checked) drawOutlines();
}

function toImage(event) {
  const box = $("paint").getBoundingClientRect();
  const p = state.shown;
  return [((event.clientX - box.left) * p.width) / box.width, ((event.clientY - box.top) * p.height) / box.height];
}

// The brush is sized in screen pixels, so zooming in paints finer.
function brushInImage() {
  return (Number($("brush").value) * state.shown.width) / $("paint").getBoundingClientRect().width;
}

// A press without a move is a dot, drawn as a disc: browsers disagree on whether a zero-length
// line with round caps paints anything (Chromium 150 does, 156 does not).
function stroke(from, to) {
  const erase = tool() === "erase";
  const targets = erase ? ["paint", "ignore-layer"] : [tool() === "ignore" ? "ignore-layer" : "paint"];
  const width = brushInImage();
  const dot = from[0] === to[0] && from[1] === to[1];
  for (const id of targets) {
    const context = ctx($(id));
    context.globalCompositeOperation = erase ? "destination-out" : "source-over";
    context.strokeStyle = context.fillStyle = id === "paint" ? KEEP_COLOUR : IGNORE_COLOUR;
    context.lineCap = context.lineJoin = "round";
    context.lineWidth = width;
    context.beginPath();
    if (dot) {
      context.arc(from[0], from[1], width / 2, 0, 2 * Math.PI);
      context.fill();
    } else {
      context.moveTo(...from);
      context.lineTo(...to);
      context.stroke();
    }
  }
}

// Fill the unpainted area around (x, y) that the layer's painted pixels enclose (4-connected).
function fillAt([x, y], which) {
  const p = state.shown;
  const canvas = layer(which);
  const context = ctx(canvas);
  const image = context.getImageData(0, 0, p.width, p.height);
  const data = image.data;
  const W = p.width, H = p.height;
  x = Math.floor(x); y = Math.floor(y);
  if (x < 0 || y < 0 || x >= W || y >= H || data[4 * (y * W + x) + 3] > 127) return false;
  const colour = which === "ignore" ? [0, 229, 255, 255] : [255, 43, 214, 255];
  const seen = new Uint8Array(W * H);
  const stack = [y * W + x];
  seen[y * W + x] = 1;
  while (stack.length) {
    const i = stack.pop();
    data.set(colour, 4 * i);
    const cx = i % W;
    for (const j of [i - W, i + W, cx > 0 ? i - 1 : -1, cx < W - 1 ? i + 1 : -1]) {
      if (j >= 0 && j < W * H && !seen[j] && data[4 * j + 3] <= 127) {
        seen[j] = 1;
        stack.push(j);
      }
    }
  }
  context.putImageData(image, 0, 0);
  return true;
}

// The lasso: a freehand outline, closed and filled into the chosen region on release.
function fillPolygon(points, which) {
  if (points.length < 3) return;
  pushUndo();
  const context = ctx(layer(which));
  context.globalCompositeOperation = "source-over";
  context.fillStyle = which === "ignore" ? IGNORE_COLOUR : KEEP_COLOUR;
  context.beginPath();
  context.moveTo(...points[0]);
  for (const point of points.slice(1)) context.lineTo(...point);
  context.closePath();
  context.fill();
  $("show-mask").checked = true;
  applyViewControls();
  afterEdit();
}

function drawLassoPreview(points) {
  const canvas = $("outline");
  const p = state.shown;
  if (!points.length) {
    applyViewControls();
    return;
  }
  canvas.hidden = false;
  canvas.width = p.width;
  canvas.height = p.height;
  const context = canvas.getContext("2d");
  context.lineWidth = Math.max(1, p.width / 400);
  context.strokeStyle = fillInto() === "ignore" ? IGNORE_COLOUR : KEEP_COLOUR;
  context.setLineDash([4 * context.lineWidth, 3 * context.lineWidth]);
  context.beginPath();
  context.moveTo(...points[0]);
  for (const point of points.slice(1)) context.lineTo(...point);
  context.stroke();
}

function drawOutlines() {
  const p = state.shown;
  if (!p) return;
  const out = $("outline");
  const k = Math.min(1, 1024 / Math.max(p.width, p.height));
  const W = Math.max(1, Math.round(p.width * k)), H = Math.max(1, Math.round(p.height * k));
  out.width = W; out.height = H;
  const result = out.getContext("2d").createImageData(W, H);
  for (const [id, colour] of [["paint", [255, 43, 214, 255]], ["ignore-layer", [0, 229, 255, 255]]]) {
    const small = document.createElement("canvas");
    small.width = W; small.height = H;
    small.getContext("2d").drawImage($(id), 0, 0, W, H);
    const a = small.getContext("2d").getImageData(0, 0, W, H).data;
    const on = (x, y) => x >= 0 && y >= 0 && x < W && y < H && a[4 * (y * W + x) + 3] > 127;
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        if (on(x, y) && !(on(x - 1, y) && on(x + 1, y) && on(x, y - 1) && on(x, y + 1))) {
          result.data.set(colour, 4 * (y * W + x));
        }
      }
    }
  }
  out.getContext("2d").putImageData(result, 0, 0);
}

function updateCursorLook() {
  const stage = $("stage");
  const t = tool();
  stage.dataset.tool = state.spaceDown ? "pan" : t;
  $("brush-cursor").classList.toggle("erase", t === "erase");
  $("brush-cursor").classList.toggle("ignore", t === "ignore");
}

function moveCursor(event) {
  const cursor = $("brush-cursor");
  const t = state.spaceDown ? "pan" : tool();
  const painting = ["keep", "ignore", "erase"].includes(t) && event.pointerType !== "touch";
  cursor.hidden = !painting;
  if (!painting) return;
  const box = $("stage").getBoundingClientRect();
  const d = Number($("brush").value);
  cursor.style.width = cursor.style.height = `${d}px`;
  cursor.style.transform = `translate(${event.clientX - box.left - d / 2}px, ${event.clientY - box.top - d / 2}px)`;
}

function setUpStage() {
  const stage = $("stage");
  const pointers = new Map();
  let mode = null; // "paint" | "pan" | "pinch"
  let last = null;
  let pinch = null;
  let lasso = []; // the lasso's points (image px), closed and filled on release
  const canEdit = () => state.shown && state.me && state.me.role !== "viewer";
  // two fingers: their distance and midpoint (stage px); zoom follows the distance, pan the midpoint
  const pinchOf = () => {
    const [[x0, y0], [x1, y1]] = [...pointers.values()];
    const box = stage.getBoundingClientRect();
    return { d: Math.hypot(x1 - x0, y1 - y0), cx: (x0 + x1) / 2 - box.left, cy: (y0 + y1) / 2 - box.top };
  };

  stage.addEventListener("pointerdown", (event) => {
    if (!state.shown) return;
    try {
      stage.setPointerCapture(event.pointerId);
    } catch (_) { /* a pointer the browser no longer tracks: no capture needed */ }
    pointers.set(event.pointerId, [event.clientX, event.clientY]);
    if (pointers.size === 2) {
      if (mode === "paint") undo(); // the first finger began a stroke; it was a pinch
      mode = "pinch";
      pinch = pinchOf();
      return;
    }
    if (pointers.size > 2) return;
    const t = tool();
    if (t === "pan" || state.spaceDown || event.button === 1 || !canEdit()) {
      mode = "pan";
      last = [event.clientX, event.clientY];
    } else if (t === "lasso") {
      mode = "lasso";
      lasso = [toImage(event)];
    } else if (t === "fill") {
      pushUndo();
      if (!fillAt(toImage(event), fillInto())) state.undo.pop();
      $("show-mask").checked = true;
      applyViewControls();
      mode = null;
    } else {
      pushUndo();
      $("show-mask").checked = true;
      applyViewControls();
      mode = "paint";
      last = toImage(event);
      stroke(last, last);
    }
  });
  stage.addEventListener("pointermove", (event) => {
    moveCursor(event);
    if (!pointers.has(event.pointerId)) return;
    pointers.set(event.pointerId, [event.clientX, event.clientY]);
    if (mode === "pinch" && pointers.size === 2) {
      const now = pinchOf();
      if (pinch) {
        state.view.tx += now.cx - pinch.cx;
        state.view.ty += now.cy - pinch.cy;
        zoomAt(now.d / Math.max(1, pinch.d), now.cx, now.cy);
      }
      pinch = now;
    } else if (mode === "pan") {
      state.view.tx += event.clientX - last[0];
      state.view.ty += event.clientY - last[1];
      last = [event.clientX, event.clientY];
      applyTransform();
    } else if (mode === "paint") {
      const point = toImage(event);
      stroke(last, point);
      last = point;
    } else if (mode === "lasso") {
      lasso.push(toImage(event));
      drawLassoPreview(lasso);
    }
  });
  const end = (event) => {
    pointers.delete(event.pointerId);
    if (mode === "paint") afterEdit();
    if (mode === "lasso") {
      fillPolygon(lasso, fillInto());
      lasso = [];
      drawLassoPreview(lasso);
    }
    if (pointers.size === 0) mode = null;
  };
  stage.addEventListener("pointerup", end);
  stage.addEventListener("pointercancel", end);
  stage.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
  stage.addEventListener("wheel", (event) => {
    if (!state.shown) return;
    event.preventDefault();
    const box = stage.getBoundingClientRect();
    zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });

  for (const input of document.querySelectorAll("input[name=tool]")) {
    input.addEventListener("change", updateCursorLook);
  }
  $("zoom-in").addEventListener("click", () => zoomAt(1.5));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5));
  $("zoom-fit").addEventListener("click", () => { state.view.s = 1; applyTransform(); });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("clear").addEventListener("click", () => {
    pushUndo();
    for (const id of ["paint", "ignore-layer"]) ctx($(id)).clearRect(0, 0, $(id).width, $(id).height);
    afterEdit();
  });
  $("from-model").addEventListener("click", () => {
    const p = state.shown;
    if (!p) return;
    pushUndo();
    const small = document.createElement("canvas");
    small.width = small.height = p.size;
    const context = small.getContext("2d");
    const image = context.createImageData(p.size, p.size);
    p.saliency.forEach((v, i) => { if (v >= 0.5) image.data.set([255, 43, 214, 255], 4 * i); });
    context.putImageData(image, 0, 0);
    const target = ctx($("paint"));
    target.globalCompositeOperation = "source-over";
    target.clearRect(0, 0, p.width, p.height);
    target.imageSmoothingEnabled = false;
    target.drawImage(small, 0, 0, p.width, p.height);
    $("show-mask").checked = true;
    applyViewControls();
  });
  // refit when the column's width changes (window resize, a scrollbar appearing)
  let width = 0;
  new ResizeObserver(() => {
    const now = $("view").clientWidth;
    if (state.shown && now && now !== width) fitView();
    width = now;
  }).observe($("view"));
}

// ------------------------------------------------------------------ masks
// The model pixel (i, j) shows original pixel (floor((2i+1)H / 2S), floor((2j+1)W / 2S)): the
// server's map (service/originals.py). The page uses it only to compare regions; the masks it
// sends are at the original's size and the server maps them.
function sourceIndex(n, size) {
  return Array.from({ length: size }, (_, i) => Math.floor(((2 * i + 1) * n) / (2 * size)));
}

function painted(which) {
  const p = state.shown;
  const alpha = ctx(layer(which)).getImageData(0, 0, p.width, p.height).data;
  let any = false;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i] > 127) { any = true; break; }
  return any ? alpha : null;
}

async function maskOf(which) {
  const p = state.shown;
  const alpha = painted(which);
  if (!alpha) return null;
  const out = document.createElement("canvas");
  out.width = p.width;
  out.height = p.height;
  const context = out.getContext("2d");
  const mask = context.createImageData(p.width, p.height);
  for (let i = 0; i < p.width * p.height; i++) {
    const v = alpha[4 * i + 3] > 127 ? 255 : 0;
    mask.data[4 * i] = mask.data[4 * i + 1] = mask.data[4 * i + 2] = v;
    mask.data[4 * i + 3] = 255;
  }
  context.putImageData(mask, 0, 0);
  const rows = sourceIndex(p.height, p.size), cols = sourceIndex(p.width, p.size);
  const region = new Float32Array(p.size * p.size);
  for (let i = 0; i < p.size; i++) {
    for (let j = 0; j < p.size; j++) region[i * p.size + j] = alpha[4 * (rows[i] * p.width + cols[j]) + 3] > 127 ? 1 : 0;
  }
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  return { blob, region };
}

function iou(saliency, region) {
  let both = 0, either = 0;
  for (let i = 0; i < region.length; i++) {
    const a = saliency[i] >= 0.5, b = region[i] > 0;
    both += a && b;
    either += a || b;
  }
  return either ? both / either : 0;
}

// ------------------------------------------------------------------ feedback
async function onAgree() {
  if (!state.shown) return;
  if (painted("keep") || painted("ignore")) {
    const choice = await ask(
      "You painted a region but pressed Agree. Agree means the model's region is right. What should be sent?",
      [["region", "The class is right; learn my region", true],
        ["agree", "Agree, and discard my painting"],
        ["cancel", "Cancel"]],
    );
    if (choice === "region") return sendFeedback({ label: state.shown.predicted });
    if (choice !== "agree") return;
  }
  return sendFeedback({ agree: true });
}

async function onSubmit(andNext = false) {
  if (!state.shown) return;
  const label = document.querySelector("input[name=label]:checked").value;
  if (isTouch()) {
    const choice = await ask(`Send this feedback (${label})? You can withdraw it for a short while under "My recent feedback"; after that the next update learns from it.`,
      [["send", "Send", true], ["cancel", "Cancel"]]);
    if (choice !== "send") return;
  }
  await sendFeedback({ label }, andNext);
}

async function sendFeedback({ agree = false, label = null }, andNext = false) {
  if (state.sending) return;
  const p = state.shown;
  const form = formOf({ image_id: p.image_id, shown_version: p.version, predicted: p.predicted });
  let region = null;
  if (agree) {
    form.append("agree", "true");
  } else {
    form.append("label", label);
    const keep = await maskOf("keep");
    const ignore = await maskOf("ignore");
    if (keep) form.append("mask", keep.blob, "mask.png");
    if (ignore) form.append("ignore_mask", ignore.blob, "ignore.png");
    region = keep ? keep.region : null;
  }
  // feedback of mine on this image that no update has used yet: edit it (replace) or add to it
  const earlier = [...state.mine.values()].map((r) => r.item)
    .filter((i) => i.image_id === p.image_id && i.status === "pending");
  if (earlier.length) {
    const said = earlier.map((i) => `#${i.id}: ${i.agree ? "agree" : i.label}`).join(", ");
    const choice = await ask(`You already gave feedback on this image (${said}), not learnt yet. Replace it with this one, or keep both?`,
      [["replace", "Replace", true], ["keep_both", "Keep both"], ["cancel", "Cancel"]]);
    if (choice !== "replace" && choice !== "keep_both") {
      say("feedback-status", "Not sent: your earlier feedback on this image stays.");
      return;
    }
    form.append("on_conflict", choice);
  }
  state.sending = true;
  try {
    let item;
    try {
      item = await post("/api/feedback", form);
      if (earlier.length) await loadMine(); // the replaced items are withdrawn now
    } catch (error) {
      if (error.status !== 409 || !error.message.startsWith("you gave this image another class")) throw error;
      // the same image with another class from you before: say so and let the clinician choose
      const earlier = error.message.split(": ")[1].split("; ")[0];
      const choice = await ask(`You gave this image another class before (${earlier}). Replace that with ${agree ? p.predicted : label}, or keep both for review?`,
        [["replace", "Replace", true], ["keep_both", "Keep both"], ["cancel", "Cancel"]]);
      if (choice !== "replace" && choice !== "keep_both") {
        say("feedback-status", "Not sent: your earlier feedback on this image stays.");
        return;
      }
      form.append("on_conflict", choice);
      item = await post("/api/feedback", form);
      await loadMine();
    }
    state.mine.set(item.id, { item, before: p, region, label: item.label, agree });
    renderMine();
    say("feedback-status", `Feedback #${item.id} stored; it waits for the next update. You can go on.` +
      (item.notes && item.notes.length ? ` Note: ${item.notes.join(" ")}` : ""));
    const entry = currentEntry();
    if (entry && entry.image_id === p.image_id) {
      await markEntry(entry, { state: "feedback", feedback_id: item.id });
    }
    if (andNext) await moveBy(1);
  } catch (error) {
    say("feedback-status", `Not stored: ${error.message}`, true);
  } finally {
    state.sending = false;
  }
}

async function loadMine() {
  // my feedback from earlier visits: listed (and withdrawable, propagatable) after a reload
  try {
    const items = await api("/api/feedback?limit=6");
    for (const item of items.reverse()) {
      const known = state.mine.get(item.id);
      if (known) known.item = item; // its status may have changed (withdrawn, learnt)
      else if (item.user === state.me.name) {
        state.mine.set(item.id, { item, before: null, region: null, label: item.label, agree: item.agree });
      }
    }
    renderMine();
  } catch (_) { /* the list stays as it is */ }
}

function renderMine() {
  const list = $("mine");
  const items = [...state.mine.values()].slice(-6).reverse();
  $("mine-title").hidden = items.length === 0;
  list.replaceChildren(...items.map(({ item }) => {
    const li = document.createElement("li");
    const text = document.createElement("span");
    const what = item.agree ? "agree" : item.label;
    const until = item.learn_after ? new Date(item.learn_after) : null;
    const open = until && until > new Date();
    const where = item.status === "pending"
      ? (open ? `not learnt yet; you can withdraw it until ${until.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })}`
        : "not learnt yet; the next update will take it")
      : item.status === "withdrawn" ? "withdrawn"
        : item.update_status === "promoted" ? (item.now_predicted == null ? `learnt: model version ${item.update_version} uses it`
          : item.now_predicted === item.label ? `learnt: the model now agrees with you (${item.label}, version ${item.update_version})`
            : `learnt, but the model still says ${item.now_predicted} (version ${item.update_version})`)
          : item.update_status === "rejected" ? `not learnt: the update that tried it did not pass the safety check (version ${item.update_version})`
            : `being learnt (version ${item.update_version})`;
    text.textContent = `#${item.id} ${what}: ${where}`;
    li.append(text);
    if (item.ignore_mask_url && !item.propagated_from && state.me.role !== "viewer") {
      const find = document.createElement("button");
      find.type = "button";
      find.textContent = "Find more like this";
      find.setAttribute("aria-label", `Find more images like feedback #${item.id}`);
      find.addEventListener("click", () => findSimilar(item.id));
      li.append(" ", find);
    }
    if (item.status === "pending") {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Withdraw";
      button.setAttribute("aria-label", `Withdraw feedback #${item.id}`);
      button.addEventListener("click", () => withdraw(item.id));
      li.append(" ", button);
    }
    return li;
  }));
}

async function withdraw(id) {
  try {
    const item = await api(`/api/feedback/${id}`, { method: "DELETE" });
    state.mine.get(id).item = item;
    say("feedback-status", `Feedback #${id} withdrawn; no update will learn from it.`);
  } catch (error) {
    say("feedback-status", `Could not withdraw #${id}: ${error.message}`, true);
  }
  renderMine();
}

// ------------------------------------------------------------------ one mark, many images
// A chain of rounds: the source mark, then "Find more like these" asks again from the source and
// the newest accepted proposals (at most MAX_MARKS marks, as propagate.round_marks chooses them),
// leaving out every image already reviewed (accepted, or proposed and left unticked).
const MAX_MARKS = 50;
const similar = {
  source: null, version: null, proposals: [], ticked: new Set(), chain: [], reviewed: new Set(),
};

function findSimilar(id) {
  Object.assign(similar, { source: id, chain: [], reviewed: new Set() });
  return lookForSimilar();
}

async function lookForSimilar() {
  $("similar").hidden = false;
  $("similar-more").hidden = true;
  $("similar-grid").replaceChildren();
  say("similar-summary", "Looking for the same artifact in the other images…");
  const items = [similar.source, ...similar.chain.slice(-(MAX_MARKS - 1))];
  const body = { items, exclude: [...similar.reviewed], limit: 100 };
  if (state.worklist) body.worklist = state.worklist.id;
  const from = similar.chain.length
    ? ` from #${similar.source} and ${items.length - 1} accepted image(s), leaving out the ${similar.reviewed.size} reviewed`
    : "";
  try {
    const got = await api("/api/proposals", jsonBody("POST", body));
    Object.assign(similar, { version: got.version, proposals: got.proposals });
    similar.found = `${got.proposed} more image(s) look like this at a score of ${got.threshold.toFixed(2)} or more${from} (${got.scored} looked at; the ${got.proposals.length} most alike are shown)`;
    $("similar-threshold").value = got.threshold;
    await renderSimilar();
    tickFrom(got.threshold);
    $("similar").scrollIntoView({ block: "start" });
  } catch (error) {
    say("similar-summary", `Could not look: ${error.message}`, true);
  }
}

function tickFrom(threshold) {
  $("similar-threshold-value").textContent = Number(threshold).toFixed(2);
  similar.ticked = new Set(similar.proposals
    .filter((p) => p.score >= threshold && p.outlined)
    .map((p) => p.image_id));
  for (const button of $("similar-grid").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(similar.ticked.has(button.dataset.id)));
  }
  updateAcceptButton();
}

function updateAcceptButton() {
  if (similar.proposals.length) {
    say("similar-summary", `${similar.found}. ${similar.ticked.size} ticked.`);
  }
  $("similar-accept").textContent = `Accept the ${similar.ticked.size} ticked`;
  $("similar-accept").disabled = similar.ticked.size === 0;
}

async function outlinedThumb(p) {
  const [photo, mask] = await Promise.all([authedImage(p.image_url), loadImage(p.mask_png)]);
  const canvas = document.createElement("canvas");
  canvas.width = photo.naturalWidth;
  canvas.height = photo.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(mask, 0, 0, canvas.width, canvas.height);
  const m = context.getImageData(0, 0, canvas.width, canvas.height);
  context.drawImage(photo, 0, 0);
  const out = context.getImageData(0, 0, canvas.width, canvas.height);
  const w = canvas.width;
  const inside = (i) => m.data[4 * i] > 127;
  for (let i = 0; i < w * canvas.height; i++) {
    const x = i % w;
    const edge = inside(i) && (x === 0 || x === w - 1 || !inside(i - 1) || !inside(i + 1)
      || !inside(i - w) || !inside(i + w));
    if (edge) out.data.set([0, 229, 255, 255], 4 * i);
  }
  context.putImageData(out, 0, 0);
  return canvas;
}

async function renderSimilar() {
  const items = await Promise.all(similar.proposals.map(async (p) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = p.image_id;
    button.disabled = !p.outlined;
    button.setAttribute("aria-pressed", String(similar.ticked.has(p.image_id)));
    button.setAttribute("aria-label", `score ${p.score.toFixed(2)}${p.outlined ? "" : ", nothing outlined"}`);
    button.addEventListener("click", () => {
      if (similar.ticked.has(p.image_id)) similar.ticked.delete(p.image_id);
      else similar.ticked.add(p.image_id);
      button.setAttribute("aria-pressed", String(similar.ticked.has(p.image_id)));
      updateAcceptButton();
    });
    const label = document.createElement("span");
    label.textContent = p.score.toFixed(2);
    try {
      button.append(await outlinedThumb(p), label);
    } catch (_) {
      button.append(label);
    }
    li.append(button);
    return li;
  }));
  $("similar-grid").replaceChildren(...items);
  updateAcceptButton();
}

async function acceptSimilar() {
  const chosen = similar.proposals.filter((p) => similar.ticked.has(p.image_id));
  if (!chosen.length) return;
  const threshold = Number($("similar-threshold").value);
  // reviewed: the accepted ones, and the ones offered (at or above the slider) left unticked
  const offered = similar.proposals.filter((p) => p.outlined && p.score >= threshold);
  const body = {
    items: [similar.source],
    shown_version: similar.version,
    accepted: chosen.map((p) => ({ image_id: p.image_id, mask_base64: p.mask_png })),
  };
  $("similar-accept").disabled = true;
  try {
    const items = await api("/api/proposals/accept", jsonBody("POST", body));
    for (const item of items) state.mine.set(item.id, { item, before: null, region: null, label: item.label, agree: false });
    for (const p of [...chosen, ...offered]) similar.reviewed.add(p.image_id);
    for (const item of items) if (!similar.chain.includes(item.id)) similar.chain.push(item.id);
    renderMine();
    $("similar-grid").replaceChildren();
    similar.proposals = [];
    similar.ticked = new Set();
    $("similar-more").hidden = false;
    say("similar-summary", `${items.length} image(s) added as your "must not matter" feedback, found from #${similar.source}. They wait for the next update; each can be withdrawn below. "Find more like these" looks again from your mark and the ${similar.chain.length} accepted.`);
  } catch (error) {
    say("similar-summary", `Not stored: ${error.message}`, true);
    updateAcceptButton();
  }
}

function closeSimilar() {
  $("similar").hidden = true;
  $("similar-more").hidden = true;
  $("similar-grid").replaceChildren();
  Object.assign(similar, { proposals: [], ticked: new Set(), chain: [], reviewed: new Set() });
}

// ------------------------------------------------------------------ following updates
let polling = false;

async function poll() {
  if (polling || !state.me) return;
  polling = true;
  warnExpiry();
  state.polls = (state.polls || 0) + 1;
  if (state.polls % 20 === 0) loadWorklists().catch(() => {}); // ~30 s: new worklists appear
  try {
    await refreshStatus();
    for (const [id, record] of state.mine) {
      if (record.item.status !== "pending") continue;
      const item = await api(`/api/feedback/${id}`);
      record.item = item;
      if (item.status === "used") {
        renderMine();
        if (record.before) await showOutcome(record); // accepted proposals: no shown answer
        if (state.me.role === "admin") await loadVersions();
      }
    }
  } catch (_) { /* the next poll tries again */ } finally {
    polling = false;
  }
}

async function refreshStatus() {
  const status = await api("/api/update/status");
  setVersionBadge(status.current_version);
  noticeNewVersion(status.current_version);
  let text;
  if (!status.enabled) text = `${status.pending} waiting; ${status.message}`;
  else if (status.phase === "training") text = `Learning from ${status.training_items} item(s): step ${status.step} of ${status.steps}` + (status.pending > status.training_items ? `; ${status.pending - status.training_items} more queued` : "");
  else if (status.phase === "checking") text = "Checking the new version on the check images before it is used";
  else if (status.phase === "queued") text = `${status.pending} item(s) queued for the next update`;
  else text = "Up to date";
  const last = status.last_update;
  if (last && status.phase !== "training" && status.phase !== "checking") {
    text += last.status === "promoted" ? `; last update: version ${last.id} is in use`
      : last.status === "rejected" ? `; last update: not taken (the model got worse on the check images)` : "";
    if (last.regressions.length && state.me.role === "admin") text += ` (⚠ ${last.regressions.join(", ")})`;
  }
  if (status.last_error) text += `; last error: ${status.last_error}`;
  const bar = $("update-state");
  bar.hidden = false;
  bar.textContent = text;
  bar.dataset.phase = status.phase;
  bar.title = last ? `Version ${last.id}: ${last.reason}` : "";
  if (state.me.role === "admin") {
    $("update-info").textContent = `${status.pending} pending; ${status.message}`;
    $("learning").textContent = learningWords(status.learning);
  }
  return status;
}

const fmt = (v) => (typeof v === "number" ? v.toFixed(3) : "–");

// How updates learn (serve's --lambda, --explanation-loss, --surroundings-loss, --ignore-loss, --cam).
function learningWords(l) {
  if (!l || l.lam === undefined) return "";
  const keep = `the ${l.explanation_loss} loss` + (l.surroundings_loss ? ` and the ${l.surroundings_loss} loss (decide from the region)` : "");
  const ignore = l.ignore_loss ? `the ${l.ignore_loss} loss on regions marked "must not matter"` : "no loss on ignore marks";
  return `Updates learn with λ = ${l.lam}: ${keep} on regions marked "matters", ${ignore}, explanations by ${l.cam}.`;
}

function validationWords(version) {
  const b = version.parent_metrics, a = version.metrics;
  const parts = [["accuracy", "accuracy"], ["avg_sensitivity", "average sensitivity"], ["jaccard_mean", "Jaccard"]]
    .filter(([key]) => typeof b[key] === "number" && typeof a[key] === "number")
    .map(([key, name]) => `${name} ${fmt(b[key])} → ${fmt(a[key])}`);
  if (!parts.length) return "";
  return `Validation set (what the gate checks), version ${version.parent} → candidate ${version.id}: ${parts.join(", ")}.` +
    (version.regressions.length ? ` ⚠ ${version.regressions.join("; ")}.` : "");
}

// The engineer's numbers behind a clinician's sentence, one click away.
function numbersDetails(text) {
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "Numbers";
  const body = document.createElement("p");
  body.className = "muted";
  body.textContent = text;
  details.append(summary, body);
  return details;
}

// Another update (anyone's) changed the model while this image is shown: say so, offer a redo.
function noticeNewVersion(current) {
  const shown = state.shown;
  const stale = shown && current && shown.version !== current;
  $("version-notice").hidden = !stale;
  if (stale) {
    $("version-notice-text").textContent = `The model has changed (version ${current} is now in use); ` +
      `what you see was explained by version ${shown.version}. Your painting stays if you explain it again.`;
  }
}

async function reExplain() {
  const p = state.shown;
  if (!p) return;
  const shot = snapshot();
  const { undo: u, redo: r } = state;
  try {
    const result = await post("/api/predict", formOf({ image_id: p.image_id }));
    await show(await decodePrediction(result), $("image-name").textContent.replace(/^· /, ""));
    restore(shot); // the clinician's painting stays
    Object.assign(state, { undo: u, redo: r });
  } catch (error) {
    say("feedback-status", `Could not explain it again: ${error.message}`, true);
  }
}

async function showOutcome(record) {
  const { item, before, region, label } = record;
  const version = await api(`/api/versions/${item.update_version}`);
  $("validation-change").textContent = validationWords(version);
  if (item.update_status !== "promoted") {
    $("compare").hidden = false;
    $("outcome").textContent = `Feedback #${item.id}: the model did not take this update, because learning it ` +
      `made the model worse on the images it is checked on. The model is unchanged (version ${before.version} ` +
      `still says ${before.predicted}); your feedback stays on record.`;
    $("outcome").append(numbersDetails(`The check, for the engineer: ${item.update_reason}`));
    $("compare").querySelector(".pair").hidden = true;
    $("compare-note").textContent = "";
    say("feedback-status", `Feedback #${item.id}: not taken this time; the model is unchanged.`);
    return;
  }
  $("compare").querySelector(".pair").hidden = false;
  const after = await decodePrediction(await post("/api/predict", formOf({ image_id: before.image_id })));
  const wanted = label;
  const agreesNow = after.predicted === wanted;
  const agreedBefore = before.predicted === wanted;
  const pct = (p) => `${p.predicted} ${percent(p.probabilities[p.predicted])}`;
  let words = `Feedback #${item.id}: you said ${wanted}. Before, version ${before.version} said ${pct(before)}; ` +
    `now version ${after.version} says ${pct(after)}: `;
  words += agreesNow ? (agreedBefore ? "it still agrees with you." : "it now agrees with you.")
    : (agreedBefore ? "it no longer agrees with you." : "it still disagrees with you.");
  if (region) {
    words += ` Overlap of its 50 % region with yours (IoU): ${iou(before.saliency, region).toFixed(2)} → ${iou(after.saliency, region).toFixed(2)}.`;
  }
  $("outcome").textContent = words;
  $("outcome").hidden = false;
  composite($("before"), before, region);
  composite($("after"), after, region);
  $("before-caption").textContent = `Before: version ${before.version}, ${pct(before)}`;
  $("after-caption").textContent = `After: version ${after.version}, ${pct(after)}`;
  $("compare-note").textContent = "The same image explained (yellow: 50 % contour) before and after your feedback" +
    (region ? "; pink: the region you drew." : ".");
  $("compare").hidden = false; // shown once complete
  say("feedback-status", `Learned: version ${item.update_version} is now current.`);
  // the answer a clinician waits for, at the top of the column they work in (the comparison
  // panel is below the fold at 1440x900); it stays until the next outcome
  $("outcome-brief-text").textContent = `Feedback #${item.id}: ` +
    (agreesNow ? (agreedBefore ? `the model still agrees with you (${wanted}).` : `the model now agrees with you (${wanted}).`)
      : `the model still says ${after.predicted}, not ${wanted}.`);
  $("outcome-brief").hidden = false;
  if (state.shown && state.shown.image_id === before.image_id) {
    // the main view follows the current model; the painted regions stay
    const shot = snapshot();
    const { undo: u, redo: r, view } = state;
    await show(after, $("image-name").textContent.replace(/^· /, ""));
    restore(shot);
    Object.assign(state, { undo: u, redo: r });
    Object.assign(state.view, view);
    applyTransform();
  }
}

// ------------------------------------------------------------------ worklists
async function loadWorklists(select = null) {
  const lists = await api("/api/worklists");
  const choose = $("worklist-select");
  const options = [new Option("No worklist", "")].concat(
    lists.map((w) => new Option(`${w.name} (${w.counts.total - w.counts.new} of ${w.counts.total} seen)`, w.id)),
  );
  const keep = choose.value;
  choose.replaceChildren(...options);
  if (keep && lists.some((w) => String(w.id) === keep)) choose.value = keep;
  // worklists with images nobody has opened yet (one added with `feedbackcam worklist add`
  // included): said at sign-in and whenever the list is refreshed, not left in the menu
  const waiting = lists.filter((w) => w.counts.new > 0);
  $("worklist-hint").hidden = !!state.worklist || waiting.length === 0;
  $("worklist-hint").textContent = waiting.length
    ? `To review: ${waiting.map((w) => `${w.name} (${w.counts.new} new)`).join(", ")}. Choose it above.`
    : "";
  if (select !== null) {
    choose.value = String(select);
    await openWorklist(select);
  } else if (state.worklist) {
    choose.value = String(state.worklist.id);
  }
}

async function openWorklist(id) {
  if (!id) return leaveWorklist();
  $("worklist-hint").hidden = true;
  const w = await api(`/api/worklists/${id}`);
  const start = w.entries.findIndex((e) => e.state === "new");
  state.worklist = { id: w.id, name: w.name, entries: w.entries, counts: w.counts, index: -1 };
  $("submit-next").hidden = false;
  await openEntry(start >= 0 ? start : 0);
}

function leaveWorklist() {
  state.worklist = null;
  $("worklist-select").value = "";
  $("submit-next").hidden = true;
  renderWorklist();
}

function currentEntry() {
  const w = state.worklist;
  return w && w.index >= 0 ? w.entries[w.index] : null;
}

async function openEntry(index) {
  const w = state.worklist;
  if (!w || index < 0 || index >= w.entries.length) return;
  w.index = index;
  renderWorklist();
  const entry = w.entries[index];
  const result = await predict({ original_id: entry.original_id }, entry.name);
  if (result) await markEntry(entry, { state: "reviewed", image_id: result.image_id });
}

async function markEntry(entry, change) {
  if (state.me.role === "viewer") return; // a viewer looks; the worklist's progress is the clinicians'
  const w = state.worklist;
  const updated = await api(`/api/worklists/${w.id}/entries/${entry.id}`, jsonBody("PATCH", change));
  Object.assign(entry, updated);
  w.counts = { new: 0, reviewed: 0, feedback: 0, skipped: 0, total: w.entries.length };
  for (const e of w.entries) w.counts[e.state] += 1;
  renderWorklist();
}

async function moveBy(step) {
  const w = state.worklist;
  if (!w) return;
  const target = w.index + step;
  if (target >= w.entries.length) {
    say("feedback-status", `End of the worklist "${w.name}": ${w.counts.feedback} with feedback, ${w.counts.skipped} skipped.`);
    return;
  }
  await openEntry(Math.max(0, target));
}

async function skip() {
  const entry = currentEntry();
  if (!entry) return;
  if (entry.state !== "feedback") await markEntry(entry, { state: "skipped" });
  await moveBy(1);
}

const STATE_WORDS = { new: "new", reviewed: "seen", feedback: "feedback given", skipped: "skipped" };

function renderWorklist() {
  const w = state.worklist;
  const list = $("worklist-entries");
  $("prev").disabled = $("next").disabled = $("skip").disabled = false;
  if (!w) {
    list.replaceChildren();
    $("worklist-counts").textContent = "";
    for (const id of ["prev", "next", "skip"]) $(id).hidden = true;
    return;
  }
  for (const id of ["prev", "next", "skip"]) $(id).hidden = false;
  const c = w.counts;
  const option = $("worklist-select").selectedOptions[0];
  if (option && option.value === String(w.id)) option.textContent = `${w.name} (${c.total - c.new} of ${c.total} seen)`;
  $("worklist-counts").textContent = `Image ${w.index + 1} of ${c.total} · ${c.new} new · ${c.reviewed} seen · ` +
    `${c.feedback} with feedback · ${c.skipped} skipped`;
  list.replaceChildren(...w.entries.map((e, k) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = `entry state-${e.state}` + (k === w.index ? " current" : "");
    if (k === w.index) button.setAttribute("aria-current", "true");
    button.innerHTML = `<span class="entry-name"></span><span class="entry-state"></span>`;
    button.querySelector(".entry-name").textContent = e.name;
    button.querySelector(".entry-state").textContent = STATE_WORDS[e.state];
    button.addEventListener("click", () => openEntry(k));
    li.append(button);
    return li;
  }));
  // scroll the list only, never the page (on a phone the list is below the image)
  const current = list.querySelector(".current");
  if (current) list.scrollTop = current.offsetTop - (list.clientHeight - current.offsetHeight) / 2;
}

// Files a worklist left out stay listed until dismissed (a status line was overwritten at once).
function showSkipped(skipped) {
  $("worklist-skipped").hidden = skipped.length === 0;
  $("worklist-skipped-text").textContent = skipped.length
    ? `${skipped.length} file(s) were left out of the worklist: ${skipped.join("; ")}` : "";
}

async function uploadWorklist(files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  form.append("name", `${files.length} upload(s) ${new Date().toLocaleString()}`);
  try {
    const made = await post("/api/worklists/upload", form);
    await loadWorklists(made.id);
    showSkipped(made.skipped_files); // after opening the first image, whose status would wipe it
  } catch (error) {
    say("feedback-status", `Could not make a worklist: ${error.message}`, true);
  }
}

async function importFolder(folder) {
  try {
    const made = await api("/api/worklists", jsonBody("POST", { folder }));
    await loadWorklists(made.id);
    showSkipped(made.skipped_files); // after opening the first image, whose status would wipe it
  } catch (error) {
    say("feedback-status", `Could not import: ${error.message}`, true);
  }
}

// ------------------------------------------------------------------ versions (admin)
async function loadVersions() {
  const rows = (await api("/api/versions")).map((v) => {
    const row = document.createElement("tr");
    if (v.current) row.className = "current";
    const b = v.parent_metrics || {};
    const metric = (key) => (typeof b[key] === "number" ? `${fmt(b[key])} → ${fmt(v.metrics[key])}` : fmt(v.metrics[key]));
    const cells = [`${v.id}${v.parent ? ` ← ${v.parent}` : ""}`, v.current ? `${v.status}, current` : v.status,
      metric("accuracy"), metric("avg_sensitivity"), metric("jaccard_mean"), v.reason];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    if (v.regressions.length) {
      row.classList.add("regressed");
      const flag = document.createElement("strong");
      flag.className = "flag";
      flag.textContent = `⚠ ${v.regressions.join("; ")}`;
      row.cells[5].prepend(flag, document.createElement("br"));
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
  const choice = await ask(`Make version ${id} current? Every user gets its answers from now on.`,
    [["yes", `Make version ${id} current`, true], ["cancel", "Cancel"]]);
  if (choice !== "yes") return;
  try {
    await post(`/api/versions/${id}/activate?confirm=true`);
    await Promise.all([loadVersions(), refreshStatus()]);
    if (state.shown) await predict({ image_id: state.shown.image_id });
  } catch (error) {
    say("update-info", `Could not activate: ${error.message}`, true);
  }
}

async function updateNow() {
  try {
    await post("/api/update");
    $("update-info").textContent = "Update started.";
  } catch (error) {
    $("update-info").textContent = error.message;
  }
}

async function downloadExport() {
  try {
    const blob = await api("/api/export.zip");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "feedbackcam-feedback.zip";
    link.click();
  } catch (error) {
    say("update-info", `Could not export: ${error.message}`, true);
  }
}

// ------------------------------------------------------------------ keyboard
function onKey(event) {
  if (!state.me || document.querySelector("dialog[open]")) return;
  const target = event.target;
  const typing = target.matches("input[type=text], input[type=password], input:not([type]), select, textarea");
  if (typing) return;
  const mod = event.ctrlKey || event.metaKey;
  const key = event.key;
  const feedback = state.shown && state.me.role !== "viewer";
  const act = (fn) => { event.preventDefault(); fn(); };
  if (mod && key.toLowerCase() === "z") return act(event.shiftKey ? redo : undo);
  if (mod && key.toLowerCase() === "y") return act(redo);
  if (mod || event.altKey) return;
  if (key === " " && !target.matches("button")) {
    event.preventDefault();
    state.spaceDown = true;
    updateCursorLook();
    return;
  }
  if (key === "Enter" && feedback && !target.matches("button")) return act(() => onSubmit(event.shiftKey && !!state.worklist));
  const brush = $("brush");
  const actions = {
    b: () => setTool("keep"), i: () => setTool("ignore"), e: () => setTool("erase"),
    f: () => setTool("fill"), l: () => setTool("lasso"), h: () => setTool("pan"),
    "[": () => { brush.value = Number(brush.value) - 4; applyViewControls(); },
    "]": () => { brush.value = Number(brush.value) + 4; applyViewControls(); },
    "+": () => zoomAt(1.5), "=": () => zoomAt(1.5), "-": () => zoomAt(1 / 1.5),
    0: () => { state.view.s = 1; applyTransform(); },
    o: () => { $("outline-only").checked = !$("outline-only").checked; applyViewControls(); },
    a: () => feedback && onAgree(),
    n: () => moveBy(1), p: () => moveBy(-1), s: () => skip(),
    "?": () => $("help").showModal(),
  };
  const fn = actions[key.length === 1 ? key.toLowerCase() : key];
  if (fn) act(fn);
}

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("signout").addEventListener("click", signOut);
  $("show-help").addEventListener("click", () => $("help").showModal());
  $("file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) {
      leaveWorklist();
      predict({ file }, file.name);
    }
    event.target.value = "";
  });
  $("worklist-files").addEventListener("change", (event) => {
    const files = [...event.target.files];
    if (files.length) uploadWorklist(files);
    event.target.value = "";
  });
  $("worklist-folder-form").addEventListener("submit", (event) => {
    event.preventDefault();
    importFolder($("worklist-folder").value.trim());
  });
  $("worklist-select").addEventListener("change", (event) => openWorklist(event.target.value));
  $("prev").addEventListener("click", () => moveBy(-1));
  $("next").addEventListener("click", () => moveBy(1));
  $("skip").addEventListener("click", skip);
  for (const id of ["opacity", "show-contour", "show-mask", "outline-only", "brush"]) $(id).addEventListener("input", applyViewControls);
  $("feedback").addEventListener("submit", (event) => {
    event.preventDefault();
    onSubmit(false);
  });
  $("submit-next").addEventListener("click", () => onSubmit(true));
  $("resign-form").addEventListener("submit", (event) => {
    event.preventDefault();
    resume($("resign-token").value.trim());
  });
  $("resign").addEventListener("cancel", (event) => event.preventDefault()); // Esc keeps it open
  $("re-explain").addEventListener("click", reExplain);
  $("outcome-brief-more").addEventListener("click", () => $("compare").scrollIntoView({ behavior: "smooth" }));
  $("worklist-skipped-close").addEventListener("click", () => showSkipped([]));
  $("agree").addEventListener("click", onAgree);
  $("similar-accept").addEventListener("click", acceptSimilar);
  $("similar-close").addEventListener("click", closeSimilar);
  $("similar-more").addEventListener("click", lookForSimilar);
  $("similar-threshold").addEventListener("input", (event) => tickFrom(Number(event.target.value)));
  $("update-now").addEventListener("click", updateNow);
  $("export").addEventListener("click", downloadExport);
  document.addEventListener("keydown", onKey);
  // A button clicked with the pointer gives the focus back: otherwise Enter, Shift+Enter and Space
  // would press it again (Clear clears twice) instead of submitting or panning. A button reached
  // with Tab keeps it (its click has detail 0), so keyboard users still press what they chose.
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (button && event.detail > 0 && !button.closest("dialog")) button.blur();
  });
  document.addEventListener("keyup", (event) => {
    if (event.key === " ") {
      state.spaceDown = false;
      updateCursorLook();
    }
  });
  setUpStage();
  renderWorklist();
  updateCursorLook();
  // a token in the address's fragment (never sent to the server) signs in once, then is removed
  const fromHash = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", window.location.pathname);
  const token = fromHash || state.token;
  if (token) signIn(token);
});
