// The farm's pages: plain JavaScript over /v1 (the session cookie authenticates; state-changing calls
// carry the page's CSRF value). Rows are updated in place, never rebuilt, so nothing shifts.
"use strict";
const CSRF = document.querySelector('meta[name="farm-csrf"]').content;

async function request(method, path, body, type) {
  const headers = {"X-Farm-CSRF": CSRF};
  if (body !== undefined) headers["Content-Type"] = type;
  const response = await fetch(path, {method, headers, credentials: "same-origin", body});
  if (response.status === 401) { window.location = "/ui/login"; throw new Error("logged out"); }
  const data = await response.json();
  return {ok: response.ok, status: response.status, data};
}

async function api(method, path, body) {
  const answer = await request(method, path, body === undefined ? undefined : JSON.stringify(body), "application/json");
  if (!answer.ok) throw new Error(answer.data.detail || JSON.stringify(answer.data));
  return answer.data;
}

function cell(row, key) { return row.querySelector(`[data-key="${key}"]`); }
function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
function seconds(s) { return s >= 90 ? `${(s / 60).toFixed(1)} min` : `${s.toFixed(1)} s`; }
function where(loc) { return loc.length ? loc.join(".") : "(storyboard)"; }
function mb(bytes) { return bytes == null ? "?" : `${Math.round(bytes / 2 ** 20)} MiB`; }

// --- queue -------------------------------------------------------------------------------------
function queueRow(job) {
  const row = document.createElement("tr");
  row.id = `job-${job.id}`;
  row.innerHTML = `<td><a data-key="link"></a></td><td data-key="title"></td><td data-key="state"></td>
    <td><input type="number" min="-100" max="100" data-key="priority" aria-label="priority"></td>
    <td class="num"><progress max="1" data-key="progress" aria-label="progress"></progress></td><td data-key="created"></td>
    <td data-key="finished"></td><td><button data-key="cancel">Cancel</button>
    <button data-key="requeue">Requeue</button></td>`;
  cell(row, "link").href = `/ui/jobs/${job.id}`;
  setText(cell(row, "link"), job.id);
  const say = (text) => setText(document.getElementById("message"), text);
  cell(row, "cancel").onclick = () => api("DELETE", `/v1/jobs/${job.id}`).then(refresh, (e) => say(e.message));
  cell(row, "requeue").onclick = () => api("POST", `/v1/jobs/${job.id}/requeue`).then(refresh, (e) => say(e.message));
  cell(row, "priority").onchange = (event) => api("PATCH", `/v1/jobs/${job.id}`, {priority: Number(event.target.value)})
    .then(refresh, (e) => say(e.message));
  return row;
}

async function refresh() {
  const body = document.querySelector("#jobs tbody");
  const wanted = document.getElementById("filter").value;
  const jobs = await api("GET", "/v1/jobs");
  for (const job of jobs) {
    let row = document.getElementById(`job-${job.id}`);
    if (!row) { row = queueRow(job); body.prepend(row); }
    row.hidden = Boolean(wanted) && job.state !== wanted;
    row.dataset.state = job.state;
    setText(cell(row, "title"), job.title);
    setText(cell(row, "state"), job.state);
    const priority = cell(row, "priority");
    if (document.activeElement !== priority) priority.value = job.priority;
    cell(row, "progress").value = job.progress;
    setText(cell(row, "created"), when(job.created));
    setText(cell(row, "finished"), when(job.finished));
    const active = job.state === "queued" || job.state === "running";
    cell(row, "cancel").disabled = !active;
    cell(row, "requeue").disabled = active;
  }
}

// --- one job: every shot in a Map, only the shown page of them in the DOM --------------------------
const PAGE_SIZE = 50;
const job = {id: null, shots: new Map(), order: [], page: 0};

function shotRow(id) {
  const row = document.createElement("tr");
  row.id = `shot-${id}`;
  row.innerHTML = `<td data-key="id"></td><td data-key="state"></td><td data-key="stage"></td>
    <td data-key="worker" class="wide"></td><td data-key="tier"></td><td data-key="preset" class="wide"></td>
    <td data-key="seconds" class="wide num"></td><td data-key="qc"></td>
    <td><img data-key="keyframe" alt="keyframe of ${id}" class="pending"></td>
    <td><video data-key="clip" controls preload="metadata" class="pending" aria-label="clip of ${id}"></video></td>`;
  setText(cell(row, "id"), id);
  return row;
}

