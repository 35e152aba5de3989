// gRPC-Web clients of the registry, predictor and trainer, all through the gateway that served this page.
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Predictor } from "./gen/modelgrid/predictor/v1/predictor_pb";
import { ModelRegistry } from "./gen/modelgrid/registry/v1/registry_pb";
import { Trainer } from "./gen/modelgrid/trainer/v1/trainer_pb";

const API_KEY_STORAGE = "modelgrid.apiKey";

/** The API key the user entered in this tab (empty: none). */
export function apiKey(): string {
  return sessionStorage.getItem(API_KEY_STORAGE) ?? "";
}

/** Keeps the API key for this tab's later calls (sessionStorage: gone when the tab closes, never shared with
 * other tabs or kept on disk); an empty key removes it. */
export function setApiKey(key: string): void {
  if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
  else sessionStorage.removeItem(API_KEY_STORAGE);
}

/** Sends `authorization: Bearer <key>` on every call when a key is set. */
const bearerAuth: Interceptor = (next) => async (req) => {
  const key = apiKey();
  if (key) req.header.set("authorization", `Bearer ${key}`);
  return next(req);
};

/** The client identity the registry records in its audit trail. */
const clientIdentity: Interceptor = (next) => async (req) => {
  req.header.set("x-modelgrid-client", "web-console");
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [bearerAuth, clientIdentity],
});

export const registry = createClient(ModelRegistry, transport);
export const predictor = createClient(Predictor, transport);
export const trainer = createClient(Trainer, transport);
