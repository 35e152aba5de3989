// The web console in a real browser (Debian's headless Chromium driven by playwright-core) against a gateway:
// lists models, promotes and rolls back, predicts, shows an error, lists workers, follows a training job live and
// finds it in the jobs list.
//
// Environment: CONSOLE_URL (the gateway's web front, which requires API keys), API_KEY (one with every scope),
// MODEL_NAME (a model with versions 1 and 2, production -> 1),
// EXPECTED_Y (JSON: what version 1 answers for [[1,2,3,4]]), SCREENSHOT_DIR, CHROMIUM (default /usr/bin/chromium).
// When the page is ready for the job it prints "CHECKPOINT ready-for-job" and reads the job id from stdin.
// Prints "CHECKPOINT <name> ..." lines as it goes; exits 1 with "FAILED: <why>" on the first failure.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const url = env("CONSOLE_URL").replace(/\/$/, "");
const apiKey = env("API_KEY");
const model = env("MODEL_NAME");
const expectedY = JSON.parse(env("EXPECTED_Y"));
const screenshots = env("SCREENSHOT_DIR");
const executablePath = env("CHROMIUM", "/usr/bin/chromium");
const JOB_TIMEOUT_MS = Number(env("JOB_TIMEOUT_MS", "240000"));

const checkpoint = (name, detail = "") => console.log(`CHECKPOINT ${name}${detail ? ` ${detail}` : ""}`);

function fail(message) {
  throw new Error(message);
}

async function readLine() {
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    lines.close();
    return line.trim();
  }
  fail("stdin closed before a job id came");
}

/** Waits until the error box is hidden (no failed call on the page). */
async function expectNoError(page, step) {
  const box = page.locator("#error");
  if (await box.isVisible()) fail(`${step}: error box shows "${await box.textContent()}"`);
}

/** Without a key the gateway refuses the first call: the console says so and asks for one, which it keeps for
 * the tab (sessionStorage), so every page after this one sends it. */
async function askedForKey(page) {
  await page.goto(`${url}/#/models`);
  const error = page.locator("#error");
  await error.waitFor({ state: "visible", timeout: 15000 });
  const code = await error.getAttribute("data-code");
  if (code !== "UNAUTHENTICATED") fail(`a call without a key gave ${code}: ${await error.textContent()}`);
  const focused = await page.evaluate(() => document.activeElement?.id);
  if (focused !== "api-key") fail(`the key field is not focused after UNAUTHENTICATED (focus: ${focused})`);
  await page.locator("#api-key").fill(apiKey);
  await page.locator("#api-key").dispatchEvent("change");
  const stored = await page.evaluate(() => [sessionStorage.length, localStorage.length]);
  if (stored[0] !== 1 || stored[1] !== 0) fail(`the key is not kept for the tab only: ${stored}`);
  await page.reload(); // the tab keeps its key across a reload
  checkpoint("asked-for-key");
}

async function modelsPage(page) {
  await page.goto(`${url}/#/models`);
  const row = page.locator(`tr[data-testid="model-row"][data-model="${model}"]`);
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  if (!text.includes("production → 1")) fail(`models row lacks "production → 1": ${text}`);
  checkpoint("models-listed", model);
}

async function promoteAndRollBack(page) {
  await page.locator(`tr[data-model="${model}"] a`).click();
  await page.waitForURL(`**/#/models/${model}`);
  const production = page.getByTestId("production-version");
  await page.locator('tr[data-testid="version-row"][data-version="2"] [data-testid="promote"]').click();
  await page.waitForFunction(
    () => document.querySelector('[data-testid="production-version"]')?.textContent === "version 2",
  );
  await expectNoError(page, "promote");
  checkpoint("promoted", await production.textContent());
  const rollback = page.getByTestId("rollback");
  const label = await rollback.textContent();
  if (label !== "Roll back to version 1") fail(`roll back button says "${label}"`);
  await rollback.click();
  await page.waitForFunction(
    () => document.querySelector('[data-testid="production-version"]')?.textContent === "version 1",
  );
  await expectNoError(page, "roll back");
  checkpoint("rolled-back", await production.textContent());
  await page.screenshot({ path: join(screenshots, "model.png"), fullPage: true });
}

