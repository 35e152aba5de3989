// Submit page: a training job from a spec typed or pasted as YAML or JSON (the JobSpec fields of trainer.proto, as
// in examples/digits-mlp.yaml), then its live view.
import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import { parse } from "yaml";
import { trainer } from "../client";
import { attempt, fill, h } from "../dom";
import { JobSpecSchema, type JobSpec } from "../gen/modelgrid/trainer/v1/trainer_pb";

const SPEC_STORAGE = "modelgrid.jobSpec";
const EXAMPLE = `# JobSpec fields (snake_case or camelCase); JSON works too. See examples/digits-mlp.yaml.
name: digits-mlp
recipe: mlp
recipe_params:
  hidden_units: [64]
dataset:
  # a file on the trainer's host, inside its MODELGRID_TRAINER_DATASET_ROOTS; or blob_digest: a registry blob
  local_path: /path/to/modelgrid/data/digits/digits.npz
  format: npz
  features_key: x
  label_key: y
  num_classes: 10
hyper_parameters:
  epochs: 8
  batch_size: 32
  learning_rate: 0.01
  optimizer: adam
  validation_split: 0.2
workers: 2
register_model: digits
`;

/** The JobSpec of YAML or JSON text (JSON is YAML); an Error that says what is wrong otherwise. */
export function parseSpec(text: string): JobSpec {
  let data: unknown;
  try {
    data = parse(text);
  } catch (err) {
    throw new Error(`not valid YAML or JSON: ${(err as Error).message.split("\n")[0]}`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new Error("expected a mapping of JobSpec fields (name, recipe, dataset, ...)");
  }
  try {
    return fromJson(JobSpecSchema, data as JsonValue);
  } catch (err) {
    throw new Error((err as Error).message);
  }
}

/** A request id for SubmitJob's idempotency (crypto.randomUUID needs a secure context; this does not). */
function requestId(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function renderSubmitJob(root: HTMLElement, signal: AbortSignal): void {
  const spec = h("textarea", { id: "job-spec", "data-testid": "job-spec", rows: 24, spellcheck: false });
  spec.value = sessionStorage.getItem(SPEC_STORAGE) ?? EXAMPLE;
  const submit = h("button", { type: "submit", "data-testid": "job-submit" }, "Submit");
  const problem = h("p", { class: "form-error", "data-testid": "job-spec-problem", hidden: true });
  // One id per spec text: submitting the same text again after a failed call cannot start the job twice.
  let id = requestId();
  spec.addEventListener("input", () => {
    id = requestId();
    problem.hidden = true;
  });

  async function send(): Promise<void> {
    let parsed: JobSpec;
    try {
      parsed = parseSpec(spec.value);
    } catch (err) {
      problem.textContent = (err as Error).message;
      problem.hidden = false;
      return;
    }
    problem.hidden = true;
    submit.disabled = true;
    const job = await attempt(() => trainer.submitJob({ spec: parsed, requestId: id }, { signal }));
    submit.disabled = false;
    if (!job || signal.aborted) return;
    sessionStorage.setItem(SPEC_STORAGE, spec.value);
    window.location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
  }

  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, h("a", { href: "#/jobs" }, "Training jobs"), " / submit")),
    h(
      "form",
      {
        class: "predict-form",
        onsubmit: (event: Event) => {
          event.preventDefault();
          void send();
        },
      },
      h("label", {}, "Job spec (YAML or JSON)", spec),
      problem,
      h("div", {}, submit),
    ),
  );
}
