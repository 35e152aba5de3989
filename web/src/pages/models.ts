// Models page: every registered model with its latest version and aliases.
import { registry } from "../client";
import { attempt, badge, fill, formatTime, h, table, wrapping } from "../dom";
import type { RegisteredModel } from "../gen/modelgrid/registry/v1/registry_pb";

async function listAllModels(signal: AbortSignal): Promise<RegisteredModel[]> {
  const models: RegisteredModel[] = [];
  let pageToken = "";
  do {
    const reply = await registry.listModels({ page: { pageSize: 200, pageToken } }, { signal });
    models.push(...reply.models);
    pageToken = reply.page?.nextPageToken ?? "";
  } while (pageToken);
  return models;
}

/** Alias badges, "production → 3", sorted by alias name. */
export function aliasBadges(aliases: { [alias: string]: bigint }): HTMLElement {
  const names = Object.keys(aliases).sort();
  return h("span", { class: "aliases" }, ...names.map((name) => badge(`${name} → ${aliases[name]}`)));
}

export async function renderModels(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const list = h("div", {}, h("p", { class: "loading" }, "Loading…"));
  const refresh = h("button", { type: "button", "data-testid": "models-refresh", onclick: () => void load() }, "Refresh");
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Models"), refresh), list);

  async function load(): Promise<void> {
    const models = await attempt(() => listAllModels(signal));
    if (!models || signal.aborted) return;
    fill(
      list,
      table("models-table", ["Name", "Latest version", "Aliases", "Description", "Updated"], models, (model) => ({
        attrs: { "data-testid": "model-row", "data-model": model.name },
        cells: [
          h("a", { href: `#/models/${encodeURIComponent(model.name)}` }, model.name),
          model.latestVersion,
          aliasBadges(model.aliases),
          wrapping(model.description),
          formatTime(model.updatedAt),
        ],
      }), "No models registered yet: push one with `modelgrid push` or train one."),
    );
  }
  await load();
}