function qcText(qc) {
  return qc.passed ? `pass (take ${qc.take})` : `fail: ${qc.failed.join(", ")} (take ${qc.take})`;
}

function paint(row, shot) {
  setText(cell(row, "state"), shot.state || "");
  setText(cell(row, "stage"), shot.stage || "");
  setText(cell(row, "worker"), shot.worker || "");
  setText(cell(row, "tier"), shot.tier || "");
  setText(cell(row, "preset"), shot.preset || "");
  setText(cell(row, "seconds"), shot.seconds == null ? "" : shot.seconds.toFixed(1));
  setText(cell(row, "qc"), shot.qc ? qcText(shot.qc) : "");
  for (const kind of ["keyframe", "clip"]) {
    const el = cell(row, kind);
    const version = shot.media && shot.media[kind];
    if (version && el.dataset.version !== String(version)) {
      el.dataset.version = String(version);
      el.src = `/v1/jobs/${job.id}/shots/${shot.id}/${kind}?v=${version}`;
      // The event can come before the file is written (the encoder writes keyframes beside the loop):
      // try again a little later, a few times.
      let tries = 0;
      el.onerror = () => { if (++tries <= 5) setTimeout(() => { el.src = `${el.src.split("&")[0]}&r=${tries}`; }, 500 * tries); };
      el.classList.remove("pending");  // the cell's size is fixed: showing it moves nothing
    }
  }
}

function showPage() {
  const pages = Math.max(1, Math.ceil(job.order.length / PAGE_SIZE));
  job.page = Math.min(Math.max(job.page, 0), pages - 1);
  const first = job.page * PAGE_SIZE;
  const shown = job.order.slice(first, first + PAGE_SIZE);
  const rows = shown.map((id) => { const row = shotRow(id); paint(row, job.shots.get(id)); return row; });
  document.querySelector("#shots tbody").replaceChildren(...rows);
  setText(document.getElementById("page-text"),
          `shots ${job.order.length ? first + 1 : 0}–${first + shown.length} of ${job.order.length}`);
  document.getElementById("prev").disabled = job.page === 0;
  document.getElementById("next").disabled = job.page >= pages - 1;
}

function update(id, change) {
  let shot = job.shots.get(id);
  if (!shot) { shot = {id, state: "queued", media: {}}; job.shots.set(id, shot); job.order.push(id); showPage(); }
  Object.assign(shot, change);
  const row = document.getElementById(`shot-${id}`);  // null when the shot is on another page
  if (row) paint(row, shot);
}

function showMedia(id, kind) {
  const shot = job.shots.get(id);
  if (shot) update(id, {media: {...shot.media, [kind]: Date.now()}});
}

function showJob(status) {
  setText(document.getElementById("title"), `${status.title} (${status.id})`);
  setText(document.getElementById("state"), status.state);
  document.getElementById("progress").value = status.progress;
  setText(document.getElementById("progress-text"), `${Math.round(status.progress * 100)} %`);
  const error = document.getElementById("error");
  error.hidden = !status.error;
  setText(error, status.error ? `The job stopped: ${status.error}` : "");
  if (status.state === "succeeded") {
    document.getElementById("files").hidden = false;
    const film = document.getElementById("film");
    if (film.hidden) { film.src = `/v1/jobs/${status.id}/output`; film.hidden = false; }
  }
}

function loadShots(status) {
  job.shots = new Map(status.shots.map((shot) => [shot.id, {...shot, media: {}}]));
  job.order = status.shots.map((shot) => shot.id);
  showPage();
}

let pending = null;
function later() {
  if (!pending) pending = setTimeout(async () => { pending = null; showJob(await api("GET", `/v1/jobs/${job.id}`)); }, 250);
}

