// The web console in a real browser (Debian's headless Chromium driven by playwright-core) against a gateway:
// lists models, promotes and rolls back, predicts, shows an error, lists workers, compares two versions' metrics,
// sets a canary weight and rolls it back, runs a bulk prediction job and reads its results, shows what each replica
// serves, creates, refuses (without ADMIN) and revokes an API key, submits a training job from YAML and one from
// JSON, cancels the second, follows the first live with its worker logs, and finds it in the jobs list.
//
// Environment: CONSOLE_URL (the gateway's web front, which requires API keys), API_KEY (one with every scope),
// MODEL_NAME (a model with versions 1 and 2, production -> 1, no canary alias), EXPECTED_Y (JSON: what version 1
// answers for [[1,2,3,4]]), EXPECTED_METRICS (JSON: {"1": {metric: value}, "2": ...}), BATCH_RECORDS and
// BATCH_EXPECTED_Y (JSON: records for a bulk job on version 1 and what TensorFlow answers for them), JOB_SPEC_YAML (a
// training job that succeeds), CANCEL_SPEC_JSON (one that waits for slots), SCREENSHOT_DIR, CHROMIUM (default
// /usr/bin/chromium).
// Prints "CHECKPOINT <name> ..." lines as it goes; after those named in PAUSES it waits for a line on stdin (the
// test checks the mesh through its own clients meanwhile). Exits 1 with "FAILED: <why>" on the first failure.
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
const expectedMetrics = JSON.parse(env("EXPECTED_METRICS"));
const batchRecords = JSON.parse(env("BATCH_RECORDS"));
const batchExpectedY = JSON.parse(env("BATCH_EXPECTED_Y"));
const jobSpecYaml = env("JOB_SPEC_YAML");
const cancelSpecJson = env("CANCEL_SPEC_JSON");
/** Checkpoints after which the test checks the mesh and then sends a line. */
const PAUSES = new Set(["canary-set", "canary-rolled-back", "key-created", "key-revoked"]);

const stdin = createInterface({ input: process.stdin });
const stdinLines = stdin[Symbol.asyncIterator]();

const checkpoint = async (name, detail = "") => {
  console.log(`CHECKPOINT ${name}${detail ? ` ${detail}` : ""}`);
  if (PAUSES.has(name)) await readLine();
};

function fail(message) {
  throw new Error(message);
}

async function readLine() {
  const next = await stdinLines.next();
  if (next.done) fail("stdin closed before the test went on");
  return next.value.trim();
}

/** Waits until `selector`'s attribute `name` is `value`. */
async function attributeIs(page, selector, name, value, timeout = 15000) {
  await page.waitForFunction(
    ([s, n, v]) => document.querySelector(s)?.getAttribute(n) === v,
    [selector, name, value],
    { timeout, polling: 100 },
  );
}

function close(actual, expected, what) {
  const a = actual.flat(Infinity);
  const e = expected.flat(Infinity);
  if (a.length !== e.length || a.some((v, i) => Math.abs(v - e[i]) > 1e-3 * Math.max(1, Math.abs(e[i])))) {
    fail(`${what}: ${JSON.stringify(actual)}, TensorFlow says ${JSON.stringify(expected)}`);
  }
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
  await checkpoint("asked-for-key");
}

async function modelsPage(page) {
  await page.goto(`${url}/#/models`);
  const row = page.locator(`tr[data-testid="model-row"][data-model="${model}"]`);
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  if (!text.includes("production → 1")) fail(`models row lacks "production → 1": ${text}`);
  await checkpoint("models-listed", model);
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
  await checkpoint("promoted", await production.textContent());
  const rollback = page.getByTestId("rollback");
  const label = await rollback.textContent();
  if (label !== "Roll back to version 1") fail(`roll back button says "${label}"`);
  await rollback.click();
  await page.waitForFunction(
    () => document.querySelector('[data-testid="production-version"]')?.textContent === "version 1",
  );
  await expectNoError(page, "roll back");
  await checkpoint("rolled-back", await production.textContent());
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
  await checkpoint("predicted", `version=${version} y=${JSON.stringify(y)}`);
  await page.screenshot({ path: join(screenshots, "predict.png"), fullPage: true });

  // A failed call shows its gRPC status in the error box.
  await page.locator("#predict-ref").fill("no-such-model@production");
  await page.locator("#predict-submit").click();
  const error = page.locator("#error");
  await error.waitFor({ state: "visible", timeout: 15000 });
  const code = await error.getAttribute("data-code");
  if (code !== "NOT_FOUND") fail(`unknown model gave ${code}: ${await error.textContent()}`);
  await checkpoint("error-shown", (await page.locator("#error-text").textContent()) ?? "");
}

