// Workers page: the trainer's worker agents with their slots and jobs.
import { trainer } from "../client";
import { attempt, fill, h, table } from "../dom";

export async function renderWorkers(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const list = h("div", {});
  const refresh = h("button", { type: "button", onclick: () => void load() }, "Refresh");
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Workers"), refresh), list);

  async function load(): Promise<void> {
    const reply = await attempt(() => trainer.listWorkers({}, { signal }));
    if (!reply || signal.aborted) return;
    fill(
      list,
      table(
        "workers-table",
        ["Agent", "Host", "Address", "Slots used", "Jobs"],
        reply.workers,
        (worker) => ({
          attrs: { "data-testid": "worker-row", "data-worker": worker.id },
          cells: [
            worker.id,
            worker.host,
            worker.address,
            h("span", { class: "slots" }, h("meter", { min: 0, max: worker.slots, value: worker.usedSlots }),
              ` ${worker.usedSlots} / ${worker.slots}`),
            h("span", {}, ...worker.jobs.map((id) => h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "chip" }, id))),
          ],
        }),
        "No healthy worker agents.",
      ),
    );
  }
  await load();
}
