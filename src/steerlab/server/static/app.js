// steerlab playground: plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, nLayers: 0, vectors: [], steering: [], maxStrength: 16 };
// the key lives as long as the tab (a reload keeps it, closing the tab forgets it)
const KEY_SLOT = "steerlab-api-key";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function getJSON(path) {
  const reply = await fetch(path, { headers: headers() });
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error ? body.error.message : reply.statusText);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
}

// (re)load the model and its vectors: on start, and whenever the API key changes
async function connect() {
  state.model = null;
  state.vectors = [];
  const picker = $("vector-picker");
  const readout = $("readout-vector");
  picker.length = 1; // keep the "+ add a vector" placeholder
  readout.length = 1; // keep "none"
  try {
    const health = await getJSON("/health");
    state.maxStrength = Math.min(health.limits.max_strength, 32);
    const models = await getJSON("/v1/models");
    const vectors = await getJSON("/v1/vectors");
    state.model = models.data[0].id;
    state.nLayers = models.data[0].n_layers || 0;
    state.vectors = vectors.data;
    $("model-info").textContent =
      `${state.model} · ${state.nLayers} layers · ${state.vectors.length} vector(s)`;
    showError("");
  } catch (err) {
    $("model-info").textContent = "not connected";
    $("api-key-box").open = true;
    showError(String(err.message || err) + " (enter the server's API key under 'API key')");
  }
  for (const v of state.vectors) {
    picker.add(new Option(`${v.id}  (layers ${v.layers.join(", ")})`, v.id));
    readout.add(new Option(v.id, v.id));
  }
  // entries whose vector this server does not have (any more) cannot be sent
  state.steering = state.steering.filter((s) => state.vectors.some((v) => v.id === s.vector));
  renderSteering();
  fillReadoutLayers();
}

function init() {
  const saved = sessionStorage.getItem(KEY_SLOT);
  if (saved) {
    $("api-key").value = saved;
    $("api-key-box").open = true;
  }
  let tried = saved || "";
  const keyChanged = () => {
    const key = $("api-key").value.trim();
    if (key === tried && state.model) return; // Enter, then the change event of the same key
    tried = key;
    if (key) sessionStorage.setItem(KEY_SLOT, key);
    else sessionStorage.removeItem(KEY_SLOT);
    connect();
  };
  $("api-key").addEventListener("change", keyChanged);
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      keyChanged();
    }
  });
  $("readout-vector").addEventListener("change", fillReadoutLayers);
  connect();
}

// why the steered pane cannot be generated as asked, or "" when it can: the steered pane
// must never quietly show an unsteered continuation
function steeringProblem() {
  if (!state.model) return "not connected to the server (see the error above, or the API key)";
  if (!state.steering.length) {
    return "add a steering vector first: without one the steered pane would be unsteered";
  }
  const missing = state.steering.filter((s) => !state.vectors.some((v) => v.id === s.vector));
  if (missing.length) {
    return `the server has no vector ${missing.map((s) => s.vector).join(", ")} any more`;
  }
  if (state.steering.every((s) => Number(s.strength) === 0)) {
    return "every steering strength is 0: move a strength slider (the steered pane would " +
      "equal the unsteered one)";
  }
  return "";
}

function fillReadoutLayers() {
  const select = $("readout-layer");
  select.innerHTML = "";
  const vec = state.vectors.find((v) => v.id === $("readout-vector").value);
  for (let layer = 0; layer < state.nLayers; layer++) {
    select.add(new Option(`layer ${layer}`, String(layer)));
  }
  if (vec) select.value = String(vec.layers[0]);
  select.disabled = !vec;
}

function addSteering(name) {
  const vec = state.vectors.find((v) => v.id === name);
  if (!vec) return;
  const recommended = Number(vec.recommended_strength) || 0;
  const item = { vector: name, strength: recommended, layer: "own", positions: "all" };
  state.steering.push(item);
  renderSteering();
}

function renderSteering() {
  const list = $("steering-list");
  list.innerHTML = "";
  state.steering.forEach((item, index) => {
    const vec = state.vectors.find((v) => v.id === item.vector);
    const box = document.createElement("div");
    box.className = "steer-item";
    box.dataset.vector = item.vector;
    const layerOptions = ['<option value="own">its layers (' + vec.layers.join(", ") + ")</option>"];
    if (vec.layers.length === 1) {
      for (let layer = 0; layer < state.nLayers; layer++) {
        layerOptions.push(`<option value="${layer}">layer ${layer}</option>`);
      }
    }
    box.innerHTML = `
      <div class="steer-head"><span>${item.vector}</span>
        <button type="button" title="remove" aria-label="remove ${item.vector}">✕</button></div>
      <label>strength <span class="value">${item.strength.toFixed(1)}</span></label>
      <input class="strength" type="range" min="${-state.maxStrength}" max="${state.maxStrength}"
             step="0.5" value="${item.strength}" aria-label="strength of ${item.vector}">
      <div class="row">
        <select class="layer" aria-label="layer">${layerOptions.join("")}</select>
        <select class="positions" aria-label="positions">
          <option value="all">all positions</option>
          <option value="last">last + generated</option>
          <option value="prompt">prompt only</option>
          <option value="generated">generated only</option>
        </select>
      </div>`;
    const slider = box.querySelector(".strength");
    slider.addEventListener("input", () => {
      item.strength = Number(slider.value);
      box.querySelector(".value").textContent = item.strength.toFixed(1);
      summarize();
    });
    const layer = box.querySelector(".layer");
    layer.value = item.layer;
    layer.addEventListener("change", () => { item.layer = layer.value; summarize(); });
    const positions = box.querySelector(".positions");
    positions.value = item.positions;
    positions.addEventListener("change", () => { item.positions = positions.value; summarize(); });
    box.querySelector("button").addEventListener("click", () => {
      state.steering.splice(index, 1);
      renderSteering();
    });
    list.appendChild(box);
  });
  summarize();
}

