// Training jobs: the list of jobs, and one job's live progress followed over the WatchJob server stream, with its
// worker logs and a cancel button.
import { trainer } from "../client";
import {
  attempt,
  badge,
  enumLabel,
  fill,
  formatClock,
  formatMetrics,
  formatNumber,
  formatTime,
  h,
  isAbort,
  showError,
  table,
  wrapping,
} from "../dom";
import { JobEventType, JobState, type Job, type JobEvent } from "../gen/modelgrid/trainer/v1/trainer_pb";
import { lossChart } from "./chart";
import { jobLogs } from "./joblogs";

const FINAL = new Set([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]);
const LIST_REFRESH_MS = 5000;
const RECONNECT_MS = 2000;
const EVENT_ROWS = 200;

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });
}

function jobLink(id: string): HTMLElement {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id);
}

export async function renderJobs(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const list = h("div", {});
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Training jobs"), h("span", { class: "hint" }, "refreshes every 5 s"),
    h("a", { class: "button", href: "#/submit", "data-testid": "jobs-submit-link" }, "Submit a job")), list);
  while (!signal.aborted) {
    const reply = await attempt(() => trainer.listJobs({ pageSize: 100 }, { signal }));
    if (reply && !signal.aborted) {
      fill(
        list,
        table(
          "jobs-table",
          ["Job", "Name", "State", "Workers", "Epoch", "Step", "Metrics", "Model", "Submitted"],
          reply.jobs,
          (job) => ({
            attrs: { "data-testid": "job-row", "data-job": job.id },
            cells: [
              jobLink(job.id),
              job.spec?.name ?? "",
              badge(enumLabel(JobState, job.state)),
              job.spec?.workers ?? "",
              `${job.epoch} / ${job.spec?.hyperParameters?.epochs ?? "?"}`,
              job.step,
              formatMetrics(job.metrics),
              registeredModel(job),
              formatTime(job.createdAt),
            ],
          }),
          "No training jobs yet: submit one here or with `modelgrid jobs submit`.",
        ),
      );
    }
    await sleep(LIST_REFRESH_MS, signal);
  }
}

function registeredModel(job: Job): HTMLElement | string {
  const name = job.spec?.registerModel;
  if (!name) return "";
  const label = job.registeredVersion ? `${name}:${job.registeredVersion}` : name;
  return h("a", { href: `#/models/${encodeURIComponent(name)}` }, label);
}

/** One labelled figure of the job view, updated in place as events arrive. */
function stat(label: string, testid: string): { box: HTMLElement; value: HTMLElement } {
  const value = h("div", { class: "stat-value", "data-testid": testid }, "–");
  return { box: h("div", { class: "stat" }, h("div", { class: "stat-label" }, label), value), value };
}

