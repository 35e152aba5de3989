// Serving page: every backend instance the gateway routes to (GetRoutes), and for each predictor replica the models,
// versions and aliases it serves (the Consul tags it publishes, which the gateway routes by).
import { gateway } from "../client";
import { attempt, fill, formatTime, h, table } from "../dom";
import type { Upstream } from "../gen/modelgrid/gateway/v1/gateway_pb";

interface Served {
  versions: string[];
  aliases: string[];
}

/** model name -> versions and aliases, from tags "model=NAME", "version=NAME:V", "alias=NAME@ALIAS". */
export function servedModels(tags: string[]): Map<string, Served> {
  const models = new Map<string, Served>();
  const entry = (name: string) => {
    let served = models.get(name);
    if (!served) models.set(name, (served = { versions: [], aliases: [] }));
    return served;
  };
  for (const tag of tags) {
    const [kind, value = ""] = tag.split(/=(.*)/s);
    if (kind === "model") entry(value);
    else if (kind === "version" && value.includes(":")) {
      const at = value.lastIndexOf(":");
      entry(value.slice(0, at)).versions.push(value.slice(at + 1));
    } else if (kind === "alias" && value.includes("@")) {
      const at = value.lastIndexOf("@");
      entry(value.slice(0, at)).aliases.push(value.slice(at + 1));
    }
  }
  return models;
}

function servedCell(upstream: Upstream): HTMLElement {
  const models = [...servedModels(upstream.tags)].sort(([a], [b]) => a.localeCompare(b));
  if (models.length === 0) return h("span", { class: "hint" }, "–");
  return h(
    "span",
    { class: "wrap" },
    ...models.map(([name, served]) =>
      h(
        "span",
        { class: "served", "data-testid": "served-model", "data-model": name, "data-versions": served.versions.join(",") },
        h("strong", {}, name),
        ` versions ${served.versions.join(", ") || "none"}`,
        served.aliases.length ? ` · ${served.aliases.map((a) => `@${a}`).join(" ")}` : "",
      ),
    ),
  );
}

export async function renderServing(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const list = h("div", {});
  const refresh = h("button", { type: "button", "data-testid": "serving-refresh", onclick: () => void load() }, "Refresh");
  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "Serving"), refresh),
    h("p", { class: "hint" }, "Each instance the gateway routes to, as this gateway sees it; a predictor replica lists what it serves."),
    list,
  );

  async function load(): Promise<void> {
    const reply = await attempt(() => gateway.getRoutes({}, { signal }));
    if (!reply || signal.aborted) return;
    // One row per instance: several prefixes may route to one service (the predictor's three APIs).
    const rows = new Map<string, { service: string; prefixes: string[]; upstream: Upstream }>();
    for (const route of reply.routes) {
      for (const upstream of route.upstreams) {
        const key = `${route.service} ${upstream.target}`;
        const row = rows.get(key) ?? { service: route.service, prefixes: [], upstream };
        row.prefixes.push(route.prefix);
        rows.set(key, row);
      }
    }
    const sorted = [...rows.values()].sort((a, b) => a.service.localeCompare(b.service) || a.upstream.target.localeCompare(b.upstream.target));
    fill(
      list,
      table(
        "serving-table",
        ["Service", "Instance", "State", "In flight", "Serves", "APIs"],
        sorted,
        ({ service, prefixes, upstream }) => ({
          attrs: { "data-testid": "replica-row", "data-service": service, "data-target": upstream.target },
          cells: [
            service,
            upstream.target,
            upstream.ejectedUntil ? h("span", { class: "badge badge-failed" }, `ejected until ${formatTime(upstream.ejectedUntil)}`)
              : h("span", { class: "badge badge-ready" }, "in rotation"),
            upstream.outstanding,
            servedCell(upstream),
            h("span", { class: "wrap hint" }, prefixes.sort().join(" ")),
          ],
        }),
        "The gateway sees no healthy instance.",
      ),
    );
  }
  await load();
}
