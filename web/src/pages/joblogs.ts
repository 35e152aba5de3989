// The worker logs of one training job (GetJobLogs: the last lines each worker process wrote).
import { trainer } from "../client";
import { attempt, fill, h } from "../dom";

const TAIL_LINES = 200;

/** The logs section of the job page; `refresh()` reads them again. */
export function jobLogs(id: string, signal: AbortSignal): { section: HTMLElement; refresh: () => Promise<void> } {
  const body = h("div", { "data-testid": "job-logs" }, h("p", { class: "hint" }, "No logs read yet."));
  const button = h("button", { type: "button", class: "secondary", "data-testid": "job-logs-refresh" }, "Refresh logs");

  async function refresh(): Promise<void> {
    button.disabled = true;
    const reply = await attempt(() => trainer.getJobLogs({ id, taskIndex: -1, tailLines: TAIL_LINES }, { signal }));
    button.disabled = false;
    if (!reply || signal.aborted) return;
    if (reply.logs.length === 0) {
      fill(body, h("p", { class: "hint", "data-testid": "job-logs-empty" }, "The job has no workers yet."));
      return;
    }
    fill(
      body,
      ...reply.logs.map((log) =>
        h(
          "div",
          { class: "log", "data-testid": "job-log", "data-task": String(log.taskIndex) },
          h("div", { class: "log-head" }, `task ${log.taskIndex} on ${log.agent}`),
          h("pre", {}, log.lines.join("\n") || "(no lines)"),
        ),
      ),
    );
    for (const pre of body.querySelectorAll("pre")) pre.scrollTop = pre.scrollHeight; // the newest lines first in view
  }

  button.addEventListener("click", () => void refresh());
  const section = h("section", {}, h("div", { class: "page-head" }, h("h2", {}, "Worker logs"), button), body);
  return { section, refresh };
}
