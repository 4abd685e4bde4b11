/* AllDS lab console: MQTT over WebSockets (MQTT.js, vendored by deploy/bootstrap.sh) to the broker only.
 * Devices: retained Status, Life (with trends), ModelState of every agent under {location}/{topic_root}/+/+.
 * Diagnoses: every public answer (B/Diagnosis) and this console's own private answers.
 * Classify: images published to B/Inference (or a pool's) with an MQTT 5 Response Topic under
 * B/Diagnosis/<user>/<this console's client id> and Correlation Data; answers shown beside each image. */
"use strict";
(() => {
  const HISTORY = 60;               // Life samples kept per device for the trend lines
  const MAX_ROWS = 5000;            // answers kept for the Diagnoses table
  const SHOWN_ROWS = 500;           // rows rendered at once
  const LATE_S = 30;                // an answer not here after this many seconds is flagged
  const DEFAULT_MAX_IMAGE = 10 * 1024 * 1024;  // the agent's default inference.max_payload_bytes
  const METRICS = [["CPU", "CPU", "%", 0, 100], ["Memory", "Memory", "%", 0, 100],
                   ["Diskspace", "Disk", "%", 0, 100], ["Temperature", "Temperature", "°C", null, null]];
  const REASONS = {
    underexposed: "underexposed", overexposed: "overexposed", low_contrast: "low contrast", out_of_focus: "out of focus",
    heavily_compressed: "heavily compressed", not_a_blood_smear: "not a blood smear",
    unfamiliar_colour: "colour unlike the smears the model was validated on", unfamiliar_image: "unfamiliar image",
    borderline: "borderline: the model cannot decide",
  };

  const $ = (selector, root = document) => root.querySelector(selector);
  const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const randomHex = (bytes) => Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
  const utf8 = new TextDecoder();
  const encoder = new TextEncoder();
  const timeOf = (iso) => { const d = iso ? new Date(iso) : new Date(); return isNaN(d) ? String(iso) : d.toLocaleTimeString([], { hour12: false }); };
  const percent = (p) => (typeof p === "number" ? `${(p * 100).toFixed(1)} %` : "—");
  const ms = (v) => (typeof v === "number" ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : "—");
  const reasonText = (reason) => (reason ? REASONS[reason] || String(reason).replace(/_/g, " ") : "");
  const shortSha = (sha) => (sha ? String(sha).slice(0, 12) : "");
  const validTopicLevel = (s) => s.length > 0 && !/[/+#\u0000]/.test(s);

  const state = {
    client: null, connected: false, everConnected: false, ready: false,
    location: "", root: "", replyUser: "", clientId: "", maxImage: DEFAULT_MAX_IMAGE,
    devices: new Map(),  // "zone/device" -> device record
    pools: new Map(),    // "zone/pool" -> {key, zone, name, members: Set of device keys or answer names, manual}
    names: new Map(),    // answer "device" name -> device key (learnt from public answers)
    rows: [], rowKeys: new Set(),
    requests: new Map(), // correlation id -> request record
    sent: 0,
  };

  // ---------------------------------------------------------------- connection
  function defaults() {
    const params = new URLSearchParams(location.search);
    const sameOrigin = location.protocol === "https:" ? `wss://${location.host}/` : location.protocol === "http:" ? `ws://${location.host}/` : "ws://127.0.0.1:9001/";
    $("#broker-url").value = params.get("broker") || sameOrigin;
    for (const [param, id] of [["location", "#location"], ["root", "#topic-root"], ["user", "#username"]]) {
      if (params.get(param)) $(id).value = params.get(param);
    }
    for (const pool of (params.get("pools") || "").split(",").filter(Boolean)) addPool(pool.trim(), true);
    if (params.get("connect") === "1") $("#connect-form").requestSubmit();
  }

  function setConn(kind, text) {
    const el = $("#conn-status");
    el.dataset.state = kind;
    el.textContent = text;
    $("#connect").disabled = kind === "connecting" || kind === "connected";
    $("#disconnect").disabled = !state.client;
    renderTarget();
  }

  function showError(text) {
    const el = $("#conn-error");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function showWarning(text) {
    const el = $("#conn-warning");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function connect(event) {
    event.preventDefault();
    showError("");
    showWarning("");
    if (typeof window.mqtt === "undefined") {
      showError("MQTT.js is missing (vendor/mqtt.min.js): run the set-up, deploy/bootstrap.sh, on the machine that serves this page.");
      return;
    }
    const url = $("#broker-url").value.trim();
    const loc = $("#location").value.trim();
    const root = $("#topic-root").value.trim();
    const user = $("#username").value.trim();
    const password = $("#password").value;
    if (!/^wss?:\/\//i.test(url)) { showError("The broker address must start with ws:// or wss://"); return; }
    if (!validTopicLevel(loc) || !validTopicLevel(root)) { showError("Location and topic root must be single topic levels (no /, + or #)."); return; }
    const replyUser = user || "anonymous";
    if (!validTopicLevel(replyUser)) { showError("The user name may not contain /, + or #: it names this console's private reply topic."); return; }
    disconnect();
    if (loc !== state.location || root !== state.root) resetData();
    Object.assign(state, { location: loc, root, replyUser, clientId: `console-${randomHex(6)}`, everConnected: false, ready: false });
    $("#devices-prefix").textContent = `${loc}/${root}`;
    setConn("connecting", `Connecting to ${url}…`);
    const client = window.mqtt.connect(url, {
      protocolVersion: 5, clientId: state.clientId, username: user || undefined, password: password || undefined,
      clean: false, properties: { sessionExpiryInterval: 300 },  // answers sent during a short drop wait for us
      reconnectPeriod: 3000, connectTimeout: 10000, resubscribe: false, keepalive: 30,
    });
    state.client = client;
    client.on("connect", (connack) => onConnect(client, connack, url, user));
    client.on("message", onMessage);
    client.on("reconnect", () => {
      if (client !== state.client) return;
      setConn("failed", state.everConnected ? "Disconnected from the broker: reconnecting…" : `Cannot reach the broker at ${url}: trying again…`);
    });
    client.on("close", () => {
      if (client !== state.client) return;
      state.connected = false;
      state.ready = false;
      if (!client.disconnecting) setConn("failed", state.everConnected ? "Disconnected from the broker: retrying every 3 s" : `Cannot reach the broker at ${url}: retrying every 3 s`);
      renderResultsOffline();
    });
    client.on("error", (err) => {
      if (client !== state.client) return;
      const code = err && err.code;
      if ([4, 5, 134, 135].includes(code)) {  // MQTT 3.1.1 / 5: bad user name or password, not authorised
        showError(`The broker refused this user name and password (${err.message}). Check both and connect again.`);
        client.end(true);
        state.client = null;
        setConn("failed", "Not connected: credentials refused");
      } else if (code !== undefined) {
        showError(`Broker error: ${err.message}`);
      }
    });
  }

  function disconnect() {
    if (state.client) {
      const client = state.client;
      state.client = null;
      client.end(true);
    }
    state.connected = false;
    state.ready = false;
    setConn("idle", "Not connected");
    renderResultsOffline();
  }

  function onConnect(client, connack, url, user) {
    if (client !== state.client) return;
    state.connected = true;
    state.everConnected = true;
    const limit = connack && connack.properties && connack.properties.maximumPacketSize;
    state.maxImage = limit ? Math.min(DEFAULT_MAX_IMAGE, limit - 65536) : DEFAULT_MAX_IMAGE;
    setConn("connected", `Connected${user ? ` as ${user}` : ""} to ${url}`);
    showError("");
    const base = `${state.location}/${state.root}/+/+`;
    // Diagnosis/# holds the public answers and the private ones under Diagnosis/<user>/...: the broker's ACL
    // decides which of them this user may read (usually the public ones and its own).
    const topics = [`${base}/Status`, `${base}/Life`, `${base}/ModelState`, `${base}/Diagnosis/#`];
    client.subscribe(topics, { qos: 1 }, (err, granted) => {
      if (client !== state.client) return;
      if (err) { showWarning(`Subscribing failed: ${err.message}`); return; }
      const refused = (granted || []).filter((g) => g.qos >= 128).map((g) => g.topic);
      showWarning(refused.length ? `The broker refused these subscriptions (its ACL?): ${refused.join(", ")}` : "");
      state.ready = true;
      renderTarget();
      renderResultsOffline();
    });
  }

  /** This console's private reply topic under a target's base (a device or a pool). */
  const replyTopic = (targetKey) => `${state.location}/${state.root}/${targetKey}/Diagnosis/${state.replyUser}/${state.clientId}`;

  function resetData() {
    state.devices.clear();
    state.names.clear();
    for (const [key, pool] of state.pools) if (!pool.manual) state.pools.delete(key); else pool.members.clear();
    state.rows = [];
    state.rowKeys.clear();
    renderDevices();
    renderDiagnoses();
  }

  // ---------------------------------------------------------------- incoming
  function parseJson(payload) {
    try {
      const doc = JSON.parse(utf8.decode(payload));
      return doc && typeof doc === "object" && !Array.isArray(doc) ? doc : null;
    } catch (e) {
      return null;
    }
  }

  function onMessage(topic, payload, packet) {
    const parts = topic.split("/");
    if (parts.length < 5 || parts[0] !== state.location || parts[1] !== state.root) return;
    const [, , zone, name, channel, ...rest] = parts;
    const key = `${zone}/${name}`;
    const props = packet.properties || {};
    if (channel === "Status" && rest.length === 0) {
      const text = utf8.decode(payload).trim();
      if (!text) return;  // a cleared retained Status
      const dev = device(key);
      if (dev.status !== text) dev.since = new Date();
      dev.status = text;
      dev.statusReason = (props.userProperties && props.userProperties.reason) || "";
      changed(dev);
    } else if (channel === "Life" && rest.length === 0) {
      const life = parseJson(payload);
      if (!life) return;
      const dev = device(key);
      dev.life = life;
      dev.lifeAt = new Date();
      for (const [field] of METRICS) {
        // HIAS 3 needs a number: there a Pi without a sensor sends Temperature 0 with TemperatureMeasured false.
        const unmeasured = field === "Temperature" && life.TemperatureMeasured === false;
        const value = typeof life[field] === "number" && !unmeasured ? life[field] : null;
        dev.history[field].push(value);
        if (dev.history[field].length > HISTORY) dev.history[field].shift();
      }
      const requestTopic = life.Agent && life.Agent.request_topic;
      if (typeof requestTopic === "string") poolFromRequestTopic(requestTopic, key);
      changed(dev);
    } else if (channel === "ModelState" && rest.length === 0) {
      const doc = parseJson(payload);
      if (!doc) return;
      const dev = device(key);
      dev.modelState = doc;
      changed(dev);
    } else if (channel === "Diagnosis") {
      const doc = parseJson(payload);
      if (!doc) return;
      if (rest.length === 0) {
        device(key);
        if (typeof doc.device === "string") state.names.set(doc.device, key);
        addRow(doc, key, "public");
      } else if (rest.length === 2 && rest[0] === state.replyUser && rest[1] === state.clientId) {
        const corr = props.correlationData ? utf8.decode(props.correlationData) : doc.id;
        onOwnAnswer(key, String(corr ?? ""), doc);
      } else {
        addRow(doc, key, "private");  // another requester's private answer, where the ACL lets this user read it
      }
    }
  }

  function device(key) {
    let dev = state.devices.get(key);
    if (!dev) {
      const [zone, name] = key.split("/");
      dev = { key, zone, name, status: "", statusReason: "", since: null, life: null, lifeAt: null, modelState: null,
              history: Object.fromEntries(METRICS.map(([f]) => [f, []])) };
      state.devices.set(key, dev);
    }
    return dev;
  }

  let renderQueued = false;
  function changed() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderDevices();
      renderTarget();
      renderResultsOffline();
    });
  }

  // ---------------------------------------------------------------- pools
  function addPool(key, manual) {
    if (!/^[^/+#]+\/[^/+#]+$/.test(key)) return false;
    let pool = state.pools.get(key);
    if (!pool) {
      const [zone, name] = key.split("/");
      pool = { key, zone, name, members: new Set(), manual };
      state.pools.set(key, pool);
    }
    pool.manual = pool.manual || manual;
    changed();
    return true;
  }

  /** Life.Agent.request_topic, when an agent reports it: a request topic other than its own makes it a pool member. */
  function poolFromRequestTopic(topic, deviceKey) {
    const prefix = `${state.location}/${state.root}/`;
    if (!topic.startsWith(prefix) || !topic.endsWith("/Inference")) return;
    const poolKey = topic.slice(prefix.length, -"/Inference".length);
    if (poolKey === deviceKey || !addPool(poolKey, false)) return;
    state.pools.get(poolKey).members.add(deviceKey);
  }

  /** A pool's members as device keys where known: answers name their agent (hias.name), mapped to its device
   * from its public answers, or a device of the pool's zone with that id. */
  function memberKeys(pool) {
    return [...new Set([...pool.members].map((m) => (state.devices.has(m) ? m : state.names.get(m) ||
      (state.devices.has(`${pool.zone}/${m}`) ? `${pool.zone}/${m}` : m))))];
  }

  // ---------------------------------------------------------------- Devices view
  function sparkline(values, lo, hi) {
    const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null);
    if (points.length < 2) return '<svg class="spark" viewBox="0 0 100 24" aria-hidden="true" focusable="false"></svg>';
    const nums = points.map(([, v]) => v);
    let min = lo ?? Math.min(...nums), max = hi ?? Math.max(...nums);
    if (max - min < 1e-9) { min -= 1; max += 1; }
    const n = values.length - 1 || 1;
    const coords = points.map(([i, v]) => `${((i / n) * 100).toFixed(1)},${(22 - ((v - min) / (max - min)) * 20).toFixed(1)}`).join(" ");
    return `<svg class="spark" viewBox="0 0 100 24" preserveAspectRatio="none" aria-hidden="true" focusable="false">` +
      `<polyline points="${coords}" fill="none" stroke="currentColor" stroke-width="1.5" vector-effect="non-scaling-stroke"/></svg>`;
  }

  function agoText(date) {
    if (!date) return "";
    const s = Math.max(0, Math.round((Date.now() - date.getTime()) / 1000));
    return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  }

  function servingModel(dev) {
    const agent = (dev.life && dev.life.Agent) || {};
    if (agent.model) return { name: agent.model, version: agent.model_version, sha256: agent.model_sha256 };
    const serving = dev.modelState && dev.modelState.serving;
    return serving && serving.name ? serving : null;
  }

  function deviceCard(dev) {
    const status = dev.status || "unknown";
    const life = dev.life;
    const agent = (life && life.Agent) || {};
    let html = `<header><h3>${esc(dev.name)}</h3><span class="zone">${esc(dev.zone)}</span>` +
      `<span class="badge ${esc(status)}" data-field="status">${esc(status)}</span></header>`;
    const reason = dev.status === "OFFLINE" && dev.statusReason ? ` (${esc(dev.statusReason)})` : "";
    html += `<p class="meta">${dev.since ? `${esc(status)}${reason} since ${esc(timeOf(dev.since))}` : "Status not seen yet"}` +
      ` · <span data-ago="life">${life ? `Life ${esc(agoText(dev.lifeAt))}` : "no Life yet"}</span></p>`;
    if (life) {
      html += '<dl class="metrics">';
      for (const [field, label, unit, lo, hi] of METRICS) {
        const v = dev.history[field][dev.history[field].length - 1];
        html += `<dt>${label}</dt><dd data-metric="${field}">${typeof v === "number" ? `${v.toFixed(1)} ${unit}` : "—"}</dd><dd>${sparkline(dev.history[field], lo, hi)}</dd>`;
      }
      html += "</dl>";
    }
    const model = servingModel(dev);
    if (model) {
      html += `<p>Model <strong data-field="model">${esc(model.name)}</strong> ${esc(model.version || "")}` +
        `${model.sha256 ? ` · <code title="sha256 ${esc(model.sha256)}">${esc(shortSha(model.sha256))}…</code>` : ""}</p>`;
    }
    const ms_ = dev.modelState;
    if (ms_) {
      html += `<p>ModelState <span class="badge ${esc(ms_.state)}" data-field="model-state">${esc(ms_.state)}</span> ${esc(ms_.name || "")} ${esc(ms_.version || "")}` +
        `${ms_.reason ? ` — ${esc(ms_.reason)}` : ""}${ms_.ts ? ` <span class="meta">(${esc(timeOf(ms_.ts))})</span>` : ""}</p>`;
    }
    if (life && agent) {
      const up = typeof agent.uptime_s === "number" ? ` · up ${agent.uptime_s < 5400 ? `${Math.round(agent.uptime_s / 60)} min` : `${(agent.uptime_s / 3600).toFixed(1)} h`}` : "";
      html += `<p class="meta">requests ${esc(agent.requests ?? "—")} · diagnoses ${esc(agent.diagnoses ?? "—")} · errors ${esc(agent.errors ?? "—")}${up}</p>`;
    }
    const pools = [...state.pools.values()].filter((p) => memberKeys(p).includes(dev.key)).map((p) => p.key);
    if (pools.length) html += `<p class="meta">member of pool ${esc(pools.join(", "))}</p>`;
    return html;
  }

  function poolCard(pool) {
    const members = memberKeys(pool);
    const online = members.filter((k) => (state.devices.get(k) || {}).status === "ONLINE").length;
    const status = members.length === 0 ? "members unknown" : `${online} of ${members.length} ONLINE`;
    let html = `<header><h3>${esc(pool.name)}</h3><span class="zone">${esc(pool.zone)} · pool</span>` +
      `<span class="badge ${online ? "ONLINE" : members.length ? "OFFLINE" : ""}" data-field="status">${esc(status)}</span></header>` +
      `<p class="meta">requests on <code>${esc(`${state.location}/${state.root}/${pool.key}/Inference`)}</code></p>`;
    if (members.length) {
      html += '<ul class="members">' + members.map((k) => {
        const dev = state.devices.get(k);
        return `<li>${esc(k)} — <span class="badge ${esc(dev ? dev.status : "")}">${esc(dev && dev.status ? dev.status : "unknown")}</span></li>`;
      }).join("") + "</ul>";
    } else {
      html += '<p class="meta">Members appear as they answer this console\'s requests (or report the pool in Life).</p>';
    }
    return html;
  }

  function syncCards(container, items, render, kind) {
    const keep = new Set(items.map((i) => i.key));
    for (const el of [...container.children]) if (!keep.has(el.dataset.key)) el.remove();
    items.forEach((item, index) => {
      let el = container.querySelector(`[data-key="${CSS.escape(item.key)}"]`);
      if (!el) {
        el = document.createElement("article");
        el.className = `card ${kind}`;
        el.dataset.key = item.key;
      }
      el.dataset.status = kind === "device" ? item.status || "unknown" : "";
      el.setAttribute("aria-label", `${kind} ${item.key}`);
      el.innerHTML = render(item);
      if (container.children[index] !== el) container.insertBefore(el, container.children[index] || null);
    });
  }

  function renderDevices() {
    const devices = [...state.devices.values()].sort((a, b) => a.key.localeCompare(b.key));
    const pools = [...state.pools.values()].sort((a, b) => a.key.localeCompare(b.key));
    syncCards($("#devices"), devices, deviceCard, "device");
    syncCards($("#pools"), pools, poolCard, "pool");
    $("#devices-section").hidden = devices.length === 0;
    $("#pools-section").hidden = pools.length === 0;
    $("#devices-empty").hidden = devices.length + pools.length > 0;
    const online = devices.filter((d) => d.status === "ONLINE").length;
    $("#count-devices").textContent = devices.length ? `(${online}/${devices.length} online)` : "";
    renderTargetOptions();
  }

  // ---------------------------------------------------------------- Diagnoses view
  function outcome(doc) {
    if (doc.error && typeof doc.error === "object") return { result: "Error", reason: doc.error.code || "error", detail: doc.error.message || "" };
    if (["Positive", "Negative", "Indeterminate"].includes(doc.diagnosis)) return { result: doc.diagnosis, reason: doc.reason || "", detail: "" };
    return { result: "Unknown", reason: "", detail: "" };
  }

  function addRow(doc, topicKey, source) {
    const rowKey = `${topicKey}|${doc.id}|${source}`;
    if (state.rowKeys.has(rowKey)) return;  // a redelivered request answered twice: keep the first
    state.rowKeys.add(rowKey);
    const { result, reason, detail } = outcome(doc);
    const deviceKey = (typeof doc.device === "string" && state.names.get(doc.device)) || topicKey;
    state.rows.unshift({
      ts: doc.ts, name: doc.name, device: deviceKey, deviceName: doc.device, result, reason, detail,
      confidence: doc.confidence, latency: doc.timing_ms && doc.timing_ms.total, id: doc.id, mine: source === "mine",
    });
    if (state.rows.length > MAX_ROWS) state.rows.length = MAX_ROWS;
    scheduleDiagnoses();
  }

  let diagnosesQueued = false;
  function scheduleDiagnoses() {
    if (diagnosesQueued) return;
    diagnosesQueued = true;
    requestAnimationFrame(() => { diagnosesQueued = false; renderDiagnoses(); });
  }

  function renderDiagnoses() {
    const text = $("#filter-text").value.trim().toLowerCase();
    const result = $("#filter-result").value;
    const dev = $("#filter-device").value;
    const mineOnly = $("#filter-mine").checked;
    const shown = state.rows.filter((r) => (!result || r.result === result) && (!dev || r.device === dev) && (!mineOnly || r.mine) &&
      (!text || [r.name, r.device, r.deviceName, r.reason, r.result, r.id].some((v) => String(v ?? "").toLowerCase().includes(text))));
    const counts = { Positive: 0, Negative: 0, Indeterminate: 0, Error: 0 };
    for (const r of shown) if (r.result in counts) counts[r.result] += 1;
    const filtered = shown.length !== state.rows.length ? ` (of ${state.rows.length})` : "";
    $("#diagnosis-counts").innerHTML = `<span class="n" data-count="total">${shown.length}</span> ${shown.length === 1 ? "answer" : "answers"}${filtered}: ` +
      Object.entries(counts).map(([k, n]) => `<span class="n" data-count="${k}">${n}</span> ${k === "Error" ? "errors" : k}`).join(" · ");
    $("#count-diagnoses").textContent = state.rows.length ? `(${state.rows.length})` : "";
    $("#diagnoses tbody").innerHTML = shown.slice(0, SHOWN_ROWS).map((r) =>
      `<tr class="${r.mine ? "mine" : ""}" data-id="${esc(r.id)}">` +
      `<td>${esc(timeOf(r.ts))}</td><td class="image">${esc(r.name ?? "—")}</td>` +
      `<td title="${esc(r.deviceName || "")}">${esc(r.device)}</td>` +
      `<td><span class="badge ${esc(r.result)}" data-field="result">${esc(r.result)}</span></td>` +
      `<td data-field="reason" title="${esc(r.detail)}">${esc(r.result === "Error" ? r.reason : reasonText(r.reason))}</td>` +
      `<td class="num" data-field="confidence">${percent(r.confidence)}</td><td class="num">${ms(r.latency)}</td></tr>`).join("");
    const options = ['<option value="">All</option>'].concat([...new Set(state.rows.map((r) => r.device))].sort()
      .map((k) => `<option value="${esc(k)}"${k === dev ? " selected" : ""}>${esc(k)}</option>`));
    const select = $("#filter-device");
    if (select.options.length !== options.length) select.innerHTML = options.join("");
  }

  // ---------------------------------------------------------------- Classify view
  function renderTargetOptions() {
    const select = $("#target");
    const current = select.value;
    const options = [];
    for (const pool of [...state.pools.values()].sort((a, b) => a.key.localeCompare(b.key))) {
      options.push([`pool:${pool.key}`, `Pool ${pool.key}`]);
    }
    for (const dev of [...state.devices.values()].sort((a, b) => a.key.localeCompare(b.key))) {
      options.push([`device:${dev.key}`, `${dev.key} — ${dev.status || "status unknown"}`]);
    }
    const signature = JSON.stringify(options);
    if (select.dataset.signature !== signature) {
      select.dataset.signature = signature;
      select.innerHTML = options.length ? options.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("")
        : '<option value="">(no device yet)</option>';
      const values = options.map(([v]) => v);
      const online = [...state.devices.values()].filter((d) => d.status === "ONLINE").map((d) => `device:${d.key}`);
      select.value = values.includes(current) ? current : online.find((v) => values.includes(v)) || values[0] || "";
    }
  }

  function target() {
    const value = $("#target").value;
    if (!value) return null;
    const [kind, key] = [value.slice(0, value.indexOf(":")), value.slice(value.indexOf(":") + 1)];
    return { kind, key };
  }

  /** Whether the target can answer now: {level: ok|warn|bad, text}. */
  function targetState() {
    if (!state.connected) return { level: "bad", text: "Not connected to the broker: connect first; nothing can be sent." };
    if (!state.ready) return { level: "warn", text: "Subscribing to the broker…" };
    const t = target();
    if (!t) return { level: "bad", text: "No device seen yet under this location and topic root." };
    if (t.kind === "device") {
      const dev = state.devices.get(t.key);
      const status = dev && dev.status;
      if (status === "ONLINE") return { level: "ok", text: `${t.key} is ONLINE.` };
      return { level: "warn", text: `${t.key} is ${status || "of unknown status"}: requests wait in the broker until it comes back (if it keeps a session).` };
    }
    const pool = state.pools.get(t.key);
    const members = pool ? memberKeys(pool) : [];
    const online = members.filter((k) => (state.devices.get(k) || {}).status === "ONLINE");
    if (!members.length) return { level: "ok", text: `Pool ${t.key}: members not known yet; they show as they answer.` };
    if (!online.length) return { level: "warn", text: `Pool ${t.key}: no member ONLINE; requests wait in the broker.` };
    return { level: "ok", text: `Pool ${t.key}: ${online.length} of ${members.length} members ONLINE.` };
  }

  function renderTarget() {
    const s = targetState();
    const el = $("#target-state");
    if (el.textContent !== s.text) el.textContent = s.text;
    el.dataset.level = s.level;
    $("#drop").dataset.state = state.connected && state.ready ? ($("#drop").dataset.state === "over" ? "over" : "idle") : "disabled";
  }

  function resultCard(file, id) {
    const li = document.createElement("li");
    li.className = "result";
    li.dataset.id = id;
    li.dataset.name = file.name;
    li.innerHTML = `<figure class="thumb"><img class="image" alt=""><img class="heat" alt="" hidden></figure>` +
      `<div class="answer"><h3 class="name"></h3><p class="verdict"></p><p class="reason" hidden></p><dl></dl>` +
      `<p class="state" role="status"></p><button type="button" class="toggle-heat" aria-pressed="true" hidden>Heat map: on</button></div>`;
    $(".name", li).textContent = file.name;
    const img = $(".image", li);
    img.alt = `Image ${file.name}`;
    img.src = URL.createObjectURL(file);
    $(".toggle-heat", li).addEventListener("click", (e) => {
      const on = e.currentTarget.getAttribute("aria-pressed") !== "true";
      e.currentTarget.setAttribute("aria-pressed", String(on));
      e.currentTarget.textContent = `Heat map: ${on ? "on" : "off"}`;
      $(".heat", li).hidden = !on;
    });
    return li;
  }

  function setCardState(req, kind, text) {
    req.card.dataset.state = kind;
    $(".state", req.card).textContent = text;
  }

  async function sendFiles(files) {
    const images = [...files];
    if (!images.length) return;
    const s = targetState();
    const t = target();
    const batch = images.map((file) => {
      const id = `${state.clientId}-${++state.sent}`;
      const req = { id, file, card: resultCard(file, id), target: t, sentAt: 0, answered: false, acked: false };
      state.requests.set(id, req);
      return req;
    });
    $("#results").prepend(...batch.map((req) => req.card));  // newest batch on top, in the order given
    $("#count-classify").textContent = `(${state.requests.size})`;
    for (const req of batch) {
      const file = req.file;
      if (!state.connected || !state.ready || !t) { setCardState(req, "failed", `Not sent: ${s.text}`); continue; }
      if (file.size > state.maxImage) {
        setCardState(req, "failed", `Not sent: ${(file.size / 1048576).toFixed(1)} MiB is over the ${(state.maxImage / 1048576).toFixed(0)} MiB the agent accepts.`);
        continue;
      }
      if (file.size === 0) { setCardState(req, "failed", "Not sent: the file is empty."); continue; }
      setCardState(req, "sending", "Sending…");
      const payload = new Uint8Array(await file.arrayBuffer());
      req.sha256 = await sha256Hex(payload);
      publish(req, payload);
    }
  }

  // An answer names the SHA-256 of the image it is about; another requester can have the agent answer under our
  // id about its own image (docs/protocol.md, "Check sha256"). WebCrypto exists only in secure contexts (https,
  // localhost): elsewhere there is no hash to check against.
  async function sha256Hex(bytes) {
    if (!(window.crypto && crypto.subtle)) return null;
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
    return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function publish(req, payload) {
    const t = req.target;
    const userProperties = { name: req.file.name };
    if ($("#explain").checked) userProperties.explain = "1";
    const client = state.client;
    if (!client || !state.connected) { setCardState(req, "failed", "Not sent: the broker connection closed."); return; }
    req.sentAt = performance.now();
    client.publish(`${state.location}/${state.root}/${t.key}/Inference`, payload, {
      qos: 1, properties: { responseTopic: replyTopic(t.key), correlationData: encoder.encode(req.id), userProperties },
    }, (err) => {
      if (req.answered) return;
      if (err) { setCardState(req, "failed", `Not sent: ${err.message}`); return; }
      req.acked = true;
      updatePending(req);
    });
  }

  function updatePending(req) {
    if (req.answered || !req.sentAt || req.card.dataset.state === "failed") return;
    const waited = (performance.now() - req.sentAt) / 1000;
    const t = req.target;
    let kind = "waiting", text = req.acked ? `Waiting for the answer from ${t.kind === "pool" ? `pool ${t.key}` : t.key}…` : "Sending…";
    if (!state.connected) { kind = "offline"; text = "Broker connection lost: the answer arrives when the console reconnects (within 5 min)."; }
    else if (t.kind === "device" && (state.devices.get(t.key) || {}).status !== "ONLINE") {
      kind = "offline";
      text = `${t.key} is ${(state.devices.get(t.key) || {}).status || "of unknown status"}: the request waits in the broker until the device is back.`;
    } else if (waited > LATE_S) { kind = "late"; text = `No answer after ${Math.round(waited)} s; still waiting.`; }
    if (req.card.dataset.state !== kind || $(".state", req.card).textContent !== text) setCardState(req, kind, text);
  }

  function renderResultsOffline() {
    for (const req of state.requests.values()) updatePending(req);
  }

  function onOwnAnswer(topicKey, id, doc) {
    const req = state.requests.get(id);
    // The console sends the image itself as the payload: a diagnosis names its SHA-256, an error the payload's.
    // Nothing is an answer to a card not sent yet (ids are predictable); without WebCrypto (sha256 null) the
    // hash cannot be checked.
    const about = "diagnosis" in doc ? doc.sha256 : doc.payload_sha256;
    if (req && (!req.sentAt || (req.sha256 !== null && about !== req.sha256))) {
      console.warn(`ignored an answer under id ${id} about other bytes (sha256 ${String(about)})`);
      return;
    }
    if (typeof doc.device === "string" && req && req.target.kind === "pool") {
      const pool = state.pools.get(req.target.key);
      if (pool) { pool.members.add(state.names.get(doc.device) || doc.device); changed(); }
    } else if (typeof doc.device === "string" && req && req.target.kind === "device") {
      state.names.set(doc.device, req.target.key);
    }
    addRow(doc, topicKey, "mine");
    if (!req || req.answered) return;  // not ours any more (another page load), or a duplicate
    req.answered = true;
    const roundTrip = performance.now() - req.sentAt;
    const { result, reason, detail } = outcome(doc);
    const card = req.card;
    card.dataset.state = "answered";
    card.dataset.result = result;
    const verdict = $(".verdict", card);
    verdict.innerHTML = `<span class="badge ${esc(result)}" data-field="result">${esc(result === "Error" ? `Error: ${reason}` : result)}</span>`;
    const reasonEl = $(".reason", card);
    if (result === "Indeterminate" || result === "Error") {
      reasonEl.hidden = false;
      reasonEl.dataset.reason = reason;
      reasonEl.textContent = result === "Error" ? detail || reason : `Reason: ${reasonText(reason) || "not given"}`;
    }
    const model = doc.model || {};
    // P(ALL) as the agent defines it (docs/protocol.md): 1 − P(Benign); int8 outputs need not sum to exactly 1.
    const probs = doc.probabilities || {};
    const allP = typeof probs.Benign === "number" ? 1 - probs.Benign : typeof probs.ALL === "number" ? probs.ALL : null;
    const rows = [];
    if (result !== "Error") rows.push(["Confidence", percent(doc.confidence), "confidence"]);
    if (allP !== null) rows.push(["P(ALL)", percent(allP), "p-all"]);
    rows.push(["Device", doc.device || topicKey, "device"]);
    if (model.name) rows.push(["Model", `${model.name} ${model.version || ""}`.trim(), "model"]);
    rows.push(["Latency", `${ms(doc.timing_ms && doc.timing_ms.total)} on the device · ${ms(roundTrip)} round trip`, "latency"]);
    const explanation = doc.explanation;
    if (explanation && typeof explanation.png === "string" && /^[A-Za-z0-9+/=\s]+$/.test(explanation.png)) {
      const heat = $(".heat", card);
      heat.src = `data:image/png;base64,${explanation.png.replace(/\s/g, "")}`;
      heat.alt = `Explanation heat map (${explanation.method || "method not given"}) for ${req.file.name}`;
      heat.hidden = false;
      $(".toggle-heat", card).hidden = false;
      rows.push(["Explanation", `${explanation.method || "heat map"}${typeof explanation.ms === "number" ? `, ${ms(explanation.ms)}` : ""}`, "explanation"]);
    } else if ($("#explain").checked && result !== "Error") {
      rows.push(["Explanation", "not provided by this agent", "explanation"]);
    }
    $("dl", card).innerHTML = rows.map(([k, v, f]) => `<dt>${esc(k)}</dt><dd data-field="${f}">${esc(v)}</dd>`).join("");
    $(".state", card).textContent = `Answered at ${timeOf(doc.ts)}`;
  }

  // ---------------------------------------------------------------- wiring
  function selectTab(tab, focus) {
    for (const t of document.querySelectorAll('[role="tab"]')) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
  }

  function wire() {
    $("#connect-form").addEventListener("submit", connect);
    $("#disconnect").addEventListener("click", () => { disconnect(); showWarning(""); });
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    for (const tab of tabs) {
      tab.addEventListener("click", () => selectTab(tab, false));
      tab.addEventListener("keydown", (e) => {
        const i = tabs.indexOf(tab);
        const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
        if (next === undefined) return;
        e.preventDefault();
        selectTab(tabs[(next + tabs.length) % tabs.length], true);
      });
    }
    for (const id of ["#filter-text", "#filter-result", "#filter-device", "#filter-mine"]) $(id).addEventListener("input", renderDiagnoses);
    $("#target").addEventListener("change", () => { renderTarget(); });
    $("#files").addEventListener("change", (e) => { sendFiles(e.target.files); e.target.value = ""; });
    $("#clear-results").addEventListener("click", () => {
      for (const req of state.requests.values()) URL.revokeObjectURL($(".image", req.card).src);
      state.requests.clear();
      $("#results").innerHTML = "";
      $("#count-classify").textContent = "";
    });
    const drop = $("#drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); if (drop.dataset.state !== "disabled") drop.dataset.state = "over"; });
    drop.addEventListener("dragleave", () => { if (drop.dataset.state === "over") drop.dataset.state = "idle"; });
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      if (drop.dataset.state === "over") drop.dataset.state = "idle";
      sendFiles(e.dataTransfer.files);
    });
    // A file dropped anywhere else must not make the browser navigate away from the console.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    $("#pool-form").addEventListener("submit", (e) => {
      e.preventDefault();
      if (addPool($("#pool-name").value.trim(), true)) $("#pool-name").value = "";
    });
    setInterval(() => {
      for (const dev of state.devices.values()) {
        const el = document.querySelector(`#devices [data-key="${CSS.escape(dev.key)}"] [data-ago="life"]`);
        if (el && dev.lifeAt) el.textContent = `Life ${agoText(dev.lifeAt)}`;
      }
      renderResultsOffline();
    }, 1000);
  }

  wire();
  defaults();
  renderDevices();
  renderDiagnoses();
  renderTarget();
})();