async function predict(page) {
  await page.goto(`${url}/#/predict`);
  await page.locator("#predict-ref").fill(`${model}@production`);
  await page.locator("#predict-input").fill("[[1, 2, 3, 4]]");
  await page.locator("#predict-submit").click();
  const values = page.locator('tr[data-testid="predict-output"][data-output="y"] [data-testid="predict-values"]');
  await values.waitFor({ timeout: 30000 });
  const y = JSON.parse(await values.textContent()).flat();
  if (y.length !== 3 || !y.every((v) => typeof v === "number")) fail(`expected 3 numbers, got ${JSON.stringify(y)}`);
  y.forEach((v, i) => {
    if (Math.abs(v - expectedY[i]) > 1e-3 * Math.max(1, Math.abs(expectedY[i]))) {
      fail(`y = ${JSON.stringify(y)}, TensorFlow says ${JSON.stringify(expectedY)}`);
    }
  });
  const version = await page.getByTestId("predict-version").textContent();
  if (version !== "1") fail(`answered by version ${version}, production is 1`);
  await expectNoError(page, "predict");
  checkpoint("predicted", `version=${version} y=${JSON.stringify(y)}`);
  await page.screenshot({ path: join(screenshots, "predict.png"), fullPage: true });

  // A failed call shows its gRPC status in the error box.
  await page.locator("#predict-ref").fill("no-such-model@production");
  await page.locator("#predict-submit").click();
  const error = page.locator("#error");
  await error.waitFor({ state: "visible", timeout: 15000 });
  const code = await error.getAttribute("data-code");
  if (code !== "NOT_FOUND") fail(`unknown model gave ${code}: ${await error.textContent()}`);
  checkpoint("error-shown", (await page.locator("#error-text").textContent()) ?? "");
}

async function workers(page) {
  // The API key typed in the header goes out as a bearer token on every call.
  const call = page.waitForRequest((request) => request.url().endsWith("/modelgrid.trainer.v1.Trainer/ListWorkers"));
  await page.goto(`${url}/#/workers`);
  const headers = await (await call).allHeaders();
  if (headers.authorization !== `Bearer ${apiKey}`) fail("the API key did not go out as the authorization header");
  if (headers["content-type"] !== "application/grpc-web+proto") fail(`content-type: ${headers["content-type"]}`);
  await page.locator('tr[data-testid="worker-row"]').nth(1).waitFor({ timeout: 15000 });
  checkpoint("workers-listed", String(await page.locator('tr[data-testid="worker-row"]').count()));
  await page.screenshot({ path: join(screenshots, "workers.png"), fullPage: true });
}

async function jobsPage(page, jobId) {
  await page.goto(`${url}/#/jobs`);
  const row = page.locator(`tr[data-testid="job-row"][data-job="${jobId}"]`);
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  if (!text.includes("SUCCEEDED")) fail(`jobs row of ${jobId} does not say SUCCEEDED: ${text}`);
  checkpoint("jobs-listed", jobId);
  await page.screenshot({ path: join(screenshots, "jobs.png"), fullPage: true });
}

async function followJob(page, jobId) {
  await page.goto(`${url}/#/jobs/${jobId}`);
  const step = async () => Number((await page.getByTestId("job-step").getAttribute("data-step")) ?? "0");
  await page.waitForFunction(
    () => Number(document.querySelector('[data-testid="job-step"]')?.getAttribute("data-step") ?? 0) > 0,
    null,
    { timeout: JOB_TIMEOUT_MS, polling: 100 },
  );
  const first = await step();
  await page.waitForFunction(
    (seen) => Number(document.querySelector('[data-testid="job-step"]')?.getAttribute("data-step") ?? 0) > seen,
    first,
    { timeout: JOB_TIMEOUT_MS, polling: 100 },
  );
  checkpoint("job-progress", `${first} -> ${await step()}`);
  const state = page.getByTestId("job-state");
  await page.waitForFunction(
    () => {
      const s = document.querySelector('[data-testid="job-state"]')?.getAttribute("data-state");
      return s === "SUCCEEDED" || s === "FAILED" || s === "CANCELLED";
    },
    null,
    { timeout: JOB_TIMEOUT_MS, polling: 200 },
  );
  const final = await state.getAttribute("data-state");
  if (final !== "SUCCEEDED") fail(`job ended ${final}: ${await page.getByTestId("job-failure").textContent()}`);
  await page.getByTestId("job-stream").filter({ hasText: "ended" }).waitFor({ timeout: 10000 });
  const loss = await page.getByTestId("job-loss").textContent();
  checkpoint("job-succeeded", `step=${await step()} loss=${loss}`);
  await expectNoError(page, "job");
  await page.screenshot({ path: join(screenshots, "job.png"), fullPage: true });
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), "modelgrid-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1280, height: 800 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => msg.type() === "error" && problems.push(`console: ${msg.text()}`));
  try {
    await askedForKey(page);
    await modelsPage(page);
    await page.screenshot({ path: join(screenshots, "models.png"), fullPage: true });
    await promoteAndRollBack(page);
    await predict(page);
    await workers(page);
    checkpoint("ready-for-job");
    const jobId = await readLine();
    await followJob(page, jobId);
    await jobsPage(page, jobId);
    const pageErrors = problems.filter((p) => p.startsWith("page error"));
    if (pageErrors.length) fail(pageErrors.join("; "));
    checkpoint("done");
  } catch (err) {
    await page.screenshot({ path: join(screenshots, "failure.png"), fullPage: true }).catch(() => {});
    console.log(`FAILED: ${err.message}`);
    for (const problem of problems) console.log(`  ${problem}`);
    process.exitCode = 1;
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

await main();
