// A small SVG line chart of the training loss, redrawn as step events arrive.
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 120;
const PAD = 6;

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, String(value));
  return element;
}

/** Loss per reported step, scaled to its own range, under a label with the first and last values. */
export function lossChart(losses: number[]): HTMLElement {
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    preserveAspectRatio: "none",
    role: "img",
    "aria-label": "training loss",
  });
  const low = Math.min(...losses);
  const high = Math.max(...losses);
  const span = high - low || 1;
  const x = (i: number) => PAD + (i / Math.max(losses.length - 1, 1)) * (WIDTH - 2 * PAD);
  const y = (v: number) => HEIGHT - PAD - ((v - low) / span) * (HEIGHT - 2 * PAD);
  const points = losses.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const line = { points, fill: "none", stroke: "currentColor", "stroke-width": 2, "vector-effect": "non-scaling-stroke" };
  chart.append(svg("polyline", line));
  const label = document.createElement("div");
  label.className = "chart-label";
  label.textContent = `loss ${losses[0].toFixed(3)} → ${losses[losses.length - 1].toFixed(3)}`;
  const figure = document.createElement("div");
  figure.append(label, chart);
  return figure;
}
