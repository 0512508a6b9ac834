"use strict";
// The image viewer (/viewer#study=<StudyInstanceUID>): the series the AI analysed, one slice
// at a time at full resolution, windowed here in the browser, with the AI's overlay on top,
// the study's findings and the reader's judgement of each. Data only through the API
// (GET /api/studies/{uid}/viewer, .../series/{series}/pixels/{index} and
// .../overlays/{finding}/{index}); values are shown as text, never parsed as HTML.

let me = null;
function toLogin() { location.href = "/login?next=/viewer" + location.hash; }
async function api(url, options = {}) {
  const opts = {cache: "no-store", ...options, headers: {...(options.headers || {})}};
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = me ? me.csrf_token : "";
    if (opts.body !== undefined) { opts.headers["Content-Type"] = "application/json"; }
  }
  const res = await fetch(url, opts);
  if (res.status === 401) { toLogin(); throw new Error("signed out"); }
  return res;
}
async function problem(res) {
  try {
    const detail = (await res.json()).detail;
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch (e) { return `failed (${res.status})`; }
}

// A DOM element whose text comes only from text nodes.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) { continue; }
    if (k === "class") { node.className = v; } else { node.setAttribute(k, String(v)); }
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false || c === "") { continue; }
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const $ = id => document.getElementById(id);
function num(v, digits) { return Number(v).toFixed(digits); }
function findingName(f) {
  const label = (f.details || {}).label;
  if (label) { return String(label); }
  const words = String(f.finding || "finding").replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}
function codeName(code) { return findingName({finding: code}); }

// ---- state -------------------------------------------------------------------------------

const PREFETCH_PARALLEL = 4;  // requests in flight at once while slices load in the background
const MEMORY_BUDGET = 768 * 1024 * 1024;  // bytes of slices kept per series (pixels and overlay)
const RENEW_EVERY_MS = 4 * 60 * 1000;  // a claim held here is renewed while the page is open
const HEAT_COLOURS = 256;

const view = {
  uid: null,
  doc: null,            // GET /api/studies/{uid}/viewer
  critical: new Set(),  // finding codes the site's policy calls critical
  feedback: [],         // each reader's latest judgement (GET .../feedback "latest")
  acknowledged: new Map(),  // finding -> who acknowledged it, and when (from the server)
  series: null,         // the series shown (an element of doc.series)
  index: 0,             // slice index in display order
  window: {center: 40, width: 80},
  overlayOn: true,
  opacity: 0.5,
  overlay: null,        // the overlay shown (an element of series.overlays) or null
  zoom: 1, panX: 0, panY: 0,
};

// Per series: the slices' pixels and the overlays' slices, kept in memory once loaded.
// (failed: key -> why, for slices the server could not give; pending: keys being fetched)
const store = new Map();  // SeriesInstanceUID -> {pixels: [], overlays: Map(finding -> []), failed: Map, pending: Set}
function seriesStore(se) {
  if (!store.has(se.SeriesInstanceUID)) {
    store.set(se.SeriesInstanceUID, {pixels: new Array(se.slices.length).fill(null),
                                     overlays: new Map(), failed: new Map(), pending: new Set()});
  }
  return store.get(se.SeriesInstanceUID);
}
function overlaySlices(se, finding) {
  const s = seriesStore(se);
  if (!s.overlays.has(finding)) { s.overlays.set(finding, new Array(se.slices.length).fill(null)); }
  return s.overlays.get(finding);
}
function seriesUrl(se) {
  return `/api/studies/${encodeURIComponent(view.uid)}/series/${encodeURIComponent(se.SeriesInstanceUID)}`;
}

// ---- loading: the shown slice first, then the others nearest first, a few at a time ------

