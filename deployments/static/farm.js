// The farm's pages: plain JavaScript over /v1 (the session cookie authenticates; state-changing calls
// carry the page's CSRF value). Rows are updated in place, never rebuilt, so nothing shifts.
"use strict";
const CSRF = document.querySelector('meta[name="farm-csrf"]').content;

async function api(method, path, body) {
  const headers = {"X-Farm-CSRF": CSRF};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, credentials: "same-origin",
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) { window.location = "/ui/login"; throw new Error("logged out"); }
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || JSON.stringify(data));
  return data;
}

function cell(row, key) { return row.querySelector(`[data-key="${key}"]`); }
function setText(el, text) { if (el.textContent !== text) el.textContent = text; }
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }

// --- queue -------------------------------------------------------------------------------------
function queueRow(job) {
  const row = document.createElement("tr");
  row.id = `job-${job.id}`;
  row.innerHTML = `<td><a data-key="link"></a></td><td data-key="title"></td><td data-key="state"></td>
    <td><input type="number" min="-100" max="100" data-key="priority" aria-label="priority"></td>
    <td class="num"><progress max="1" data-key="progress"></progress></td><td data-key="created"></td>
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

// --- one job -----------------------------------------------------------------------------------
function shotRow(shot) {
  const row = document.createElement("tr");
  row.id = `shot-${shot.id}`;
  row.innerHTML = `<td data-key="id"></td><td data-key="state"></td><td data-key="stage"></td><td data-key="worker"></td>
    <td data-key="tier"></td><td data-key="qc"></td><td><img data-key="keyframe" alt="" hidden></td>
    <td><video data-key="clip" controls preload="metadata" hidden></video></td>`;
  setText(cell(row, "id"), shot.id);
  return row;
}

function showShot(job, shot) {
  let row = document.getElementById(`shot-${shot.id}`);
  if (!row) { row = shotRow(shot); document.querySelector("#shots tbody").append(row); }
  setText(cell(row, "state"), shot.state);
  if (shot.stage !== undefined) setText(cell(row, "stage"), shot.stage || "");
  if (shot.worker !== undefined) setText(cell(row, "worker"), shot.worker || "");
  if (shot.tier !== undefined) setText(cell(row, "tier"), shot.tier || "");
  if (shot.qc) setText(cell(row, "qc"), shot.qc.passed ? `pass (take ${shot.qc.take})`
                                                        : `fail: ${shot.qc.failed.join(", ")} (take ${shot.qc.take})`);
  return row;
}

function showMedia(job, shot, kind) {
  const row = document.getElementById(`shot-${shot}`);
  if (!row) return;
  const el = cell(row, kind);
  el.src = `/v1/jobs/${job}/shots/${shot}/${kind}?t=${Date.now()}`;
  el.hidden = false;
}

function showJob(job) {
  setText(document.getElementById("title"), `${job.title} (${job.id})`);
  setText(document.getElementById("state"), job.state);
  document.getElementById("progress").value = job.progress;
  setText(document.getElementById("progress-text"), `${Math.round(job.progress * 100)} %`);
  const error = document.getElementById("error");
  error.hidden = !job.error;
  setText(error, job.error ? `The job stopped: ${job.error}` : "");
  if (job.state === "succeeded") {
    document.getElementById("files").hidden = false;
    const film = document.getElementById("film");
    if (film.hidden) { film.src = `/v1/jobs/${job.id}/output`; film.hidden = false; }
  }
}

async function watchJob(id) {
  const job = await api("GET", `/v1/jobs/${id}`);
  showJob(job);
  for (const shot of job.shots) showShot(id, shot);
  if (job.state === "succeeded") for (const shot of job.shots) { showMedia(id, shot.id, "keyframe"); showMedia(id, shot.id, "clip"); }
  const events = new EventSource(`/v1/jobs/${id}/events`);  // the session cookie rides along
  let pending = null;
  const later = () => { if (!pending) pending = setTimeout(async () => { pending = null; showJob(await api("GET", `/v1/jobs/${id}`)); }, 250); };
  events.addEventListener("stage_started", (m) => {
    const e = JSON.parse(m.data);
    if (e.shot) showShot(id, {id: e.shot, state: "running", stage: e.stage, worker: e.worker, tier: e.tier});
    later();
  });
  events.addEventListener("stage_finished", (m) => {
    const e = JSON.parse(m.data);
    if (e.shot && e.kind === "keyframe" && !e.stage.includes("~")) showMedia(id, e.shot, "keyframe");
    if (e.shot && e.kind === "clip") showMedia(id, e.shot, "clip");
    later();
  });
  events.addEventListener("qc", (m) => {
    const e = JSON.parse(m.data);
    showShot(id, {id: e.shot, state: e.passed ? "succeeded" : "retaking", qc: {passed: e.passed, take: e.take, failed: e.failed}});
  });
  events.addEventListener("job_finished", async () => {
    events.close();
    const done = await api("GET", `/v1/jobs/${id}`);
    showJob(done);
    for (const shot of done.shots) showShot(id, shot);
  });
}

const page = document.querySelector("[data-page]");
if (page && page.dataset.page === "queue") {
  document.getElementById("filter").onchange = refresh;
  refresh();
  setInterval(refresh, 2000);
} else if (page && page.dataset.page === "job") {
  watchJob(page.dataset.job);
}