async function workers(page) {
  // The API key typed in the header goes out as a bearer token on every call.
  const call = page.waitForRequest((request) => request.url().endsWith("/modelgrid.trainer.v1.Trainer/ListWorkers"));
  await page.goto(`${url}/#/workers`);
  const headers = await (await call).allHeaders();
  if (headers.authorization !== `Bearer ${apiKey}`) fail("the API key did not go out as the authorization header");
  if (headers["content-type"] !== "application/grpc-web+proto") fail(`content-type: ${headers["content-type"]}`);
  await page.locator('tr[data-testid="worker-row"]').nth(1).waitFor({ timeout: 15000 });
  await checkpoint("workers-listed", String(await page.locator('tr[data-testid="worker-row"]').count()));
  await page.screenshot({ path: join(screenshots, "workers.png"), fullPage: true });
}

async function jobsPage(page, jobId) {
  await page.goto(`${url}/#/jobs`);
  const row = page.locator(`tr[data-testid="job-row"][data-job="${jobId}"]`);
  await row.waitFor({ timeout: 15000 });
  const text = await row.innerText();
  if (!text.includes("SUCCEEDED")) fail(`jobs row of ${jobId} does not say SUCCEEDED: ${text}`);
  await checkpoint("jobs-listed", jobId);
  await page.screenshot({ path: join(screenshots, "jobs.png"), fullPage: true });
}

/** Ticks versions 1 and 2 on the model page: their metrics side by side, the better value of each marked. */
async function compareVersions(page) {
  await page.goto(`${url}/#/models/${model}`);
  const pick = (v) => page.locator(`tr[data-testid="version-row"][data-version="${v}"] [data-testid="compare-pick"]`);
  await pick(1).check();
  await page.getByTestId("compare-hint").waitFor({ timeout: 15000 }); // one version: nothing to compare yet
  await pick(2).check();
  await page.getByTestId("compare-table").waitFor({ timeout: 15000 });
  const cells = [];
  for (const [version, metrics] of Object.entries(expectedMetrics)) {
    for (const [name, value] of Object.entries(metrics)) {
      const cell = page.locator(`tr[data-testid="compare-row"][data-metric="${name}"] td[data-version="${version}"]`);
      const shown = Number(await cell.textContent());
      if (!(Math.abs(shown - value) < 1e-4)) fail(`version ${version} ${name}: shown ${shown}, registry has ${value}`);
      cells.push(`${version}:${name}=${shown}`);
    }
  }
  const best = await page.locator('tr[data-testid="compare-row"] td.best').evaluateAll((tds) =>
    tds.map((td) => `${td.parentElement.dataset.metric}:${td.dataset.version}`).sort(),
  );
  if (JSON.stringify(best) !== JSON.stringify(["accuracy:2", "loss:2"])) fail(`best values marked: ${best}`);
  await expectNoError(page, "compare");
  await checkpoint("compared", cells.join(" "));
}

async function setRange(page, testid, value) {
  await page.getByTestId(testid).evaluate((input, v) => {
    input.value = String(v);
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }, value);
}

/** Points the canary alias at version 2, gives it all of production's calls, then rolls back to 0; after each
 * change the test checks the registry's tag and where the gateway sends production calls. */
async function canary(page) {
  const weight = '[data-testid="canary-weight"]';
  await attributeIs(page, weight, "data-weight", "0");
  await setRange(page, "canary-slider", 100);
  if (!(await page.getByTestId("canary-apply").isDisabled())) fail("a weight was offered without a canary alias");
  await page.getByTestId("canary-version").selectOption("2");
  await page.getByTestId("canary-set-alias").click();
  await page.waitForFunction(() => document.querySelector('[data-testid="canary-alias"]')?.textContent === "(version 2)");
  await setRange(page, "canary-slider", 100);
  await page.getByTestId("canary-apply").click();
  await attributeIs(page, weight, "data-weight", "1");
  await expectNoError(page, "canary set");
  await page.screenshot({ path: join(screenshots, "canary.png"), fullPage: true });
  await checkpoint("canary-set", await page.locator(weight).textContent());
  await page.getByTestId("canary-rollback").click();
  await attributeIs(page, weight, "data-weight", "0");
  await expectNoError(page, "canary rollback");
  await checkpoint("canary-rolled-back", await page.locator(weight).textContent());
}

