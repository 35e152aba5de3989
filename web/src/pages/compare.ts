// Version comparison of the model page: the metrics of the versions ticked in the versions table, side by side.
import { formatNumber, h } from "../dom";
import type { ModelVersion } from "../gen/modelgrid/registry/v1/registry_pb";

/** One row per metric (sorted), one column per version (in the order given); the best value of a row is marked
 * (the lowest of a loss or error, the highest of anything else) when the versions differ. */
export function metricsComparison(versions: ModelVersion[]): HTMLElement {
  if (versions.length < 2) {
    return h("p", { class: "hint", "data-testid": "compare-hint" }, "Tick two or more versions to compare their metrics.");
  }
  const names = [...new Set(versions.flatMap((v) => Object.keys(v.metrics)))].sort();
  const lowerIsBetter = (name: string) => /loss|error|mse|mae|rmse/i.test(name);
  const rows = names.map((name) => {
    const values = versions.map((v) => (name in v.metrics ? v.metrics[name] : undefined));
    const known = values.filter((v): v is number => v !== undefined);
    const best = lowerIsBetter(name) ? Math.min(...known) : Math.max(...known);
    const differ = new Set(known).size > 1;
    return h(
      "tr",
      { "data-testid": "compare-row", "data-metric": name },
      h("th", { scope: "row" }, name),
      ...values.map((value, i) =>
        h(
          "td",
          { "data-version": String(versions[i].version), class: differ && value === best ? "best" : undefined },
          formatNumber(value),
        ),
      ),
    );
  });
  return h(
    "table",
    { "data-testid": "compare-table", class: "compare" },
    h("thead", {}, h("tr", {}, h("th", {}, "Metric"), ...versions.map((v) => h("th", {}, `version ${v.version}`)))),
    h("tbody", {}, ...(rows.length ? rows : [h("tr", {}, h("td", { colspan: versions.length + 1 }, "These versions record no metrics."))])),
  );
}