let inFlight = 0;
// How far from the shown slice slices are loaded and kept: the whole series unless it would
// take more than MEMORY_BUDGET (a very long series is kept around the slice shown).
function reach(se) {
  const perSlice = se.rows * se.columns * ((se.pixel_type === "int16" || se.pixel_type === "uint16" ? 2 : 1) + 1);
  return Math.max(8, Math.floor(MEMORY_BUDGET / Math.max(1, perSlice) / 2));
}
function forgetFar(se) {
  const s = seriesStore(se);
  const r = reach(se);
  if (r >= se.slices.length) { return; }
  const far = i => Math.abs(i - view.index) > r + 4;
  s.pixels.forEach((p, i) => { if (p && far(i)) { s.pixels[i] = null; } });
  for (const slices of s.overlays.values()) { slices.forEach((o, i) => { if (o && far(i)) { slices[i] = null; } }); }
}
function nextTask() {
  const se = view.series;
  if (!se) { return null; }
  const s = seriesStore(se);
  const n = se.slices.length;
  const wanted = (key, have) => !have && !s.pending.has(key) && !s.failed.has(key);
  for (let d = 0; d <= Math.min(n, reach(se)); d++) {
    for (const i of d === 0 ? [view.index] : [view.index + d, view.index - d]) {
      if (i < 0 || i >= n) { continue; }
      if (wanted(`p/${i}`, s.pixels[i])) { return {se, kind: "p", i, key: `p/${i}`}; }
      if (view.overlay) {
        const f = view.overlay.finding;
        if (wanted(`o/${f}/${i}`, overlaySlices(se, f)[i])) {
          return {se, kind: "o", finding: f, i, key: `o/${f}/${i}`};
        }
      }
    }
  }
  return null;
}
function pump() {
  // The shown slice (and its overlay) alone first, so that it comes as fast as it can.
  const se = view.series;
  const shown = se && seriesStore(se).pixels[view.index];
  while (inFlight < (shown ? PREFETCH_PARALLEL : 2)) {
    const task = nextTask();
    if (!task) { break; }
    inFlight++;
    seriesStore(task.se).pending.add(task.key);
    load(task).finally(() => { inFlight--; pump(); });
  }
}
async function load(task) {
  const {se, i} = task;
  const s = seriesStore(se);
  const url = task.kind === "p" ? `${seriesUrl(se)}/pixels/${i}`
      : `${seriesUrl(se)}/overlays/${encodeURIComponent(task.finding)}/${i}`;
  try {
    const res = await api(url, {cache: "default"});
    if (!res.ok) { throw new Error(await problem(res)); }
    const buffer = await res.arrayBuffer();
    const size = se.rows * se.columns;
    let data;
    if (task.kind === "o") {
      data = new Uint8Array(buffer);
    } else {
      data = se.pixel_type === "int16" ? new Int16Array(buffer) : new Uint16Array(buffer);
    }
    if (data.length !== size) { throw new Error(`${data.length} values, expected ${size}`); }
    if (task.kind === "p") { s.pixels[i] = data; } else { overlaySlices(se, task.finding)[i] = data; }
  } catch (e) {
    if (String(e.message) === "signed out") { return; }
    s.failed.set(task.key, String(e.message || e));
  } finally {
    s.pending.delete(task.key);
  }
  showLoaded();
  if (se === view.series && i === view.index) { render(); }
}
function showLoaded() {
  const se = view.series;
  if (!se) { return; }
  const have = seriesStore(se).pixels.filter(Boolean).length;
  $("loaded").textContent = have < se.slices.length ? `loading ${have}/${se.slices.length}` : "";
}

// ---- drawing -----------------------------------------------------------------------------

// Grey levels by window (DICOM PS3.3 C.11.2.1.2, linear), one entry per possible stored
// value: 65536 entries, value + 32768 for int16. Packed RGBA for the image, plain grey for
// the overlay's blending.
let lutKey = "";
const greyLut = new Uint8Array(65536);
const rgbaLut = new Uint32Array(65536);
function buildLut(se) {
  const key = `${view.window.center} ${view.window.width} ${se.pixel_type} ${se.photometric}`;
  if (key === lutKey) { return; }
  lutKey = key;
  const offset = se.pixel_type === "int16" ? 32768 : 0;
  const c = view.window.center, w = Math.max(1, view.window.width);
  const invert = se.photometric === "MONOCHROME1";
  const lo = c - 0.5 - (w - 1) / 2, hi = c - 0.5 + (w - 1) / 2;
  for (let k = 0; k < 65536; k++) {
    const x = k - offset;
    let g;
    if (x <= lo) { g = 0; } else if (x > hi) { g = 255; } else { g = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255; }
    g = Math.round(Math.min(255, Math.max(0, g)));
    if (invert) { g = 255 - g; }
    greyLut[k] = g;
    rgbaLut[k] = (0xff000000 | (g << 16) | (g << 8) | g) >>> 0;
  }
}

