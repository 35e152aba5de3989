// Model page: the versions of one model, promoting a version to production and rolling production back, the
// canary's weight, and the metrics of chosen versions side by side.
import { registry } from "../client";
import { attempt, badge, enumLabel, fill, formatMetrics, formatTime, h, table } from "../dom";
import {
  EventType,
  VersionStatus,
  type ModelVersion,
  type RegistryEvent,
} from "../gen/modelgrid/registry/v1/registry_pb";
import { canaryPanel } from "./canary";
import { metricsComparison } from "./compare";
import { aliasBadges } from "./models";

const PRODUCTION = "production";

async function listAllVersions(modelName: string, signal: AbortSignal): Promise<ModelVersion[]> {
  const versions: ModelVersion[] = [];
  let pageToken = "";
  do {
    const reply = await registry.listVersions({ modelName, page: { pageSize: 200, pageToken } }, { signal });
    versions.push(...reply.versions);
    pageToken = reply.page?.nextPageToken ?? "";
  } while (pageToken);
  return versions;
}

/** Every change of one alias, oldest first. */
async function aliasHistory(modelName: string, alias: string, signal: AbortSignal): Promise<RegistryEvent[]> {
  const events: RegistryEvent[] = [];
  let pageToken = "";
  do {
    const reply = await registry.getHistory({ modelName, alias, page: { pageSize: 500, pageToken } }, { signal });
    events.push(...reply.events);
    pageToken = reply.page?.nextPageToken ?? "";
  } while (pageToken);
  return events;
}

/** The version production pointed at before its latest change (undefined: none to go back to). */
function previousProduction(history: RegistryEvent[], current: bigint | undefined): bigint | undefined {
  const last = history.findLast((event) => event.type === EventType.ALIAS_SET);
  if (current === undefined || !last || last.version !== current || last.previousVersion === 0n) return undefined;
  return last.previousVersion;
}

export async function renderModel(root: HTMLElement, signal: AbortSignal, name: string): Promise<void> {
  const summary = h("section", { class: "summary" });
  const versionsBox = h("section", {});
  const compareBox = h("section", {});
  const canaryBox = h("section", {});
  const historyBox = h("section", {});
  const compared = new Set<bigint>();
  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, h("a", { href: "#/models" }, "Models"), " / ", name)),
    summary,
    h("h2", {}, "Versions"),
    versionsBox,
    h("h2", {}, "Compare metrics"),
    compareBox,
    h("h2", {}, "Canary"),
    canaryBox,
    h("h2", {}, "Production history"),
    historyBox,
  );
  let busy = false;

  /** Points production at `version` if it still points at `expected` (a concurrent change fails the call). */
  async function setProduction(version: bigint, expected: bigint | undefined): Promise<void> {
    if (busy) return;
    busy = true;
    root.classList.add("busy");
    await attempt(() =>
      registry.setAlias({ modelName: name, alias: PRODUCTION, version, expectedVersion: expected ?? 0n }, { signal }),
    );
    busy = false;
    root.classList.remove("busy");
    await load();
  }

  async function load(): Promise<void> {
    const loaded = await attempt(() =>
      Promise.all([
        registry.getModel({ name }, { signal }),
        listAllVersions(name, signal),
        aliasHistory(name, PRODUCTION, signal),
      ]),
    );
    if (!loaded || signal.aborted) return;
    const [model, versions, history] = loaded;
    const current = model.aliases[PRODUCTION];
    const previous = previousProduction(history, current);

    fill(
      summary,
      h("dl", {},
        h("dt", {}, "Production"),
        h("dd", { "data-testid": "production-version" }, current === undefined ? "not set" : `version ${current}`),
        h("dt", {}, "Aliases"),
        h("dd", {}, aliasBadges(model.aliases)),
        h("dt", {}, "Description"),
        h("dd", {}, model.description || "–"),
      ),
      h(
        "button",
        {
          type: "button",
          class: "secondary",
          "data-testid": "rollback",
          disabled: previous === undefined,
          title: previous === undefined ? "production has no earlier version to go back to" : "",
          onclick: () => previous !== undefined && void setProduction(previous, current),
        },
        previous === undefined ? "Roll back" : `Roll back to version ${previous}`,
      ),
    );

    const showComparison = () =>
      fill(compareBox, metricsComparison(versions.filter((v) => compared.has(v.version))));
    fill(
      versionsBox,
      table(
        "versions-table",
        ["Compare", "Version", "Status", "Created", "Metrics", "Aliases", "Lineage", ""],
        versions,
        (version) => {
          const ready = version.status === VersionStatus.READY;
          const isProduction = version.version === current;
          const job = version.lineage?.trainingJobId;
          return {
            attrs: { "data-testid": "version-row", "data-version": String(version.version) },
            cells: [
              h("input", {
                type: "checkbox",
                "data-testid": "compare-pick",
                "aria-label": `compare version ${version.version}`,
                checked: compared.has(version.version),
                onchange: (event: Event) => {
                  const box = event.target as HTMLInputElement;
                  if (box.checked) compared.add(version.version);
                  else compared.delete(version.version);
                  showComparison();
                },
              }),
              version.version,
              badge(enumLabel(VersionStatus, version.status)),
              formatTime(version.createdAt),
              formatMetrics(version.metrics),
              h("span", { class: "aliases" }, ...version.aliases.map((alias) => badge(alias))),
              job ? h("a", { href: `#/jobs/${encodeURIComponent(job)}` }, `job ${job}`) : version.lineage?.source ?? "",
              h(
                "button",
                {
                  type: "button",
                  "data-testid": "promote",
                  disabled: !ready || isProduction,
                  onclick: () => void setProduction(version.version, current),
                },
                isProduction ? "In production" : "Promote",
              ),
            ],
          };
        },
        "This model has no versions yet.",
      ),
    );

    showComparison();
    fill(canaryBox, canaryPanel(model, versions, signal, load));

    const changes = [...history].reverse();
    fill(
      historyBox,
      table(
        "history-table",
        ["When", "Change", "Version", "Before", "By"],
        changes,
        (event) => ({
          cells: [
            formatTime(event.time),
            enumLabel(EventType, event.type),
            event.version || "–",
            event.previousVersion || "–",
            event.actor,
          ],
        }),
        "Production has never been set.",
      ),
    );
  }
  await load();
}
