// spade studio: paint a label map of class values, ask the studio server for the synthesized image.
//
// The label map lives in `values`, a Uint8Array of the model's class values (one per pixel, at the
// model's width x height); the canvas shows it in the class colours and is scaled up with CSS.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const DISPLAY_BOX = 480; // on-screen size of the larger side, in CSS pixels
  const MAX_UNDO = 50;
  const DONTCARE_COLOUR = [0, 0, 0]; // as spade.visualize draws the don't-care class

  const state = {
    info: null,
    width: 0,
    height: 0,
    values: null, // Uint8Array of class values
    lut: new Uint8ClampedArray(256 * 4), // value -> RGBA
    names: new Map(), // value -> class name
    tool: "brush",
    classId: 0,
    classValue: 0,
    eraserValue: 0,
    undo: [],
    redo: [],
    painting: false,
    last: null,
    busy: false,
    pending: false,
    style: null, // data URL of the style image
    resultUrl: null,
    generation: 0,
  };

  let canvas, ctx, imageData;

  // ------------------------------------------------------------------ errors and status

  function showError(message) {
    $("#error-text").textContent = message;
    $("#error").hidden = false;
  }

  function clearError() {
    $("#error").hidden = true;
    $("#error-text").textContent = "";
  }

  function setStatus(text) {
    $("#status").textContent = text;
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string") return body.error;
    } catch (_) {
      // not JSON: fall through
    }
    return `HTTP ${response.status}: ${text.slice(0, 300) || response.statusText}`;
  }

  async function postJSON(url, body) {
    const json = JSON.stringify(body);
    const limit = state.info && state.info.max_body;
    if (limit && json.length > limit) {
      const mib = (n) => (n / 1048576).toFixed(1);
      throw new Error(`the request would be ${mib(json.length)} MiB; the studio accepts at most ${mib(limit)} MiB`);
    }
    let response;
    try {
      response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: json });
    } catch (err) {
      throw new Error(`cannot reach the studio server (${err.message}); is spade studio still running?`);
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    return response;
  }

  // ------------------------------------------------------------------ encoding helpers

  function toBase64(bytes) {
    let binary = "";
    const chunk = 0x8000;
    for (let i = 0; i < bytes.length; i += chunk) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
    }
    return btoa(binary);
  }

  function fromBase64(text) {
    const binary = atob(text);
    const out = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
    return out;
  }

  function readDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  function download(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // ------------------------------------------------------------------ drawing

  function render() {
    const { values, lut } = state;
    const data = imageData.data;
    for (let i = 0, j = 0; i < values.length; i++, j += 4) {
      const k = values[i] * 4;
      data[j] = lut[k];
      data[j + 1] = lut[k + 1];
      data[j + 2] = lut[k + 2];
      data[j + 3] = 255;
    }
    ctx.putImageData(imageData, 0, 0);
  }

  function snapshot() {
    state.undo.push(state.values.slice());
    if (state.undo.length > MAX_UNDO) state.undo.shift();
    state.redo = [];
    updateHistoryButtons();
  }

  function updateHistoryButtons() {
    $("#undo").disabled = state.undo.length === 0;
    $("#redo").disabled = state.redo.length === 0;
  }

  function undo() {
    if (!state.undo.length) return;
    state.redo.push(state.values);
    state.values = state.undo.pop();
    updateHistoryButtons();
    render();
    changed();
  }

  function redo() {
    if (!state.redo.length) return;
    state.undo.push(state.values);
    state.values = state.redo.pop();
    updateHistoryButtons();
    render();
    changed();
  }

  function paintValue() {
    return state.tool === "eraser" ? state.eraserValue : state.classValue;
  }

  function stamp(cx, cy, value) {
    const size = Number($("#brush-size").value);
    const r = size / 2;
    const reach = Math.floor(r);
    const r2 = r * r;
    const { width, height, values } = state;
    for (let dy = -reach; dy <= reach; dy++) {
      const y = cy + dy;
      if (y < 0 || y >= height) continue;
      for (let dx = -reach; dx <= reach; dx++) {
        const x = cx + dx;
        if (x < 0 || x >= width || dx * dx + dy * dy >= r2 + 0.25) continue;
        values[y * width + x] = value;
      }
    }
  }

  function stampLine(a, b, value) {
    const steps = Math.max(Math.abs(b.x - a.x), Math.abs(b.y - a.y));
    for (let s = 1; s <= steps; s++) {
      const t = s / steps;
      stamp(Math.round(a.x + (b.x - a.x) * t), Math.round(a.y + (b.y - a.y) * t), value);
    }
    if (steps === 0) stamp(b.x, b.y, value);
  }

  function floodFill(x, y, value) {
    const { width, height, values } = state;
    const start = y * width + x;
    const target = values[start];
    if (target === value) return false;
    const stack = new Int32Array(width * height);
    let sp = 0;
    values[start] = value;
    stack[sp++] = start;
    while (sp > 0) {
      const p = stack[--sp];
      const px = p % width;
      if (px > 0 && values[p - 1] === target) { values[p - 1] = value; stack[sp++] = p - 1; }
      if (px < width - 1 && values[p + 1] === target) { values[p + 1] = value; stack[sp++] = p + 1; }
      if (p >= width && values[p - width] === target) { values[p - width] = value; stack[sp++] = p - width; }
      if (p < width * (height - 1) && values[p + width] === target) { values[p + width] = value; stack[sp++] = p + width; }
    }
    return true;
  }

  function canvasPoint(event) {
    const rect = canvas.getBoundingClientRect();
    const x = Math.floor(((event.clientX - rect.left) * state.width) / rect.width);
    const y = Math.floor(((event.clientY - rect.top) * state.height) / rect.height);
    return { x: Math.min(state.width - 1, Math.max(0, x)), y: Math.min(state.height - 1, Math.max(0, y)) };
  }

  function onPointerDown(event) {
    if (event.button !== 0 || !state.values) return;
    event.preventDefault();
    const p = canvasPoint(event);
    if (state.tool === "fill") {
      const before = state.values.slice();
      if (floodFill(p.x, p.y, state.classValue)) {
        state.undo.push(before);
        if (state.undo.length > MAX_UNDO) state.undo.shift();
        state.redo = [];
        updateHistoryButtons();
        render();
        changed();
      }
      return;
    }
    snapshot();
    state.painting = true;
    state.last = p;
    canvas.setPointerCapture(event.pointerId);
    stamp(p.x, p.y, paintValue());
    render();
  }

  function onPointerMove(event) {
    if (!state.values) return;
    const p = canvasPoint(event);
    const value = state.values[p.y * state.width + p.x];
    $("#hover-info").textContent = `${p.x}, ${p.y}: ${state.names.get(value) ?? "?"} (value ${value})`;
    if (!state.painting) return;
    stampLine(state.last, p, paintValue());
    state.last = p;
    render();
  }

  function onPointerUp(event) {
    if (!state.painting) return;
    state.painting = false;
    state.last = null;
    if (canvas.hasPointerCapture(event.pointerId)) canvas.releasePointerCapture(event.pointerId);
    changed();
  }

  // called after every completed edit
  function changed() {
    if ($("#live").checked) generate();
  }

  // ------------------------------------------------------------------ tools and palette

  function setTool(tool) {
    state.tool = tool;
    for (const name of ["brush", "fill", "eraser"]) {
      $(`#tool-${name}`).setAttribute("aria-pressed", String(name === tool));
    }
    canvas.style.cursor = tool === "fill" ? "cell" : "crosshair";
  }

  function selectClass(id) {
    const cls = state.info.classes.find((c) => c.id === id);
    if (!cls) return;
    state.classId = cls.id;
    state.classValue = cls.value;
    for (const button of document.querySelectorAll("#palette button")) {
      const selected = Number(button.dataset.classId) === id;
      button.classList.toggle("selected", selected);
      button.setAttribute("aria-selected", String(selected));
    }
    const current = $("#current-class");
    current.replaceChildren(swatch(cls.colour), document.createTextNode(cls.name));
    if (state.tool === "eraser") setTool("brush");
  }

  function swatch(rgb) {
    const span = document.createElement("span");
    span.className = "swatch";
    span.style.background = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
    return span;
  }

  function buildPalette() {
    const palette = $("#palette");
    palette.replaceChildren();
    for (const cls of state.info.classes) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.classId = String(cls.id);
      button.dataset.value = String(cls.value);
      button.title = `${cls.name}: value ${cls.value}`;
      button.setAttribute("role", "option");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = cls.name;
      button.append(swatch(cls.colour), name);
      button.addEventListener("click", () => selectClass(cls.id));
      palette.appendChild(button);
    }
    $("#palette-filter").addEventListener("input", (event) => {
      const q = event.target.value.trim().toLowerCase();
      for (const button of palette.children) {
        button.hidden = q !== "" && !button.textContent.toLowerCase().includes(q);
      }
    });
  }

  // ------------------------------------------------------------------ uploads and downloads

  async function uploadLabel(file) {
    clearError();
    try {
      const image = await readDataURL(file);
      const response = await postJSON("/api/label", { image });
      const body = await response.json();
      if (body.width !== state.width || body.height !== state.height) {
        throw new Error(`the server answered a ${body.width}x${body.height} map for a ${state.width}x${state.height} model`);
      }
      snapshot();
      state.values = fromBase64(body.values);
      render();
      const how = body.kind === "colours" ? "mapped the class colours back to values" : "read the class values";
      const size = body.resized ? `, resized from ${body.source_size[0]}x${body.source_size[1]}` : "";
      setStatus(`${file.name}: ${how}${size}`);
      changed();
    } catch (err) {
      showError(`Label map ${file.name}: ${err.message}`);
    }
  }

  async function uploadStyle(file) {
    clearError();
    try {
      const limit = state.info.max_body;
      if (limit && file.size * 1.4 > limit) {
        throw new Error(`${(file.size / 1048576).toFixed(1)} MiB is too large for the studio's request limit`);
      }
      const url = await readDataURL(file);
      await new Promise((resolve, reject) => {
        const probe = new Image();
        probe.onload = resolve;
        probe.onerror = () => reject(new Error("not a readable image"));
        probe.src = url;
      });
      state.style = url;
      const preview = $("#style-preview");
      preview.src = url;
      preview.hidden = false;
      $("#style-clear").hidden = false;
      setStatus(`style: ${file.name} (the seed is not used while a style image is set)`);
      changed();
    } catch (err) {
      showError(`Style image ${file.name}: ${err.message}`);
    }
  }

  function clearStyle() {
    state.style = null;
    $("#style-preview").hidden = true;
    $("#style-preview").removeAttribute("src");
    $("#style-clear").hidden = true;
    $("#style-upload").value = "";
    changed();
  }

  async function saveLabel() {
    clearError();
    try {
      const response = await postJSON("/api/label.png", {
        label_values: toBase64(state.values),
        width: state.width,
        height: state.height,
      });
      download(await response.blob(), "label.png");
    } catch (err) {
      showError(`Save label map: ${err.message}`);
    }
  }

  function saveColours() {
    canvas.toBlob((blob) => download(blob, "label-colours.png"), "image/png");
  }

  // ------------------------------------------------------------------ synthesis

  function readSeed() {
    const text = $("#seed").value.trim();
    const seed = Number(text);
    if (text === "" || !Number.isSafeInteger(seed) || seed < 0) {
      throw new Error(`the seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}, got "${text}"`);
    }
    return seed;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("#busy").hidden = !busy;
    const button = $("#generate");
    button.disabled = busy;
    button.textContent = busy ? "Generating…" : "Generate";
    $("#result-frame").setAttribute("aria-busy", String(busy));
  }

  async function generate() {
    if (!state.values) return;
    if (state.busy) {
      state.pending = true; // one more round with the latest map once this one is done
      return;
    }
    clearError();
    let seed = 0;
    try {
      if (state.info.multimodal) seed = readSeed();
    } catch (err) {
      showError(err.message);
      return;
    }
    setBusy(true);
    const started = performance.now();
    try {
      const body = { label_values: toBase64(state.values), width: state.width, height: state.height };
      if (state.info.multimodal) body.seed = seed;
      if (state.style) body.style = state.style;
      const response = await postJSON("/api/synthesize", body);
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const img = $("#result");
      img.src = url;
      await img.decode();
      if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
      state.resultUrl = url;
      img.hidden = false;
      $("#placeholder").hidden = true;
      const link = $("#download");
      link.href = url;
      link.hidden = false;
      state.generation += 1;
      img.dataset.seed = String(seed);
      img.dataset.generation = String(state.generation);
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      const how = state.style ? "style image" : state.info.multimodal ? `seed ${seed}` : "";
      setStatus(`generated in ${seconds} s${how ? ` (${how})` : ""}`);
    } catch (err) {
      showError(`Generate: ${err.message}`);
      setStatus("");
    } finally {
      setBusy(false);
      if (state.pending) {
        state.pending = false;
        generate();
      }
    }
  }

  // ------------------------------------------------------------------ set-up

  function describeModel(info) {
    const parts = [
      info.preset,
      `${info.classes.length} classes`,
      `${info.width}×${info.height}`,
      info.multimodal ? "multi-modal" : "single-modal",
      info.backend,
    ];
    $("#model-info").textContent = parts.filter(Boolean).join(" · ");
  }

  function setUpModel(info) {
    state.info = info;
    state.width = info.width;
    state.height = info.height;
    for (const cls of info.classes) {
      state.lut.set([...cls.colour, 255], cls.value * 4);
      state.names.set(cls.value, cls.name);
    }
    const hasDontcare = info.dontcare_value !== null && info.dontcare_value !== undefined;
    const first = info.classes[0];
    if (hasDontcare) {
      state.lut.set([...DONTCARE_COLOUR, 255], info.dontcare_value * 4);
      state.names.set(info.dontcare_value, "don't care");
      state.eraserValue = info.dontcare_value;
      $("#eraser-info").textContent =
        `The eraser paints “don't care” (value ${info.dontcare_value}, shown black): ` +
        "the model gets no class there.";
    } else {
      state.eraserValue = first.value;
      $("#eraser-info").textContent =
        `This model has no don't-care class: the eraser paints the first class, “${first.name}” (value ${first.value}).`;
    }

    canvas.width = info.width;
    canvas.height = info.height;
    imageData = ctx.createImageData(info.width, info.height);
    state.values = new Uint8Array(info.width * info.height).fill(state.eraserValue);
    let scale = DISPLAY_BOX / Math.max(info.width, info.height);
    if (scale >= 1) scale = Math.floor(scale);
    const root = document.documentElement.style;
    root.setProperty("--display", `${Math.round(info.width * scale)}px`);
    root.setProperty("--display-h", `${Math.round(info.height * scale)}px`);

    describeModel(info);
    buildPalette();
    selectClass(first.id);
    setTool("brush");
    render();

    const multimodal = Boolean(info.multimodal);
    for (const id of ["#seed", "#seed-random", "#style-upload"]) $(id).disabled = !multimodal;
    $("#style-upload").parentElement.classList.toggle("disabled", !multimodal);
    $("#mode-note").textContent = multimodal
      ? "Multi-modal model: each seed gives a different image for the same map; a style image copies a photo's look."
      : "This model has no image encoder: one image per label map, so seed and style images do not apply.";
    if (!multimodal) {
      $("#seed-row").title = $("#style-row").title = "needs a multi-modal (VAE) model";
    }
  }

  function bindEvents() {
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerUp);
    canvas.addEventListener("pointercancel", onPointerUp);
    canvas.addEventListener("pointerleave", () => { $("#hover-info").textContent = ""; });
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());

    $("#tool-brush").addEventListener("click", () => setTool("brush"));
    $("#tool-fill").addEventListener("click", () => setTool("fill"));
    $("#tool-eraser").addEventListener("click", () => setTool("eraser"));
    $("#brush-size").addEventListener("input", (e) => { $("#brush-size-value").textContent = e.target.value; });
    $("#undo").addEventListener("click", undo);
    $("#redo").addEventListener("click", redo);
    $("#clear").addEventListener("click", () => {
      snapshot();
      state.values.fill(state.eraserValue);
      render();
      changed();
    });
    $("#generate").addEventListener("click", generate);
    $("#seed-random").addEventListener("click", () => {
      $("#seed").value = String(Math.floor(Math.random() * 2 ** 31));
      changed();
    });
    $("#seed").addEventListener("change", () => changed());
    $("#label-upload").addEventListener("change", (e) => {
      const file = e.target.files[0];
      e.target.value = "";
      if (file) uploadLabel(file);
    });
    $("#style-upload").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) uploadStyle(file);
    });
    $("#style-clear").addEventListener("click", clearStyle);
    $("#save-label").addEventListener("click", saveLabel);
    $("#save-colours").addEventListener("click", saveColours);
    $("#error-close").addEventListener("click", clearError);

    document.addEventListener("keydown", (event) => {
      const target = event.target;
      if (target instanceof HTMLInputElement && target.type !== "range" && target.type !== "checkbox") return;
      const key = event.key.toLowerCase();
      if ((event.ctrlKey || event.metaKey) && key === "z") {
        event.preventDefault();
        event.shiftKey ? redo() : undo();
      } else if ((event.ctrlKey || event.metaKey) && key === "y") {
        event.preventDefault();
        redo();
      } else if (event.ctrlKey || event.metaKey || event.altKey) {
        return;
      } else if (key === "b") setTool("brush");
      else if (key === "f") setTool("fill");
      else if (key === "e") setTool("eraser");
      else if (key === "g") generate();
      else if (key === "[" || key === "]") {
        const input = $("#brush-size");
        input.value = String(Number(input.value) + (key === "]" ? 1 : -1));
        $("#brush-size-value").textContent = input.value;
      }
    });
  }

  async function start() {
    canvas = $("#canvas");
    ctx = canvas.getContext("2d");
    bindEvents();
    try {
      const response = await fetch("/api/info");
      if (!response.ok) throw new Error(await errorMessage(response));
      setUpModel(await response.json());
      document.body.dataset.ready = "true";
    } catch (err) {
      $("#model-info").textContent = "no model";
      showError(`Cannot load the model description: ${err.message}`);
    }
  }

  // a small read-only view for tests and the browser console
  window.studio = {
    get info() { return state.info; },
    get tool() { return state.tool; },
    labelValues: () => Array.from(state.values || []),
    generate,
  };

  start();
})();