// The overlay blended over grey g, by overlay value v: blend[(v << 8) | g] (packed RGBA).
let blendKey = "";
const blend = new Uint32Array(65536);
function hexColour(hex) {
  const m = /^#?([0-9a-f]{6})$/i.exec(String(hex || ""));
  const v = m ? parseInt(m[1], 16) : 0xff00ff;
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}
function heatColour(v) {  // transparent -> red -> yellow
  const t = v / 255;
  const g = t < 0.5 ? 0 : Math.round((t - 0.5) * 2 * 255);
  const a = Math.min(1, Math.max(0, (t - 0.05) / 0.45));
  return [255, g, 0, a];
}
function buildBlend(ov) {
  const key = `${ov.finding} ${ov.kind} ${view.opacity} ${JSON.stringify(ov.classes)}`;
  if (key === blendKey) { return; }
  blendKey = key;
  const colours = new Array(256).fill(null);
  if (ov.kind === "heatmap") {
    for (let v = 1; v < HEAT_COLOURS; v++) { colours[v] = heatColour(v); }
  } else {
    for (let v = 1; v < 256; v++) { colours[v] = [...hexColour("#ff00ff"), 1]; }
    for (const c of ov.classes || []) { colours[c.value & 255] = [...hexColour(c.color), 1]; }
  }
  for (let v = 0; v < 256; v++) {
    const col = colours[v];
    for (let g = 0; g < 256; g++) {
      let r = g, gg = g, b = g;
      if (col) {
        const a = col[3] * view.opacity;
        r = Math.round(g + (col[0] - g) * a);
        gg = Math.round(g + (col[1] - g) * a);
        b = Math.round(g + (col[2] - g) * a);
      }
      blend[(v << 8) | g] = (0xff000000 | (b << 16) | (gg << 8) | r) >>> 0;
    }
  }
}

const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const offscreen = document.createElement("canvas");
const offCtx = offscreen.getContext("2d");
let frame = null;  // {imageData, out32} of the series' size

// Where the image lies on the stage, in CSS pixels: sx, sy per image column / row (the
// pixel spacing keeps the physical aspect), tx, ty of the image's top-left corner.
function geometry() {
  const se = view.series;
  const w = $("stage").clientWidth, h = $("stage").clientHeight;
  const [rowMm, colMm] = (se && se.pixel_spacing) || [1, 1];
  const cols = se ? se.columns : 1, rows = se ? se.rows : 1;
  const fit = Math.min(w / (cols * colMm), h / (rows * rowMm));
  const sx = fit * view.zoom * colMm, sy = fit * view.zoom * rowMm;
  // The corner on a whole device pixel: at actual size, image pixels are screen pixels.
  const dpr = window.devicePixelRatio || 1;
  const snap = v => Math.round(v * dpr) / dpr;
  return {w, h, sx, sy, tx: snap(w / 2 + view.panX - cols * sx / 2), ty: snap(h / 2 + view.panY - rows * sy / 2)};
}
// The client (viewport) coordinates of the centre of image pixel (row, column).
function imageToClient(row, column) {
  const g = geometry();
  const box = $("stage").getBoundingClientRect();
  return {x: box.left + $("stage").clientLeft + g.tx + (column + 0.5) * g.sx,
          y: box.top + $("stage").clientTop + g.ty + (row + 0.5) * g.sy};
}

function render() {
  const se = view.series;
  if (!se) { return; }
  const started = performance.now();
  const dpr = window.devicePixelRatio || 1;
  const g = geometry();
  const width = Math.max(1, Math.round(g.w * dpr)), height = Math.max(1, Math.round(g.h * dpr));
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  const pixels = seriesStore(se).pixels[view.index];
  showLabels();
  if (!pixels) {
    const why = seriesStore(se).failed.get(`p/${view.index}`);
    $("corner-tr").textContent = why ? `${$("slice-label").textContent}: ${why}` : "loading…";
    return;
  }
  buildLut(se);
  if (!frame || frame.imageData.width !== se.columns || frame.imageData.height !== se.rows) {
    offscreen.width = se.columns;
    offscreen.height = se.rows;
    const imageData = offCtx.createImageData(se.columns, se.rows);
    frame = {imageData, out32: new Uint32Array(imageData.data.buffer)};
  }
  const out = frame.out32;
  const offset = se.pixel_type === "int16" ? 32768 : 0;
  const n = pixels.length;
  for (let i = 0; i < n; i++) { out[i] = rgbaLut[pixels[i] + offset]; }
  const ov = view.overlay && view.overlayOn && view.opacity > 0
      ? overlaySlices(se, view.overlay.finding)[view.index] : null;
  if (ov) {
    buildBlend(view.overlay);
    for (let i = 0; i < n; i++) {
      const v = ov[i];
      if (v !== 0) { out[i] = blend[(v << 8) | greyLut[pixels[i] + offset]]; }
    }
  }
  const overlayWhy = view.overlay && view.overlayOn
      ? seriesStore(se).failed.get(`o/${view.overlay.finding}/${view.index}`) : null;
  $("corner-tl").textContent = overlayWhy ? `AI overlay not shown on this slice: ${overlayWhy}` : seriesTitle(se);
  offCtx.putImageData(frame.imageData, 0, 0);
  ctx.setTransform(dpr * g.sx, 0, 0, dpr * g.sy, dpr * g.tx, dpr * g.ty);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(offscreen, 0, 0);
  window.viewerLastRenderMs = performance.now() - started;
  window.viewerRenders = (window.viewerRenders || 0) + 1;
}

