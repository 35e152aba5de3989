// Bulk prediction jobs: start one on records typed as JSON (sent after the job spec in one BatchPredict stream), the
// list of jobs, and one job's progress and its results (the NPZ it stored in the registry, read in the page).
import { predictor, registry, sendAll } from "../client";
import { attempt, badge, enumLabel, fill, formatTime, h, showError, table } from "../dom";
import { DataType } from "../gen/modelgrid/common/v1/common_pb";
import { BatchJobState, Predictor, type BatchJob } from "../gen/modelgrid/predictor/v1/predictor_pb";
import { readNpz } from "../npz";
import { decodeTensor, formatTensor } from "../tensors";
import { buildInputs, parseModelRef } from "./predict";

const FINAL = new Set([BatchJobState.SUCCEEDED, BatchJobState.FAILED, BatchJobState.CANCELLED]);
const POLL_MS = 1000;
const SHOWN_RECORDS = 20;

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });
}

function jobLink(id: string): HTMLElement {
  return h("a", { href: `#/batch/${encodeURIComponent(id)}` }, id);
}

function stateBadge(job: BatchJob): HTMLElement {
  const label = enumLabel(BatchJobState, job.state);
  const element = badge(label, "batch-state");
  element.dataset.state = label;
  return element;
}

export async function renderBatchJobs(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const ref = h("input", { "data-testid": "batch-ref", placeholder: "digits@production", required: true });
  const records = h("textarea", { "data-testid": "batch-input", rows: 6, spellcheck: false });
  records.value = "[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]";
  const batchSize = h("input", { type: "number", min: 0, value: 0, "data-testid": "batch-size" });
  const submit = h("button", { type: "submit", "data-testid": "batch-submit" }, "Start job");
  const list = h("div", {});

  async function start(): Promise<void> {
    submit.disabled = true;
    try {
      const model = parseModelRef(ref.value.trim());
      const status = await predictor.getModelMetadata({ name: model.name }, { signal });
      const inputs = buildInputs(records.value, status.inputs);
      const job = await sendAll(
        Predictor.method.batchPredict,
        [
          { payload: { case: "spec", value: { model, batchSize: Number(batchSize.value) || 0 } } },
          { payload: { case: "records", value: { inputs } } },
        ],
        signal,
      );
      window.location.hash = `#/batch/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (!signal.aborted) showError(err);
    } finally {
      submit.disabled = false;
    }
  }

  async function load(): Promise<void> {
    const reply = await attempt(() => predictor.listBatchJobs({ page: { pageSize: 50 } }, { signal }));
    if (!reply || signal.aborted) return;
    fill(
      list,
      table(
        "batch-table",
        ["Job", "State", "Model", "Records", "Created"],
        reply.jobs,
        (job) => ({
          attrs: { "data-testid": "batch-row", "data-job": job.id },
          cells: [
            jobLink(job.id),
            stateBadge(job),
            `${job.spec?.model?.name ?? ""}${job.version ? `:${job.version}` : ""}`,
            `${job.doneRecords} / ${job.totalRecords}`,
            formatTime(job.createdAt),
          ],
        }),
        "No bulk prediction jobs yet.",
      ),
    );
  }

  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Batch jobs"),
      h("button", { type: "button", class: "secondary", onclick: () => void load() }, "Refresh")),
    h(
      "form",
      {
        class: "predict-form",
        onsubmit: (event: Event) => {
          event.preventDefault();
          void start();
        },
      },
      h("label", {}, "Model", ref),
      h("label", {}, "Records (JSON: a list of records for a one-input model, or {\"input name\": list of records})", records),
      h("label", {}, "Records per model call (0: the predictor's default)", batchSize),
      h("div", {}, submit),
    ),
    h("h2", {}, "Jobs"),
    list,
  );
  await load();
}

/** The results of a SUCCEEDED job: its NPZ read from the registry's blob store, shown and offered as a file. */
async function fetchResults(job: BatchJob, box: HTMLElement, signal: AbortSignal): Promise<void> {
  const chunks: Uint8Array[] = [];
  for await (const message of registry.downloadBlob({ digest: job.outputDigest }, { signal })) {
    if (message.payload.case === "chunk") chunks.push(message.payload.value);
  }
  const bytes = new Uint8Array(chunks.reduce((size, chunk) => size + chunk.length, 0));
  chunks.reduce((offset, chunk) => (bytes.set(chunk, offset), offset + chunk.length), 0);
  const outputs = await readNpz(bytes);
  const names = Object.keys(outputs).sort();
  const file = URL.createObjectURL(new Blob([bytes as BlobPart], { type: "application/octet-stream" }));
  signal.addEventListener("abort", () => URL.revokeObjectURL(file), { once: true });
  fill(
    box,
    h("p", {},
      h("a", { href: file, download: `${job.id}-results.npz`, "data-testid": "batch-download" }, "Download results.npz"),
      ` (${bytes.length} bytes, sha256 ${job.outputDigest})`),
    table("batch-outputs", ["Output", "Type", "Shape", `Values (first ${SHOWN_RECORDS} records)`], names, (name) => {
      const tensor = outputs[name];
      const value = decodeTensor(tensor);
      const shown = Array.isArray(value) ? value.slice(0, SHOWN_RECORDS) : value;
      return {
        attrs: { "data-testid": "batch-output", "data-output": name },
        cells: [
          name,
          enumLabel(DataType, tensor.dtype).toLowerCase(),
          `[${tensor.shape.join(", ")}]`,
          h("code", { "data-testid": "batch-values" }, formatTensor(shown)),
        ],
      };
    }),
  );
}

export async function renderBatchJob(root: HTMLElement, signal: AbortSignal, id: string): Promise<void> {
  const summary = h("section", { class: "summary" });
  const results = h("section", { "data-testid": "batch-results" });
  const fetchButton = h("button", { type: "button", "data-testid": "batch-fetch", hidden: true }, "Fetch results");
  const cancel = h("button", { type: "button", class: "danger", "data-testid": "batch-cancel", hidden: true }, "Cancel job");
  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, h("a", { href: "#/batch" }, "Batch jobs"), " / ", id), cancel),
    summary,
    h("div", { class: "row" }, fetchButton),
    results,
  );
  let job: BatchJob | undefined;
  fetchButton.addEventListener("click", async () => {
    if (!job) return;
    fetchButton.disabled = true;
    try {
      await fetchResults(job, results, signal);
    } catch (err) {
      if (!signal.aborted) showError(err);
    } finally {
      fetchButton.disabled = false;
    }
  });
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    const reply = await attempt(() => predictor.cancelBatchJob({ id }, { signal }));
    if (reply && !signal.aborted) show(reply);
  });

  function show(current: BatchJob): void {
    job = current;
    fill(
      summary,
      h("dl", {},
        h("dt", {}, "State"), h("dd", {}, stateBadge(current)),
        h("dt", {}, "Model"), h("dd", {}, `${current.spec?.model?.name ?? ""}${current.version ? ` version ${current.version}` : ""}`),
        h("dt", {}, "Records"),
        h("dd", {},
          h("progress", { max: Math.max(Number(current.totalRecords), 1), value: Number(current.doneRecords) }),
          h("span", { "data-testid": "batch-records" }, ` ${current.doneRecords} / ${current.totalRecords}`)),
        h("dt", {}, "Replica"), h("dd", {}, current.instance || "–"),
        h("dt", {}, "Created"), h("dd", {}, formatTime(current.createdAt)),
        current.error ? h("dt", {}, "Error") : null,
        current.error ? h("dd", { class: "failure-text", "data-testid": "batch-error" }, current.error) : null,
      ),
    );
    const final = FINAL.has(current.state);
    cancel.hidden = final;
    fetchButton.hidden = current.state !== BatchJobState.SUCCEEDED;
  }

  while (!signal.aborted) {
    const current = await attempt(() => predictor.getBatchJob({ id }, { signal }));
    if (!current || signal.aborted) return;
    show(current);
    if (FINAL.has(current.state)) return;
    await sleep(POLL_MS, signal);
  }
}