// One SSE event: what the live stream calls, and what the browser test times.
function onEvent(type, data) {
  const e = JSON.parse(data);
  if (type === "stage_started" && e.shot) {
    update(e.shot, {state: "running", stage: e.stage, worker: e.worker, tier: e.tier, preset: e.preset});
  } else if (type === "stage_finished" && e.shot) {
    update(e.shot, {seconds: e.seconds, preset: e.preset});
    if (e.kind === "keyframe" && !e.stage.includes("~")) showMedia(e.shot, "keyframe");
    if (e.kind === "clip") showMedia(e.shot, "clip");
  } else if (type === "stage_failed" && e.shot) {
    update(e.shot, {stage: `${e.stage} failed: ${e.error || "error"}`});
  } else if (type === "qc") {
    update(e.shot, {state: e.passed ? "succeeded" : "retaking", qc: {passed: e.passed, take: e.take, failed: e.failed}});
  }
  if (type.startsWith("stage_")) later();
}

async function watchJob(id) {
  job.id = id;
  document.getElementById("prev").onclick = () => { job.page -= 1; showPage(); };
  document.getElementById("next").onclick = () => { job.page += 1; showPage(); };
  const status = await api("GET", `/v1/jobs/${id}`);
  showJob(status);
  loadShots(status);
  if (status.state === "succeeded") for (const shot of status.shots) { showMedia(shot.id, "keyframe"); showMedia(shot.id, "clip"); }
  const events = new EventSource(`/v1/jobs/${id}/events`);  // the session cookie rides along
  for (const type of ["stage_started", "stage_finished", "stage_failed", "qc"]) {
    events.addEventListener(type, (m) => onEvent(type, m.data));
  }
  events.addEventListener("job_finished", async () => {
    events.close();
    const done = await api("GET", `/v1/jobs/${id}`);
    showJob(done);
    // The last stage, worker and preset stay shown; the state and QC are the job's final word.
    for (const shot of done.shots) update(shot.id, {state: shot.state, ...(shot.qc ? {qc: shot.qc} : {})});
    if (done.state === "succeeded") for (const shot of done.shots) { showMedia(shot.id, "keyframe"); showMedia(shot.id, "clip"); }
  });
}

// --- submit: check, plan and simulate as the person types; queue only on Submit ---------------------
let checked = 0;
async function check() {
  const text = document.getElementById("manifest").value;
  const button = document.getElementById("submit");
  const ticket = ++checked;
  button.disabled = true;
  if (!text.trim()) { setText(document.getElementById("verdict"), "Paste a storyboard to check it."); return; }
  setText(document.getElementById("verdict"), "Checking…");
  const answer = await request("POST", "/v1/simulate", text, "application/yaml");
  if (ticket !== checked) return;  // the text changed meanwhile: a newer check is on its way
  if (!answer.ok) { setText(document.getElementById("verdict"), answer.data.detail || `error ${answer.status}`); return; }
  showPreflight(answer.data);
  button.disabled = !answer.data.valid;
}

function showPreflight(p) {
  const problems = [...p.errors.map((e) => ["error", e]), ...p.warnings.map((w) => ["warning", w])];
  document.getElementById("problems").replaceChildren(...problems.map(([kind, e]) => {
    const item = document.createElement("li");
    item.className = kind;
    item.dataset.loc = where(e.loc);
    item.textContent = `${kind} at ${where(e.loc)}: ${e.msg}`;
    return item;
  }));
  setText(document.getElementById("verdict"), p.valid
    ? `Valid: ${p.stages.length} stages${p.warnings.length ? `, ${p.warnings.length} warning(s)` : ""}.`
    : `${p.errors.length} error(s): fix them to submit.`);
  document.getElementById("plan").hidden = !p.valid;
  if (!p.valid) return;
  setText(document.getElementById("makespan"), p.makespan_s == null ? "?" : seconds(p.makespan_s));
  setText(document.getElementById("bound"), p.lower_bound_s == null ? "?" : seconds(p.lower_bound_s));
  const tiers = Object.entries(p.cluster).map(([tier, n]) => `${n} ${tier}`).join(", ");
  setText(document.getElementById("cluster"), `${tiers || "no workers"}${p.cluster_assumed ? " (assumed: none is up)" : ""}`);
  const kinds = {};
  for (const stage of p.stages) kinds[stage.kind] = (kinds[stage.kind] || 0) + 1;
  setText(document.getElementById("kinds"), Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(" · "));
  const shown = p.stages.slice(0, 300);  // the counts above cover the rest; thousands of rows help nobody
  document.querySelector("#stages tbody").replaceChildren(...shown.map((stage) => {
    const row = document.createElement("tr");
    for (const value of [stage.id, stage.kind, stage.shot || "", stage.frames ?? "", stage.deps.join(", ")]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      row.append(td);
    }
    return row;
  }));
  const more = document.getElementById("more");
  more.hidden = p.stages.length <= shown.length;
  setText(more, `… and ${p.stages.length - shown.length} more stages`);
}