function seriesTitle(se) { return [se.Modality, se.SeriesDescription].filter(Boolean).join(" · "); }
function showLabels() {
  const se = view.series;
  const n = se.slices.length;
  const slice = se.slices[view.index] || {};
  const number = slice.InstanceNumber === null || slice.InstanceNumber === undefined ? "?" : slice.InstanceNumber;
  const label = `Im ${number} (${view.index + 1}/${n})`;
  $("slice-label").textContent = label;
  $("corner-tr").textContent = label;
  const slider = $("slice");
  if (Number(slider.value) !== view.index) { slider.value = String(view.index); }
  const wl = `W ${Math.round(view.window.width)} L ${Math.round(view.window.center)}`;
  $("wl-label").textContent = wl;
  $("corner-br").textContent = `${wl} · ${Math.round(view.zoom * 100)}%`;
  $("zoom-label").textContent = `${Math.round(view.zoom * 100)}%`;
  for (const b of document.querySelectorAll("#presets button")) {
    b.classList.toggle("on", Number(b.dataset.center) === view.window.center && Number(b.dataset.width) === view.window.width);
  }
}

// ---- navigation --------------------------------------------------------------------------

function setSlice(i) {
  const se = view.series;
  if (!se) { return; }
  const next = Math.min(se.slices.length - 1, Math.max(0, Math.round(i)));
  if (next === view.index) { return; }
  view.index = next;
  // A slice that failed to load is asked for again when the reader comes to it.
  const failed = seriesStore(se).failed;
  failed.delete(`p/${next}`);
  if (view.overlay) { failed.delete(`o/${view.overlay.finding}/${next}`); }
  render();
  forgetFar(se);
  pump();  // the nearest slices first, from here
}
function step(d) { setSlice(view.index + d); }
function setWindow(center, width) {
  view.window = {center: Math.round(center * 100) / 100, width: Math.max(1, Math.round(width * 100) / 100)};
  render();
}
function setZoom(zoom, clientX, clientY) {
  const z = Math.min(40, Math.max(0.1, zoom));
  const box = $("stage").getBoundingClientRect();
  const g = geometry();
  // Keep the point under the cursor (or the stage centre) where it is.
  const mx = clientX === undefined ? g.w / 2 : clientX - box.left;
  const my = clientY === undefined ? g.h / 2 : clientY - box.top;
  const k = z / view.zoom;
  view.panX = mx - g.w / 2 - (mx - g.w / 2 - view.panX) * k;
  view.panY = my - g.h / 2 - (my - g.h / 2 - view.panY) * k;
  view.zoom = z;
  render();
}
// Actual size: one image column to one screen (device) pixel.
function actualSize() {
  setZoom(view.zoom / (geometry().sx * (window.devicePixelRatio || 1)));
}
function reset() {
  view.zoom = 1; view.panX = 0; view.panY = 0;
  setWindow(view.series.window.center, view.series.window.width);
}
function setOverlayOn(on) {
  view.overlayOn = on;
  $("overlay-on").checked = on;
  render();
}

// ---- the series: controls, presets, legend -----------------------------------------------

