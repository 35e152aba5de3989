// Canary panel of the model page: the share of NAME@production calls the gateway sends to NAME@canary. The share is
// the model tag modelgrid.canary-weight, set with UpdateModel exactly as `modelgrid canary set/rollback` do; every
// gateway follows it through the registry's event stream.
import { registry } from "../client";
import { attempt, h } from "../dom";
import { VersionStatus, type ModelVersion, type RegisteredModel } from "../gen/modelgrid/registry/v1/registry_pb";

/** The gateway's default MODELGRID_GATEWAY_CANARY_WEIGHT_TAG, CANARY_ALIAS and STABLE_ALIAS. */
export const CANARY_WEIGHT_TAG = "modelgrid.canary-weight";
const CANARY_ALIAS = "canary";
const STABLE_ALIAS = "production";

/** The weight a gateway reads from the tag: a number clamped to 0..1; 0 when unset or not a number. */
export function canaryWeight(raw: string | undefined): number {
  const value = raw ? Number(raw) : 0;
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 1) : 0;
}

function percent(weight: number): string {
  return `${Number((weight * 100).toFixed(1))}%`;
}

/** The panel; `changed` reloads the page after a change. */
export function canaryPanel(
  model: RegisteredModel,
  versions: ModelVersion[],
  signal: AbortSignal,
  changed: () => Promise<void>,
): HTMLElement {
  const weight = canaryWeight(model.tags[CANARY_WEIGHT_TAG]);
  const canary = model.aliases[CANARY_ALIAS];
  const stable = model.aliases[STABLE_ALIAS];

  async function run(call: () => Promise<unknown>): Promise<void> {
    panel.classList.add("busy");
    await attempt(call);
    panel.classList.remove("busy");
    if (!signal.aborted) await changed();
  }

  const setWeight = (value: number) =>
    run(() => registry.updateModel({ name: model.name, setTags: { [CANARY_WEIGHT_TAG]: String(value) } }, { signal }));

  const slider = h("input", {
    type: "range",
    min: 0,
    max: 100,
    step: 1,
    value: Math.round(weight * 100),
    "data-testid": "canary-slider",
    "aria-label": "canary weight in percent",
  });
  const chosen = h("output", { "data-testid": "canary-chosen" }, percent(weight));
  const apply = h("button", { type: "button", "data-testid": "canary-apply", disabled: true }, "Apply");
  const noCanary = canary === undefined;
  slider.addEventListener("input", () => {
    const value = Number(slider.value) / 100;
    chosen.textContent = percent(value);
    // as `canary set` does: no share of production traffic for a canary alias that does not exist
    apply.disabled = value === weight || (noCanary && value > 0);
  });
  apply.addEventListener("click", () => void setWeight(Number(slider.value) / 100));

  const versionChoice = h(
    "select",
    { "data-testid": "canary-version", "aria-label": "canary version" },
    ...versions
      .filter((v) => v.status === VersionStatus.READY)
      .map((v) => h("option", { value: String(v.version), selected: v.version === canary }, `version ${v.version}`)),
  );
  const setAlias = h(
    "button",
    {
      type: "button",
      class: "secondary",
      "data-testid": "canary-set-alias",
      onclick: () =>
        void run(() =>
          registry.setAlias(
            { modelName: model.name, alias: CANARY_ALIAS, version: BigInt(versionChoice.value), expectedVersion: canary ?? 0n },
            { signal },
          ),
        ),
    },
    noCanary ? "Point canary here" : "Move canary here",
  );

  const panel = h(
    "section",
    { class: "panel", "data-testid": "canary-panel" },
    h("p", {},
      "Weight ",
      h("strong", { "data-testid": "canary-weight", "data-weight": String(weight) }, percent(weight)),
      ` of ${model.name}@${STABLE_ALIAS} calls (version ${stable ?? "unset"}) go to ${model.name}@${CANARY_ALIAS} `,
      h("span", { "data-testid": "canary-alias" }, noCanary ? "(unset)" : `(version ${canary})`),
      ".",
    ),
    h("div", { class: "row" },
      h("label", { class: "inline" }, "New weight ", slider, chosen),
      apply,
      h("button", {
        type: "button",
        class: "secondary",
        "data-testid": "canary-rollback",
        disabled: weight === 0,
        title: "weight 0: every production call goes to the production version again (the canary alias stays)",
        onclick: () => void setWeight(0),
      }, "Roll back"),
    ),
    h("div", { class: "row" }, h("label", { class: "inline" }, "Canary alias ", versionChoice), setAlias),
    noCanary ? h("p", { class: "hint" }, `Point the ${CANARY_ALIAS} alias at a version before giving it a weight.`) : null,
  );
  return panel;
}