async function submit() {
  const text = document.getElementById("manifest").value;
  const priority = Number(document.getElementById("priority").value) || 0;
  const answer = await request("POST", `/v1/jobs?priority=${priority}`, text, "application/yaml");
  if (answer.ok) { window.location = `/ui/jobs/${answer.data.id}`; return; }
  if (Array.isArray(answer.data.detail)) showPreflight({valid: false, errors: answer.data.detail, warnings: [], stages: []});
  else setText(document.getElementById("verdict"), answer.data.detail || `error ${answer.status}`);
}

function watchSubmit() {
  const area = document.getElementById("manifest");
  let timer = null;
  area.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 300); });
  document.getElementById("file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) { area.value = await file.text(); check(); }
  });
  document.getElementById("submit").onclick = submit;
  if (area.value.trim()) check();
}

// --- workers ------------------------------------------------------------------------------------
function workerRow(worker) {
  const row = document.createElement("tr");
  row.id = `worker-${worker.id}`;
  row.innerHTML = `<td data-key="id"></td><td data-key="node"></td><td data-key="gpu"></td><td data-key="tier"></td>
    <td data-key="vram" class="num"></td><td data-key="state"></td><td data-key="models"></td><td data-key="stage"></td>
    <td data-key="runs" class="num"></td><td data-key="failures" class="num"></td>`;
  setText(cell(row, "id"), worker.id);
  return row;
}

async function refreshWorkers() {
  const workers = await api("GET", "/v1/workers");
  const body = document.querySelector("#workers tbody");
  for (const w of workers) {
    let row = document.getElementById(`worker-${w.id}`);
    if (!row) { row = workerRow(w); body.append(row); }
    row.classList.toggle("quarantined", w.state === "quarantined");
    row.dataset.state = w.state;
    setText(cell(row, "node"), w.node || "");
    setText(cell(row, "gpu"), w.gpu || w.device || "");
    setText(cell(row, "tier"), w.tier);
    setText(cell(row, "vram"), w.vram_total == null ? "–" : `${mb(w.vram_used)} / ${mb(w.vram_total)}`);
    setText(cell(row, "state"), w.state === "quarantined" ? "quarantined ⚠" : w.state);
    setText(cell(row, "models"), w.loaded_models.join(", "));
    setText(cell(row, "stage"), w.stage || "");
    setText(cell(row, "runs"), String(w.stages_run));
    setText(cell(row, "failures"), String(w.failures));
  }
  const quarantined = workers.filter((w) => w.state === "quarantined").length;
  setText(document.getElementById("summary"),
          `${workers.length} worker(s), ${workers.filter((w) => w.state === "busy").length} busy` +
          (quarantined ? `, ${quarantined} quarantined` : ""));
}

const page = document.querySelector("[data-page]");
if (page && page.dataset.page === "queue") {
  document.getElementById("filter").onchange = refresh;
  refresh();
  setInterval(refresh, 2000);
} else if (page && page.dataset.page === "job") {
  watchJob(page.dataset.job);
  window.farmJob = {loadShots, onEvent};  // the browser test feeds these a 500-shot job and 5,000 events
} else if (page && page.dataset.page === "submit") {
  watchSubmit();
} else if (page && page.dataset.page === "workers") {
  refreshWorkers();
  setInterval(refreshWorkers, 2000);
}