function showSeries(se) {
  view.series = se;
  view.index = 0;
  view.zoom = 1; view.panX = 0; view.panY = 0;
  view.window = {center: se.window.center, width: se.window.width};
  const ranked = [...se.overlays].sort((a, b) => overlayRank(a) - overlayRank(b));
  view.overlay = ranked[0] || null;
  $("slice").max = String(Math.max(0, se.slices.length - 1));
  $("slice").value = "0";
  $("slice").disabled = se.slices.length < 2;
  $("corner-tl").textContent = seriesTitle(se);
  const presets = [{name: "default", center: se.window.center, width: se.window.width}, ...(se.presets || [])];
  $("presets").replaceChildren(...presets.map(p => {
    const b = el("button", {type: "button", "data-preset": p.name, "data-center": p.center, "data-width": p.width,
                            title: `W ${p.width} L ${p.center}`}, p.name);
    b.onclick = () => setWindow(p.center, p.width);
    return b;
  }));
  const choice = $("overlay");
  choice.replaceChildren(...se.overlays.map(o => el("option", {value: o.finding}, codeName(o.finding))));
  if (view.overlay) { choice.value = view.overlay.finding; }
  $("overlay-choice").hidden = se.overlays.length < 2;
  $("overlay-on").disabled = !view.overlay;
  $("opacity").disabled = !view.overlay;
  showLegend();
  showLoaded();
  render();
  pump();
}
function overlayRank(o) {
  const f = (view.doc.findings || []).find(x => x.finding === o.finding) || {};
  if (f.flag && view.critical.has(f.finding)) { return 0; }
  return f.flag ? 1 : 2;
}
function setOverlay(finding) {
  view.overlay = view.series.overlays.find(o => o.finding === finding) || null;
  showLegend();
  render();
  pump();
}
function sliceName(se, index) {
  const s = se.slices[index];
  return s ? `Im ${s.InstanceNumber ?? "?"}` : "";
}
function jumpButton(index, what) {
  const b = el("button", {type: "button", class: "jump", "data-index": index,
                          title: `go to ${what}`, disabled: index === null || index === undefined}, "jump");
  b.onclick = () => setSlice(index);
  return b;
}
function showLegend() {
  const ov = view.overlay;
  const se = view.series;
  if (!ov) { $("legend").replaceChildren(el("span", {class: "muted"}, "No AI overlay on this series.")); return; }
  const head = el("span", {class: "cls", "data-finding": ov.finding},
      el("b", {}, codeName(ov.finding)),
      ov.model ? el("span", {class: "muted"}, `${ov.model.name} ${ov.model.version || ""}`) : null,
      ov.best_index !== null && ov.best_index !== undefined
        ? el("span", {class: "muted"}, `most at ${sliceName(se, ov.best_index)}`) : null,
      jumpButton(ov.best_index, "the slice with the most of the finding"));
  const items = ov.kind === "heatmap"
    ? [el("span", {class: "cls"}, el("span", {class: "heat-scale"}), "saliency: low → high")]
    : (ov.classes || []).map(c => el("span", {class: "cls", "data-class": c.name},
        el("span", {class: "swatch", style: `background:${/^#[0-9a-f]{6}$/i.test(c.color) ? c.color : "#f0f"}`}),
        c.name, el("span", {class: "muted"}, `${c.voxels} voxels`), jumpButton(c.best_index, c.name)));
  $("legend").replaceChildren(head, ...items);
}

// ---- the study: header, findings, judgements ---------------------------------------------

function showHeader() {
  const d = view.doc;
  $("title").textContent = d.StudyDescription || "Study";
  document.title = `triage — ${d.StudyDescription || "viewer"}`;
  $("patient").textContent = [d.PatientName, d.PatientID, d.AccessionNumber && `acc. ${d.AccessionNumber}`]
      .filter(Boolean).join(" · ");
  const holder = d.read_state === "claimed" && d.claimed_by ? ` by ${d.claimed_by}` : "";
  $("read-state").textContent = `${d.read_state || "?"}${holder}`;
  $("back").href = `/#study=${encodeURIComponent(view.uid)}`;
}
async function act(action) {
  const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/${action}`, {method: "POST", body: "{}"});
  if (!res.ok) { $("message").textContent = await problem(res); return; }
  $("message").textContent = "";
  const answer = await res.json();
  view.doc.read_state = action === "claim" ? "claimed" : "completed";
  view.doc.claimed_by = action === "claim" ? answer.reader : null;
  showHeader();
  keepClaim();
}
let renewTimer = null;
function keepClaim() {
  if (renewTimer !== null) { clearInterval(renewTimer); renewTimer = null; }
  if (!me || view.doc.read_state !== "claimed" || view.doc.claimed_by !== me.username) { return; }
  renewTimer = setInterval(() => {
    api(`/api/studies/${encodeURIComponent(view.uid)}/renew`, {method: "POST", body: "{}"}).catch(() => {});
  }, RENEW_EVERY_MS);
}

function overlayOf(code) {
  for (const se of view.doc.series || []) {
    const ov = (se.overlays || []).find(o => o.finding === code);
    if (ov) { return {se, ov}; }
  }
  return null;
}
function goToFinding(code) {
  const found = overlayOf(code);
  if (!found) { return; }
  if (found.se !== view.series) { $("series").value = found.se.SeriesInstanceUID; showSeries(found.se); }
  if (view.overlay !== found.ov) { $("overlay").value = code; setOverlay(code); }
  if (!view.overlayOn) { setOverlayOn(true); }
  if (found.ov.best_index !== null && found.ov.best_index !== undefined) { setSlice(found.ov.best_index); }
}

function findingItem(f) {
  const d = f.details || {};
  const critical = Boolean(f.flag) && view.critical.has(f.finding);
  const cls = ["finding", f.flag ? "flagged" : "", critical ? "critical" : ""].join(" ");
  const head = el("div", {class: "f-head"},
      el("span", {class: "f-name"}, findingName(f)),
      f.flag ? el("span", {class: "tag-flag"}, "FLAGGED") : el("span", {class: "muted"}, "not flagged"),
      f.severity === "high" ? el("span", {class: "badge-severe"}, "severe") : null,
      el("span", {class: "score"}, `score ${num(f.score, 2)}`));
  const lines = [];
  const vols = Object.entries(f.volumes_ml || {});
  if (d.blood_volume_ml !== undefined) { lines.push(el("div", {class: "f-detail"}, `blood ${num(d.blood_volume_ml, 1)} ml`)); }
  if (vols.length) {
    lines.push(el("div", {class: "f-detail volumes"}, vols.map(([k, v]) => `${k} ${num(v, 1)} ml`).join(" · ")));
  } else if (d.probability !== undefined) {
    lines.push(el("div", {class: "f-detail"}, `probability ${num(d.probability, 2)}` +
        (d.threshold !== undefined ? ` · threshold ${num(d.threshold, 2)}` : "")));
  }
  if (f.model) { lines.push(el("div", {class: "muted"}, `${f.model.name} ${f.model.version || ""}`)); }
  const actions = el("div", {class: "f-actions"});
  const where = overlayOf(f.finding);
  if (where) {
    const b = el("button", {type: "button", class: "go", title: "show this finding's overlay where it is largest"},
        `Go to ${sliceName(where.se, where.ov.best_index) || "finding"}`);
    b.onclick = () => goToFinding(f.finding);
    actions.append(b);
  }
  if (critical) {
    if (view.acknowledged.has(f.finding)) {
      const ack = view.acknowledged.get(f.finding);
      actions.append(el("span", {class: "acked"},
          `acknowledged by ${ack.by} ${String(ack.at || "").slice(0, 16).replace("T", " ")}`));
    } else {
      const ack = el("button", {type: "button", class: "ack"}, "Acknowledge");
      ack.onclick = () => acknowledge(f.finding, ack);
      actions.append(ack);
    }
  }
  return el("li", {class: cls, "data-finding": f.finding}, head, lines, actions, judgement(f));
}
async function acknowledge(code, button) {
  button.disabled = true;
  const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/acknowledge`,
                        {method: "POST", body: JSON.stringify({finding: code})});
  if (!res.ok) { $("message").textContent = await problem(res); button.disabled = false; return; }
  const kept = await res.json();
  view.acknowledged.set(code, {by: kept.acknowledged_by, at: kept.acknowledged_at});
  showFindings();
}

