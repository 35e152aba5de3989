// Predict page: one prediction on a model reference, inputs typed from the model's served signature.
import { create } from "@bufbuild/protobuf";
import { predictor } from "../client";
import { attempt, enumLabel, fill, h, showError, table } from "../dom";
import { DataType, ModelRefSchema, type ModelRef, type TensorSpec } from "../gen/modelgrid/common/v1/common_pb";
import type { Tensor } from "../gen/modelgrid/common/v1/common_pb";
import { decodeTensor, encodeTensor, formatTensor, shapeOf, type Nested } from "../tensors";

const REF_STORAGE = "modelgrid.predictRef";

/** Parses "name", "name:3" or "name@alias". */
export function parseModelRef(text: string): ModelRef {
  const alias = text.match(/^([^@:]+)@(.+)$/);
  if (alias) return create(ModelRefSchema, { name: alias[1], selector: { case: "alias", value: alias[2] } });
  const version = text.match(/^([^@:]+):(\d+)$/);
  if (version) return create(ModelRefSchema, { name: version[1], selector: { case: "version", value: BigInt(version[2]) } });
  if (!/^[^@:]+$/.test(text)) throw new Error(`"${text}" is not a model reference (name, name:3 or name@alias)`);
  return create(ModelRefSchema, { name: text });
}

function describeSpec(spec: TensorSpec): string {
  const shape = spec.unknownRank ? "?" : `[${spec.shape.join(", ")}]`;
  return `${spec.name}: ${enumLabel(DataType, spec.dtype).toLowerCase()} ${shape}`;
}

/** Input tensors from the JSON text: a nested list for a one-input model, else {"input name": nested list}. */
export function buildInputs(text: string, specs: TensorSpec[]): Record<string, Tensor> {
  const value = JSON.parse(text) as Nested | Record<string, Nested>;
  const byName: Record<string, Nested> =
    Array.isArray(value) || typeof value !== "object" ? { [specs[0]?.name ?? "x"]: value } : value;
  const inputs: Record<string, Tensor> = {};
  for (const [name, nested] of Object.entries(byName)) {
    const spec = specs.find((s) => s.name === name);
    // One example without its batch dimension is sent as a batch of one.
    const rank = shapeOf(nested).length;
    const batched = spec && !spec.unknownRank && spec.shape.length === rank + 1 ? [nested] : nested;
    inputs[name] = encodeTensor(batched, spec?.dtype ?? DataType.FLOAT32);
  }
  return inputs;
}

export function renderPredict(root: HTMLElement, signal: AbortSignal): void {
  const ref = h("input", {
    id: "predict-ref",
    "data-testid": "predict-ref",
    placeholder: "digits@production",
    value: localStorage.getItem(REF_STORAGE) ?? "",
    required: true,
  });
  const input = h("textarea", { id: "predict-input", "data-testid": "predict-input", rows: 6, spellcheck: false });
  input.value = "[[0.1, 0.2, 0.3, 0.4]]";
  const submit = h("button", { id: "predict-submit", "data-testid": "predict-submit", type: "submit" }, "Predict");
  const signature = h("div", { class: "signature", "data-testid": "predict-signature" });
  const result = h("section", { "data-testid": "predict-result" });

  async function metadata() {
    const name = parseModelRef(ref.value.trim()).name;
    return predictor.getModelMetadata({ name }, { signal });
  }

  async function showSignature(): Promise<void> {
    if (!ref.value.trim()) return;
    const status = await attempt(metadata);
    if (!status || signal.aborted) return;
    fill(
      signature,
      h("span", {}, "inputs: ", status.inputs.map(describeSpec).join("; ")),
      h("span", {}, "outputs: ", status.outputs.map(describeSpec).join("; ")),
    );
  }

  async function predict(): Promise<void> {
    submit.disabled = true;
    fill(result);
    try {
      const model = parseModelRef(ref.value.trim());
      localStorage.setItem(REF_STORAGE, ref.value.trim());
      const status = await metadata();
      const inputs = buildInputs(input.value, status.inputs);
      const started = performance.now();
      const reply = await predictor.predict({ model, inputs }, { signal });
      const millis = performance.now() - started;
      const names = Object.keys(reply.outputs).sort();
      fill(
        result,
        h(
          "p",
          { class: "answered" },
          "Answered by ",
          h("strong", {}, reply.modelName),
          " version ",
          h("strong", { "data-testid": "predict-version" }, reply.version),
          ` in ${millis.toFixed(0)} ms`,
        ),
        table("predict-outputs", ["Output", "Type", "Shape", "Values"], names, (name) => {
          const tensor = reply.outputs[name];
          return {
            attrs: { "data-testid": "predict-output", "data-output": name },
            cells: [
              name,
              enumLabel(DataType, tensor.dtype).toLowerCase(),
              `[${tensor.shape.join(", ")}]`,
              h("code", { "data-testid": "predict-values" }, formatTensor(decodeTensor(tensor))),
            ],
          };
        }),
      );
    } catch (err) {
      if (!signal.aborted) showError(err);
    } finally {
      submit.disabled = false;
    }
  }

  const form = h(
    "form",
    {
      class: "predict-form",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void predict();
      },
    },
    h("label", {}, "Model", ref),
    signature,
    h("label", {}, "Input (JSON: a nested list, or {\"input name\": nested list} for several inputs)", input),
    h("div", {}, submit),
  );
  ref.addEventListener("change", () => void showSignature());
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Predict")), form, result);
  void showSignature();
}
