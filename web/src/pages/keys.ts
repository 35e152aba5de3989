// API keys page (ADMIN only; the gateway enforces it): create a key and show its secret once, list keys, revoke one.
import { Code, ConnectError } from "@connectrpc/connect";
import { gateway } from "../client";
import { attempt, codeName, enumLabel, fill, formatTime, h, isAbort, showError, table } from "../dom";
import { Scope, type ApiKey } from "../gen/modelgrid/gateway/v1/gateway_pb";

const SCOPES = [Scope.READ, Scope.PREDICT, Scope.TRAIN, Scope.ADMIN];

export async function renderKeys(root: HTMLElement, signal: AbortSignal): Promise<void> {
  const list = h("div", {});
  const created = h("section", { "data-testid": "key-created" });
  const showRevoked = h("input", { type: "checkbox", "data-testid": "keys-show-revoked" });
  const name = h("input", { "data-testid": "key-name", placeholder: "who or what uses it", required: true, maxlength: 100 });
  const scopeBoxes = SCOPES.map((scope) => {
    const label = enumLabel(Scope, scope);
    return { scope, box: h("input", { type: "checkbox", "data-testid": `key-scope-${label.toLowerCase()}`, checked: scope === Scope.READ }), label };
  });
  const rate = h("input", { type: "number", min: 0, step: "any", value: 0, "data-testid": "key-rate" });
  const create = h("button", { type: "submit", "data-testid": "key-create" }, "Create key");
  const form = h(
    "form",
    {
      class: "predict-form",
      onsubmit: (event: Event) => {
        event.preventDefault();
        void createKey();
      },
    },
    h("label", {}, "Name", name),
    h("fieldset", { class: "scopes" }, h("legend", {}, "Scopes"),
      ...scopeBoxes.map(({ box, label }) => h("label", { class: "inline" }, box, ` ${label}`))),
    h("label", {}, "Requests per second (0: the gateway's default)", rate),
    h("div", {}, create),
  );
  fill(
    root,
    h("div", { class: "page-head" }, h("h1", {}, "API keys"),
      h("label", { class: "inline hint" }, showRevoked, " show revoked")),
    list,
  );
  showRevoked.addEventListener("change", () => void load());

  async function createKey(): Promise<void> {
    const scopes = scopeBoxes.filter(({ box }) => box.checked).map(({ scope }) => scope);
    create.disabled = true;
    const reply = await attempt(() =>
      gateway.createApiKey({ name: name.value.trim(), scopes, rateLimit: Number(rate.value) || 0 }, { signal }),
    );
    create.disabled = false;
    if (!reply || signal.aborted) return;
    const secret = h("code", { "data-testid": "key-secret" }, reply.secret);
    fill(
      created,
      h("div", { class: "secret" },
        h("p", {}, `Key ${reply.key?.id ?? ""} (${reply.key?.name ?? ""}) created. Its secret is shown only now: `,
          "the gateway keeps a hash. Store it where only you can read it."),
        secret,
        h("button", { type: "button", class: "secondary", onclick: () => void navigator.clipboard?.writeText(reply.secret) }, "Copy"),
        h("button", { type: "button", class: "secondary", "data-testid": "key-secret-hide", onclick: () => fill(created) }, "Done"),
      ),
    );
    name.value = "";
    await load();
  }

  async function revoke(key: ApiKey, button: HTMLButtonElement): Promise<void> {
    if (button.dataset.confirm !== "yes") {
      // two clicks: the first asks, the second revokes
      button.dataset.confirm = "yes";
      button.textContent = "Click again to revoke";
      return;
    }
    button.disabled = true;
    await attempt(() => gateway.revokeApiKey({ id: key.id }, { signal }));
    await load();
  }

  async function load(): Promise<void> {
    let keys: ApiKey[];
    try {
      keys = (await gateway.listApiKeys({}, { signal })).keys;
    } catch (err) {
      if (isAbort(err)) return;
      const error = ConnectError.from(err);
      if (error.code !== Code.PermissionDenied) return showError(err);
      // The key in use lacks ADMIN: say so here, with the gateway's own words, and offer nothing else.
      fill(
        root,
        h("div", { class: "page-head" }, h("h1", {}, "API keys")),
        h("div", { class: "failure", "data-testid": "keys-denied", "data-code": codeName(error.code) },
          h("p", {}, "Only an ADMIN key manages API keys; the key entered above lacks the ADMIN scope."),
          h("p", {}, h("code", {}, `${codeName(error.code)}: ${error.rawMessage}`))),
      );
      return;
    }
    if (signal.aborted) return;
    const shown = keys.filter((key) => showRevoked.checked || !key.revoked);
    fill(
      list,
      h("h2", {}, "Create a key"),
      form,
      created,
      h("h2", {}, "Keys"),
      table(
        "keys-table",
        ["Id", "Name", "Scopes", "Rate (req/s)", "Created", "State", ""],
        shown,
        (key) => {
          const button = h("button", { type: "button", class: "danger", "data-testid": "key-revoke", disabled: key.revoked }, "Revoke");
          button.addEventListener("click", () => void revoke(key, button));
          return {
            attrs: { "data-testid": "key-row", "data-key": key.id, "data-revoked": String(key.revoked) },
            cells: [
              h("code", {}, key.id),
              key.name,
              key.scopes.map((s) => enumLabel(Scope, s)).join(", "),
              key.rateLimit || "default",
              formatTime(key.createdAt),
              key.revoked ? h("span", { class: "badge badge-failed" }, "revoked") : h("span", { class: "badge badge-ready" }, "active"),
              key.revoked ? "" : button,
            ],
          };
        },
        showRevoked.checked ? "No keys." : "No keys in use.",
      ),
    );
  }
  await load();
}
