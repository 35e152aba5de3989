// Small DOM helpers shared by the pages: element building, tables, the error box and value formatting.
import { Code, ConnectError } from "@connectrpc/connect";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

type Child = Node | string | number | bigint | null | undefined | false;
type Attrs = Record<string, string | number | boolean | undefined | ((event: Event) => void)>;

/** Creates an element: attributes (on* keys become listeners, false/undefined are skipped) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (typeof value === "function") element.addEventListener(key.slice(2), value);
    else if (value === true) element.setAttribute(key, "");
    else if (value !== false && value !== undefined) element.setAttribute(key, String(value));
  }
  append(element, children);
  return element;
}

function append(element: HTMLElement, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces an element's children. */
export function fill(element: HTMLElement, ...children: Child[]): void {
  element.replaceChildren();
  append(element, children);
}

/** A table with a header row and one row per item; `row` returns the row's attributes and cells. */
export function table<T>(
  testid: string,
  headers: string[],
  items: T[],
  row: (item: T) => { attrs?: Attrs; cells: Child[] },
  empty = "Nothing here yet.",
): HTMLElement {
  if (items.length === 0) return h("p", { class: "empty", "data-testid": `${testid}-empty` }, empty);
  const body = items.map((item) => {
    const { attrs = {}, cells } = row(item);
    return h("tr", attrs, ...cells.map((cell) => h("td", {}, cell)));
  });
  return h(
    "table",
    { "data-testid": testid },
    h("thead", {}, h("tr", {}, ...headers.map((name) => h("th", {}, name)))),
    h("tbody", {}, ...body),
  );
}

/** The canonical gRPC name of a status code, e.g. NOT_FOUND. */
export function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** Shows a failed call (status code and message) in the error box. */
export function showError(err: unknown): void {
  const box = document.getElementById("error")!;
  const error = ConnectError.from(err);
  box.dataset.code = codeName(error.code);
  document.getElementById("error-text")!.textContent = `${codeName(error.code)}: ${error.rawMessage}`;
  box.hidden = false;
  if (error.code === Code.Unauthenticated) {
    // The gateway takes API keys only: ask for one where it is entered (`make up` prints where its admin key is).
    const input = document.getElementById("api-key") as HTMLInputElement;
    input.placeholder = "enter an API key";
    input.focus();
  }
}

export function clearError(): void {
  document.getElementById("error")!.hidden = true;
}

/** True when a call ended because the page that started it went away. */
export function isAbort(err: unknown): boolean {
  return (err instanceof Error && err.name === "AbortError") || ConnectError.from(err).code === Code.Canceled;
}

/** Runs a call and shows its error, if any, in the error box; resolves to undefined on failure. */
export async function attempt<T>(call: () => Promise<T>): Promise<T | undefined> {
  try {
    return await call();
  } catch (err) {
    if (!isAbort(err)) showError(err);
    return undefined;
  }
}

export function formatTime(ts: Timestamp | undefined): string {
  if (!ts) return "";
  return timestampDate(ts).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

/** The time of day only (for event lists). */
export function formatClock(ts: Timestamp | undefined): string {
  return ts ? timestampDate(ts).toLocaleTimeString(undefined, { hour12: false }) : "";
}

export function formatNumber(value: number | undefined): string {
  if (value === undefined || Number.isNaN(value)) return "–";
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1000 || Math.abs(value) < 0.001 ? value.toExponential(3) : value.toFixed(4);
}

/** "k=v, k=v" of a metrics map, keys sorted, in a span that may wrap. */
export function formatMetrics(metrics: { [key: string]: number }): HTMLElement {
  const text = Object.keys(metrics)
    .sort()
    .map((key) => `${key}=${formatNumber(metrics[key])}`)
    .join(", ");
  return wrapping(text);
}

/** Text that may wrap inside a table cell (cells do not wrap otherwise). */
export function wrapping(text: string): HTMLElement {
  return h("span", { class: "wrap" }, text);
}

/** The name of an enum value (protoc-gen-es drops the shared prefix: JOB_STATE_RUNNING is RUNNING). */
export function enumLabel(names: Record<number, string>, value: number): string {
  return names[value] ?? String(value);
}

/** A coloured state label. */
export function badge(text: string, testid?: string): HTMLElement {
  return h("span", { class: `badge badge-${text.toLowerCase()}`, "data-testid": testid }, text);
}