function when(iso) { return String(iso || "").slice(0, 16).replace("T", " "); }
function judgement(f) {
  const said = view.feedback.filter(r => r.finding === f.finding && r.verdict !== "missed");
  const comment = el("input", {type: "text", class: "fb-comment", placeholder: "comment (optional)", maxlength: "2000", "aria-label": "comment"});
  const note = el("span", {class: "fb-message muted"});
  const send = async verdict => {
    const body = {finding: f.finding, verdict, comment: comment.value.trim() || null, model: f.model ? f.model.name : null};
    const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/feedback`, {method: "POST", body: JSON.stringify(body)});
    if (!res.ok) { note.textContent = await problem(res); return; }
    await loadFeedback();
    showFindings();
  };
  const agree = el("button", {type: "button", "data-verdict": "agree"}, "Agree");
  const disagree = el("button", {type: "button", "data-verdict": "disagree"}, "Disagree");
  agree.onclick = () => send("agree");
  disagree.onclick = () => send("disagree");
  return el("div", {class: "judgement"}, agree, disagree, comment, note,
      said.map(r => el("div", {class: "fb-said", "data-reader": r.reader},
          `${r.reader}: ${r.verdict}${r.comment ? " — " + r.comment : ""} (${when(r.created_at)})`)));
}

// "Missed on this slice": a finding the AI did not flag, seen by the reader on the slice
// shown (its SOPInstanceUID and InstanceNumber are sent). Findings the AI flagged are
// judged with Agree/Disagree instead (the server refuses them here).
function showMissed() {
  const codes = [...new Set((view.doc.findings || []).map(f => f.finding))];
  const flagged = new Set((view.doc.findings || []).filter(f => f.flag).map(f => f.finding));
  const select = el("select", {id: "missed-finding", "aria-label": "which finding"},
      codes.map(c => el("option", {value: c, disabled: flagged.has(c)}, `${codeName(c)}${flagged.has(c) ? " (flagged)" : ""}`)));
  const open = codes.filter(c => !flagged.has(c));
  if (open.length) { select.value = open[0]; }
  const comment = el("input", {type: "text", id: "missed-comment", class: "fb-comment", placeholder: "comment (optional)", maxlength: "2000", "aria-label": "comment"});
  const button = el("button", {type: "button", id: "missed-send", disabled: !open.length}, "Missed on this slice");
  const note = el("span", {id: "missed-message", class: "muted"});
  button.onclick = async () => {
    const slice = view.series && view.series.slices[view.index];
    if (!slice) { return; }
    const code = select.value;
    const f = (view.doc.findings || []).find(x => x.finding === code);
    const body = {finding: code, verdict: "missed", comment: comment.value.trim() || null,
                  model: f && f.model ? f.model.name : null,
                  SOPInstanceUID: slice.SOPInstanceUID, InstanceNumber: slice.InstanceNumber ?? null};
    const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/feedback`, {method: "POST", body: JSON.stringify(body)});
    if (!res.ok) { note.textContent = await problem(res); return; }
    await loadFeedback();
    showMissed();
    $("missed-message").textContent = `recorded: ${codeName(code)} missed on Im ${slice.InstanceNumber ?? "?"}`;
  };
  const said = view.feedback.filter(r => r.verdict === "missed").map(r => {
    const at = findSlice(r.SOPInstanceUID);
    const go = at ? el("button", {type: "button", class: "jump"}, "show") : null;
    if (go) { go.onclick = () => { if (at.se !== view.series) { $("series").value = at.se.SeriesInstanceUID; showSeries(at.se); } setSlice(at.index); }; }
    return el("div", {class: "fb-said", "data-reader": r.reader, "data-sop": r.SOPInstanceUID || ""},
        `${r.reader}: ${codeName(r.finding)} missed on Im ${r.InstanceNumber ?? "?"}${r.comment ? " — " + r.comment : ""} (${when(r.created_at)}) `, go);
  });
  let controls = [select, comment, button];
  if (!codes.length) {
    controls = [el("span", {class: "muted"}, "The AI reported no findings on this study.")];
  } else if (!open.length) {
    controls = [el("span", {class: "muted"}, "The AI flagged every finding it reported here: judge them with Agree or Disagree.")];
  }
  $("missed").replaceChildren(el("h3", {}, "Missed by the AI"), ...controls, note, ...said);
}
function findSlice(sop) {
  for (const se of view.doc.series || []) {
    const index = se.slices.findIndex(s => s.SOPInstanceUID === sop);
    if (index >= 0) { return {se, index}; }
  }
  return null;
}
function showFindings() {
  const findings = [...(view.doc.findings || [])].sort((a, b) => rank(a) - rank(b) || Number(b.score) - Number(a.score));
  $("findings").replaceChildren(...(findings.length ? findings.map(findingItem)
      : [el("li", {class: "muted"}, "No AI findings on this study.")]));
  showMissed();
}
function rank(f) {
  if (!f.flag) { return 2; }
  return view.critical.has(f.finding) ? 0 : 1;
}
async function loadFeedback() {
  const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/feedback`);
  view.feedback = res.ok ? (await res.json()).latest || [] : [];
}
async function loadCritical() {
  if (Array.isArray(view.doc.critical_findings)) { view.critical = new Set(view.doc.critical_findings); return; }
  const res = await api("/api/worklist?limit=1");
  if (res.ok) { view.critical = new Set((await res.json()).critical_findings || []); }
}

// What the server could not show (a series whose files cannot be read, an overlay without
// its geometry), with the reason.
function showUnavailable() {
  const notes = [
    ...(view.doc.series_unavailable || []).map(u => `A series cannot be shown: ${u.reason}`),
    ...(view.doc.overlays_unavailable || []).map(u => `The ${codeName(u.finding)} overlay cannot be shown: ${u.reason}`),
  ];
  $("notes").replaceChildren(...notes.map(t => el("p", {class: "unavailable"}, t)));
}

// ---- input -------------------------------------------------------------------------------

const stage = $("stage");
// A wheel notch is one slice; a touchpad's small deltas add up to one.
let wheelSum = 0;
stage.addEventListener("wheel", ev => {
  ev.preventDefault();
  if (!ev.deltaY) { return; }
  if (ev.ctrlKey || ev.metaKey) { setZoom(view.zoom * (ev.deltaY < 0 ? 1.25 : 0.8), ev.clientX, ev.clientY); return; }
  wheelSum += ev.deltaMode === 1 ? ev.deltaY * 40 : ev.deltaY;
  if (Math.abs(wheelSum) < 50) { return; }
  step(wheelSum > 0 ? 1 : -1);
  wheelSum = 0;
}, {passive: false});

let drag = null;  // {mode: "window" | "pan", x, y, center, width, panX, panY}
stage.addEventListener("mousedown", ev => {
  if (!view.series) { return; }
  const pan = ev.button === 1 || (ev.button === 0 && ev.shiftKey);
  if (ev.button !== 0 && !pan) { return; }
  ev.preventDefault();
  stage.focus();
  drag = {mode: pan ? "pan" : "window", x: ev.clientX, y: ev.clientY,
          center: view.window.center, width: view.window.width, panX: view.panX, panY: view.panY};
});
window.addEventListener("mousemove", ev => {
  if (!drag) { return; }
  const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
  if (drag.mode === "pan") {
    view.panX = drag.panX + dx; view.panY = drag.panY + dy;
    render();
  } else {
    // Horizontal: width; vertical: level. Faster for wide windows.
    const k = Math.max(1, drag.width / 256);
    setWindow(drag.center + dy * k, Math.max(1, drag.width + dx * k));
  }
});
window.addEventListener("mouseup", () => { drag = null; });
stage.addEventListener("auxclick", ev => { if (ev.button === 1) { ev.preventDefault(); } });

document.addEventListener("keydown", ev => {
  if (ev.altKey || ev.metaKey || !view.series) { return; }
  const t = ev.target;
  const tag = (t && t.tagName) || "";
  if (tag === "TEXTAREA" || tag === "SELECT" || (tag === "INPUT" && t.type === "text")) { return; }
  const k = ev.key;
  if (ev.ctrlKey && k !== "+" && k !== "=" && k !== "-") { return; }
  if (k === "ArrowDown") { step(1); }
  else if (k === "ArrowUp") { step(-1); }
  else if (k === "PageDown") { step(10); }
  else if (k === "PageUp") { step(-10); }
  else if (k === "Home") { setSlice(0); }
  else if (k === "End") { setSlice(view.series.slices.length - 1); }
  else if (k === "+" || k === "=") { setZoom(view.zoom * 1.25); }
  else if (k === "-") { setZoom(view.zoom * 0.8); }
  else if (k === "r") { reset(); }
  else if (k === "1") { actualSize(); }
  else if (k === "o") { if (view.overlay) { setOverlayOn(!view.overlayOn); } }
  else { return; }
  ev.preventDefault();
});

$("slice").addEventListener("input", () => setSlice(Number($("slice").value)));
$("overlay-on").addEventListener("change", () => setOverlayOn($("overlay-on").checked));
$("opacity").addEventListener("input", () => { view.opacity = Number($("opacity").value) / 100; render(); });
$("overlay").addEventListener("change", () => setOverlay($("overlay").value));
$("series").addEventListener("change", () => {
  const se = view.doc.series.find(s => s.SeriesInstanceUID === $("series").value);
  if (se) { showSeries(se); }
});
$("reset").onclick = () => reset();
$("claim").onclick = () => act("claim");
$("complete").onclick = () => act("complete");
window.addEventListener("resize", () => render());
window.addEventListener("hashchange", () => location.reload());

// ---- start -------------------------------------------------------------------------------

function fail(text) {
  $("problem").textContent = text;
  $("problem").hidden = false;
}
async function start() {
  const who = await api("/api/auth/me");
  me = await who.json();
  $("who").textContent = me.display_name || me.username;
  const m = location.hash.match(/^#study=([^&]+)/);
  if (!m) { fail("No study named: open the viewer from the worklist."); return; }
  try { view.uid = decodeURIComponent(m[1]); } catch (e) { fail("This link does not name a study (its address is malformed)."); return; }
  const res = await api(`/api/studies/${encodeURIComponent(view.uid)}/viewer`);
  if (!res.ok) { fail(res.status === 404 ? "No such study, or nothing to show." : await problem(res)); return; }
  view.doc = await res.json();
  for (const ack of view.doc.acknowledged || []) { view.acknowledged.set(ack.finding, ack); }
  view.opacity = Number($("opacity").value) / 100;
  showHeader();
  await Promise.all([loadCritical(), loadFeedback()]);
  showFindings();
  keepClaim();
  showUnavailable();
  const all = view.doc.series || [];
  $("series").replaceChildren(...all.map(se => el("option", {value: se.SeriesInstanceUID},
      `${se.Modality || "?"} · ${se.SeriesDescription || se.SeriesInstanceUID} · ${se.slices.length} images`)));
  $("series-choice").hidden = all.length < 2;
  if (!all.length) { fail("No analysed series to show."); return; }
  showSeries(all[0]);
}

// For the page tests and the benchmark: where an image pixel is on screen, and the controls.
window.viewer = {
  state: () => ({index: view.index, window: {...view.window}, overlayOn: view.overlayOn, opacity: view.opacity,
                 zoom: view.zoom, panX: view.panX, panY: view.panY,
                 series: view.series ? view.series.SeriesInstanceUID : null,
                 rows: view.series ? view.series.rows : 0, columns: view.series ? view.series.columns : 0,
                 slices: view.series ? view.series.slices.length : 0,
                 overlay: view.overlay ? view.overlay.finding : null,
                 best_index: view.overlay ? view.overlay.best_index : null,
                 loaded: view.series ? seriesStore(view.series).pixels.filter(Boolean).length : 0}),
  imageToClient, setSlice, step, setWindow, setZoom, actualSize, render,
  setOverlay: code => setOverlay(code), setOverlayOn,
};
start().catch(e => { if (String(e.message) !== "signed out") { fail(`The viewer could not start: ${e.message}`); } });