export async function renderJob(root: HTMLElement, signal: AbortSignal, id: string): Promise<void> {
  const job = await attempt(() => trainer.getJob({ id }, { signal }));
  if (!job || signal.aborted) {
    fill(root, h("div", { class: "page-head" }, h("h1", {}, h("a", { href: "#/jobs" }, "Training jobs"), " / ", id)));
    return;
  }
  const totalEpochs = job.spec?.hyperParameters?.epochs ?? 0;
  const stats = {
    state: stat("State", "job-state"),
    epoch: stat("Epoch", "job-epoch"),
    step: stat("Step", "job-step"),
    loss: stat("Loss", "job-loss"),
    accuracy: stat("Accuracy", "job-accuracy"),
    attempt: stat("Attempt", "job-attempt"),
    restarts: stat("Restarts", "job-restarts"),
  };
  const progress = h("progress", { "data-testid": "job-progress", max: Math.max(totalEpochs, 1), value: 0 });
  const streamStatus = h("span", { class: "stream", "data-testid": "job-stream" }, "connecting…");
  const chart = h("div", { class: "chart", "data-testid": "job-chart" });
  const failure = h("div", { class: "failure", "data-testid": "job-failure", hidden: true });
  const registered = h("div", { "data-testid": "job-registered" });
  const events = h("tbody", {});
  const placements = job.placements.map((p) => `worker ${p.taskIndex} on ${p.agent}`).join(", ");
  const logs = jobLogs(id, signal);
  const cancel = h("button", { type: "button", class: "danger", "data-testid": "job-cancel" }, "Cancel job");
  const showCancel = (s: JobState) => {
    cancel.disabled = FINAL.has(s) || s === JobState.CANCELLING;
    cancel.hidden = FINAL.has(s);
  };
  showCancel(job.state);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    const reply = await attempt(() => trainer.cancelJob({ id }, { signal }));
    if (reply && !signal.aborted) showCancel(reply.state);
    else if (!signal.aborted) showCancel(state);
  });

  fill(
    root,
    h("div", { class: "page-head" },
      h("h1", {}, h("a", { href: "#/jobs" }, "Training jobs"), " / ", id),
      streamStatus,
      cancel,
    ),
    h("p", { class: "job-spec" },
      `${job.spec?.name ?? ""} · recipe ${job.spec?.recipe ?? "?"} · ${job.spec?.workers ?? 0} workers · ` +
      `${totalEpochs} epochs`, placements && ` · ${placements}`),
    h("div", { class: "stats" }, ...Object.values(stats).map((s) => s.box)),
    h("div", { class: "progress-row" }, h("span", {}, "Epochs done"), progress),
    failure,
    registered,
    chart,
    h("h2", {}, "Events"),
    h("table", { "data-testid": "job-events" },
      h("thead", {}, h("tr", {}, ...["Time", "Event", "State", "Attempt", "Epoch", "Step", "Metrics", "Message"].map((t) => h("th", {}, t)))),
      events,
    ),
    logs.section,
  );
  void logs.refresh();

  const losses: number[] = [];
  let restarts = job.restarts;
  let state = job.state;

  function show(event: JobEvent): void {
    state = event.state;
    showCancel(state);
    fill(stats.state.value, badge(enumLabel(JobState, event.state)));
    stats.state.value.dataset.state = enumLabel(JobState, event.state);
    stats.attempt.value.textContent = String(event.attempt);
    if (event.type === JobEventType.STEP || event.type === JobEventType.EPOCH) {
      stats.epoch.value.textContent = `${event.epoch} / ${totalEpochs}`;
      stats.step.value.textContent = String(event.step);
      stats.step.value.dataset.step = String(event.step);
      if ("loss" in event.metrics) stats.loss.value.textContent = formatNumber(event.metrics.loss);
      if ("accuracy" in event.metrics) stats.accuracy.value.textContent = formatNumber(event.metrics.accuracy);
    }
    if (event.type === JobEventType.STEP && "loss" in event.metrics) {
      losses.push(event.metrics.loss);
      fill(chart, lossChart(losses));
    }
    if (event.type === JobEventType.EPOCH) progress.value = event.epoch;
    if (event.type === JobEventType.RESTART) restarts += 1;
    stats.restarts.value.textContent = String(restarts);
    if (event.failure) {
      failure.hidden = false;
      failure.textContent = `Worker ${event.failure.taskIndex} on ${event.failure.agent}: ${event.failure.reason}`;
    }
    if (event.type === JobEventType.REGISTERED && job?.spec?.registerModel) {
      const name = job.spec.registerModel;
      fill(registered, "Registered as ", h("a", { href: `#/models/${encodeURIComponent(name)}` }, `${name} version ${event.version}`));
    }
    if (event.state === JobState.SUCCEEDED) progress.value = progress.max;
    const progressed = event.type === JobEventType.STEP || event.type === JobEventType.EPOCH;
    events.prepend(
      h("tr", { "data-type": enumLabel(JobEventType, event.type) },
        h("td", {}, formatClock(event.time)),
        h("td", {}, enumLabel(JobEventType, event.type)),
        h("td", {}, enumLabel(JobState, event.state)),
        h("td", {}, event.attempt || "–"),
        h("td", {}, progressed ? event.epoch : "–"),
        h("td", {}, progressed || event.type === JobEventType.RESUMED ? event.step : "–"),
        h("td", {}, formatMetrics(event.metrics)),
        h("td", {}, wrapping(event.message)),
      ),
    );
    while (events.rows.length > EVENT_ROWS) events.lastElementChild?.remove();
  }

  // Follow the stream; after a broken stream, continue after the last event seen.
  let cursor = "";
  while (!signal.aborted) {
    try {
      streamStatus.textContent = "live";
      streamStatus.className = "stream live";
      for await (const event of trainer.watchJob({ id, cursor }, { signal })) {
        cursor = event.cursor;
        show(event);
      }
      if (FINAL.has(state)) {
        streamStatus.textContent = "ended";
        streamStatus.className = "stream ended";
        await logs.refresh(); // what the workers wrote to the end
        return;
      }
    } catch (err) {
      if (signal.aborted || isAbort(err)) return;
      showError(err);
    }
    streamStatus.textContent = "reconnecting…";
    streamStatus.className = "stream reconnecting";
    await sleep(RECONNECT_MS, signal);
  }
}