/** A bulk job on version 1 over records typed as JSON; its results read back from the registry in the page. */
async function batch(page) {
  await page.goto(`${url}/#/batch`);
  await page.getByTestId("batch-ref").fill(`${model}:1`);
  await page.getByTestId("batch-input").fill(JSON.stringify(batchRecords));
  await page.getByTestId("batch-size").fill("2");
  await page.getByTestId("batch-submit").click();
  await page.waitForURL(/#\/batch\/.+/, { timeout: 30000 });
  const jobId = decodeURIComponent(page.url().split("#/batch/")[1]);
  await attributeIs(page, '[data-testid="batch-state"]', "data-state", "SUCCEEDED", 60000);
  const records = (await page.getByTestId("batch-records").textContent()).trim();
  if (records !== `${batchRecords.length} / ${batchRecords.length}`) fail(`records done: ${records}`);
  await page.getByTestId("batch-fetch").click();
  const values = page.locator('tr[data-testid="batch-output"][data-output="y"] [data-testid="batch-values"]');
  await values.waitFor({ timeout: 30000 });
  close(JSON.parse(await values.textContent()), batchExpectedY, "bulk job results");
  const download = await page.getByTestId("batch-download").getAttribute("href");
  if (!download?.startsWith("blob:")) fail(`results download link: ${download}`);
  await expectNoError(page, "batch");
  await page.screenshot({ path: join(screenshots, "batch.png"), fullPage: true });
  await page.goto(`${url}/#/batch`);
  const row = page.locator(`tr[data-testid="batch-row"][data-job="${jobId}"]`);
  await row.waitFor({ timeout: 15000 });
  if (!(await row.innerText()).includes("SUCCEEDED")) fail(`batch list row: ${await row.innerText()}`);
  await checkpoint("batch-fetched", jobId);
}

/** The predictor replica serving the model's versions 1 and 2, as the gateway routes to it. */
async function serving(page) {
  await page.goto(`${url}/#/serving`);
  const row = page.locator('tr[data-testid="replica-row"][data-service="predictor"]');
  await row.first().waitFor({ timeout: 15000 });
  if ((await row.count()) !== 1) fail(`expected one predictor replica, the page shows ${await row.count()}`);
  const served = row.locator(`[data-testid="served-model"][data-model="${model}"]`);
  const versions = ((await served.getAttribute("data-versions")) ?? "").split(",").sort();
  if (JSON.stringify(versions) !== JSON.stringify(["1", "2"])) fail(`replica serves versions ${versions}`);
  await expectNoError(page, "serving");
  await page.screenshot({ path: join(screenshots, "serving.png"), fullPage: true });
  await checkpoint("serving-listed", await row.getAttribute("data-target"));
}

async function useKey(page, key) {
  await page.locator("#api-key").fill(key);
  await page.locator("#api-key").dispatchEvent("change");
}

/** Creates a READ key (its secret shown once), is refused the page with it, and revokes it with the admin key. */
async function apiKeys(page) {
  const name = `console-e2e-${Date.now()}`;
  await page.goto(`${url}/#/keys`);
  await page.getByTestId("key-name").fill(name);
  await page.getByTestId("key-create").click();
  const secret = ((await page.getByTestId("key-secret").textContent({ timeout: 15000 })) ?? "").trim();
  const row = page.locator('tr[data-testid="key-row"]').filter({ hasText: name });
  await row.waitFor({ timeout: 15000 });
  const id = await row.getAttribute("data-key");
  if (secret.split(".")[0] !== id) fail(`secret ${secret.slice(0, 8)}... is not of key ${id}`);
  if (!(await row.innerText()).includes("READ") || (await row.innerText()).includes("ADMIN")) {
    fail(`key row: ${await row.innerText()}`);
  }
  await expectNoError(page, "key create");
  await page.screenshot({ path: join(screenshots, "keys.png"), fullPage: true });
  await checkpoint("key-created", `${id} ${secret}`);

  await useKey(page, secret);
  await page.reload();
  const denied = page.getByTestId("keys-denied");
  await denied.waitFor({ timeout: 15000 });
  if ((await denied.getAttribute("data-code")) !== "PERMISSION_DENIED") fail(`denied: ${await denied.innerText()}`);
  if (await page.getByTestId("keys-table").count()) fail("the keys table shows without ADMIN");
  if (await page.locator("#error").isVisible()) fail("the denied page also filled the error box");
  await checkpoint("keys-denied", (await denied.innerText()).replace(/\s+/g, " "));

  await useKey(page, apiKey);
  await page.reload();
  await row.waitFor({ timeout: 15000 });
  if (await page.getByTestId("key-secret").count()) fail("the secret is shown again");
  const revoke = row.getByTestId("key-revoke");
  await revoke.click();
  await page.waitForFunction((n) => {
    const r = [...document.querySelectorAll('tr[data-testid="key-row"]')].find((tr) => tr.textContent.includes(n));
    return r?.querySelector('[data-testid="key-revoke"]')?.textContent === "Click again to revoke";
  }, name);
  await revoke.click();
  await row.waitFor({ state: "detached", timeout: 15000 }); // revoked keys are listed only on demand
  await page.getByTestId("keys-show-revoked").check();
  await attributeIs(page, `tr[data-testid="key-row"][data-key="${id}"]`, "data-revoked", "true");
  await expectNoError(page, "key revoke");
  await checkpoint("key-revoked", id);
}

/** Submits a spec from the submit page; returns the id of the job it opens. */
async function submitSpec(page, text) {
  await page.goto(`${url}/#/submit`);
  await page.getByTestId("job-spec").fill(text);
  await page.getByTestId("job-submit").click();
  await page.waitForURL(/#\/jobs\/.+/, { timeout: 30000 });
  return decodeURIComponent(page.url().split("#/jobs/")[1]);
}

async function refusedSpec(page) {
  await page.goto(`${url}/#/submit`);
  await page.getByTestId("job-spec").fill("name: typo\nrecipe: mlp\nepochz: 3\n");
  await page.getByTestId("job-submit").click();
  const problem = page.getByTestId("job-spec-problem");
  await problem.waitFor({ timeout: 5000 });
  const text = await problem.textContent();
  if (!text.includes("epochz")) fail(`a spec with an unknown field gave: ${text}`);
  if (!page.url().endsWith("#/submit")) fail(`the bad spec left the page: ${page.url()}`);
  await checkpoint("spec-refused", text);
}

/** A job that waits for slots (more workers than the agents have), cancelled from its page. */
async function cancelJob(page) {
  const id = await submitSpec(page, cancelSpecJson);
  const cancel = page.getByTestId("job-cancel");
  await cancel.waitFor({ timeout: 15000 });
  await page.getByTestId("job-logs-empty").waitFor({ timeout: 15000 });
  await cancel.click();
  await attributeIs(page, '[data-testid="job-state"]', "data-state", "CANCELLED", 30000);
  if (await cancel.isVisible()) fail("the cancel button stays on a cancelled job");
  await expectNoError(page, "cancel");
  await checkpoint("job-cancelled", id);
}

/** The worker logs the job page shows once the job has ended: one block per worker, with lines. */
async function jobLogs(page) {
  await page.waitForFunction(
    () => {
      const logs = [...document.querySelectorAll('[data-testid="job-log"] pre')];
      return logs.length === 2 && logs.every((pre) => pre.textContent.trim() && pre.textContent !== "(no lines)");
    },
    null,
    { timeout: 30000, polling: 200 },
  );
  const lines = await page.locator('[data-testid="job-log"] pre').evaluateAll((pres) =>
    pres.map((pre) => pre.textContent.split("\n").length),
  );
  await checkpoint("job-logs", lines.join(" "));
}

async function followJob(page, jobId) {
  if (!page.url().endsWith(`#/jobs/${jobId}`)) await page.goto(`${url}/#/jobs/${jobId}`);
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
  await checkpoint("job-progress", `${first} -> ${await step()}`);
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
  await checkpoint("job-succeeded", `step=${await step()} loss=${loss}`);
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
    await compareVersions(page);
    await canary(page);
    await batch(page);
    await serving(page);
    await apiKeys(page);
    await refusedSpec(page);
    await cancelJob(page);
    const jobId = await submitSpec(page, jobSpecYaml);
    await checkpoint("job-submitted", jobId);
    await followJob(page, jobId);
    await jobLogs(page);
    await jobsPage(page, jobId);
    const pageErrors = problems.filter((p) => p.startsWith("page error"));
    if (pageErrors.length) fail(pageErrors.join("; "));
    await checkpoint("done");
  } catch (err) {
    await page.screenshot({ path: join(screenshots, "failure.png"), fullPage: true }).catch(() => {});
    console.log(`FAILED: ${err.message}`);
    for (const problem of problems) console.log(`  ${problem}`);
    process.exitCode = 1;
  } finally {
    stdin.close();
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

await main();