function summarize() {
  $("steer-summary").textContent = state.steering
    .map((s) => `${s.vector} ×${s.strength}` + (s.layer === "own" ? "" : ` @${s.layer}`))
    .join(" + ");
}

function steeringField() {
  return state.steering.map((s) => ({
    vector: s.vector,
    strength: s.layer === "own" ? s.strength : { [s.layer]: s.strength },
    positions: s.positions,
  }));
}

function colour(value, scale) {
  const t = Math.max(-1, Math.min(1, scale ? value / scale : 0));
  const [r, g, b] = t >= 0 ? [217, 72, 15] : [59, 91, 219];
  return `rgba(${r}, ${g}, ${b}, ${(Math.abs(t) * 0.85 + 0.05).toFixed(3)})`;
}

// one colour scale for both strips, so the panes' probe scores compare at a glance
const strips = new Map();

function renderStrip(strip, tokens) {
  strips.set(strip, tokens);
  const all = [...strips.values()].flat();
  const scale = Math.max(1e-6, ...all.map((t) => Math.abs(t.value)));
  for (const [other, otherTokens] of strips) {
    if (other !== strip) paintStrip(other, otherTokens, scale);
  }
  paintStrip(strip, tokens, scale);
}

function paintStrip(strip, tokens, scale) {
  strip.innerHTML = "";
  for (const t of tokens) {
    const span = document.createElement("span");
    span.textContent = t.text.replace(/\n/g, "⏎") || "·";
    span.style.background = colour(t.value, scale);
    span.style.color = Math.abs(t.value) / scale > 0.55 ? "#fff" : "#1d2330";
    span.title = t.value.toFixed(3);
    strip.appendChild(span);
  }
}

async function stream(body, pane, strip, usageBox) {
  pane.textContent = "";
  pane.dataset.done = "false";
  pane.dataset.failed = "false";
  pane.dataset.streaming = "true";
  strip.innerHTML = "";
  strips.delete(strip);
  usageBox.textContent = "";
  const chat = body.messages !== undefined;
  const path = chat ? "/v1/chat/completions" : "/v1/completions";
  const reply = await fetch(path, {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!reply.ok) {
    const err = await reply.json().catch(() => ({}));
    pane.dataset.streaming = "false";
    pane.dataset.failed = "true";
    throw new Error(err.error ? err.error.message : reply.statusText);
  }
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  const tokens = [];
  let buffer = "";
  let chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          pane.dataset.streaming = "false";
          pane.dataset.failed = "true";
          throw new Error(chunk.error.message);
        }
        if (chunk.usage) {
          usageBox.textContent =
            `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} generated tokens`;
        }
        for (const choice of chunk.choices || []) {
          const text = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
          pane.textContent += text;
          if (choice.readout && choice.readout[0] && choice.readout[0].values.length) {
            tokens.push({ text, value: choice.readout[0].values[0] });
            renderStrip(strip, tokens);
          }
          chunks += 1;
          pane.dataset.chunks = String(chunks);
        }
      }
    }
  }
  pane.dataset.streaming = "false";
  pane.dataset.done = "true";
}

async function generate() {
  const problem = steeringProblem();
  if (problem) {
    showError(problem);
    return;
  }
  showError("");
  const button = $("generate");
  button.disabled = true;
  const prompt = $("prompt").value;
  const chat = document.querySelector('input[name="mode"]:checked').value === "chat";
  const base = {
    model: "default",
    max_tokens: Number($("max-tokens").value) || 40,
    temperature: Number($("temperature").value) || 0,
  };
  if (chat) base.messages = [{ role: "user", content: prompt }];
  else base.prompt = prompt;
  const readoutVector = $("readout-vector").value;
  if (readoutVector) {
    base.readout = [{ vector: readoutVector, layer: Number($("readout-layer").value) }];
  }
  if (Number(base.temperature) > 0) base.seed = 1234; // same randomness in both panes
  try {
    await Promise.all([
      stream(base, $("pane-base"), $("readout-base"), $("usage-base")),
      stream({ ...base, steering: steeringField() }, $("pane-steered"), $("readout-steered"),
             $("usage-steered")),
    ]);
  } catch (err) {
    showError(String(err.message || err));
    // a failed steered request leaves its pane empty, never with someone else's text
    for (const pane of [$("pane-base"), $("pane-steered")]) {
      if (pane.dataset.failed === "true") pane.textContent = "";
    }
  } finally {
    button.disabled = false;
  }
}

$("vector-picker").addEventListener("change", (event) => {
  addSteering(event.target.value);
  event.target.value = "";
});
$("generate").addEventListener("click", generate);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
});
init();
