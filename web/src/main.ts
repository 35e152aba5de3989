// The console's entry point: hash routing to the pages, the API key field and the error box.
import "./style.css";
import { apiKey, setApiKey } from "./client";
import { clearError, h } from "./dom";
import { renderBatchJob, renderBatchJobs } from "./pages/batch";
import { renderJob, renderJobs } from "./pages/jobs";
import { renderKeys } from "./pages/keys";
import { renderModels } from "./pages/models";
import { renderPredict } from "./pages/predict";
import { renderServing } from "./pages/serving";
import { renderSubmitJob } from "./pages/submit";
import { renderModel } from "./pages/versions";
import { renderWorkers } from "./pages/workers";

/** A page draws itself into `root`; it stops its calls and timers when `signal` aborts (the user moved on). */
type Page = (root: HTMLElement, signal: AbortSignal, param: string) => void | Promise<void>;

const ROUTES: Record<string, { page: Page; withParam?: Page }> = {
  models: { page: renderModels, withParam: renderModel },
  predict: { page: renderPredict },
  batch: { page: renderBatchJobs, withParam: renderBatchJob },
  jobs: { page: renderJobs, withParam: renderJob },
  submit: { page: renderSubmitJob },
  workers: { page: renderWorkers },
  serving: { page: renderServing },
  keys: { page: renderKeys },
};

let current: AbortController | undefined;

function route(): void {
  const [name = "", ...rest] = window.location.hash.replace(/^#\/?/, "").split("/");
  const entry = ROUTES[name];
  if (!entry) {
    window.location.hash = "#/models";
    return;
  }
  current?.abort();
  current = new AbortController();
  clearError();
  const param = decodeURIComponent(rest.join("/"));
  const page = param && entry.withParam ? entry.withParam : entry.page;
  for (const link of document.querySelectorAll<HTMLAnchorElement>("#nav a")) {
    link.classList.toggle("active", link.dataset.route === name);
  }
  const root = document.getElementById("app")!;
  root.replaceChildren(h("p", { class: "loading" }, "Loading…"));
  void page(root, current.signal, param);
}

function setUpHeader(): void {
  const input = document.getElementById("api-key") as HTMLInputElement;
  input.value = apiKey();
  input.addEventListener("change", () => setApiKey(input.value.trim()));
  document.getElementById("error-close")!.addEventListener("click", clearError);
}

setUpHeader();
window.addEventListener("hashchange", route);
route();
