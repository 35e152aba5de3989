// gRPC-Web clients of the registry, predictor, trainer and the gateway's own API, all through the gateway that
// served this page.
import { create, fromBinary, toBinary, type DescMessage, type DescMethod, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { encodeEnvelope } from "@connectrpc/connect/protocol";
import { requestHeader, trailerFlag, trailerParse, validateResponse, validateTrailer } from "@connectrpc/connect/protocol-grpc-web";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GatewayAdmin } from "./gen/modelgrid/gateway/v1/gateway_pb";
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

const CLIENT_NAME = "web-console";

/** The client identity the registry records in its audit trail. */
const clientIdentity: Interceptor = (next) => async (req) => {
  req.header.set("x-modelgrid-client", CLIENT_NAME);
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
export const gateway = createClient(GatewayAdmin, transport);

type Method<I extends DescMessage, O extends DescMessage> = DescMethod & { input: I; output: O; methodKind: "client_streaming" };

/** A client-streaming call whose request messages are all known up front. The fetch API cannot stream a request
 * body (so connect-web refuses such methods), but the gateway takes every message of the stream as one frame of a
 * single gRPC-Web body: they go in one POST, with the headers the other calls send. */
export async function sendAll<I extends DescMessage, O extends DescMessage>(
  method: Method<I, O>,
  messages: MessageInitShape<I>[],
  signal: AbortSignal,
): Promise<MessageShape<O>> {
  const frames = messages.map((message) => encodeEnvelope(0, toBinary(method.input, create(method.input, message))));
  const body = new Uint8Array(frames.reduce((size, frame) => size + frame.length, 0));
  frames.reduce((offset, frame) => (body.set(frame, offset), offset + frame.length), 0);
  const header = requestHeader(true, undefined, undefined, false);
  const key = apiKey();
  if (key) header.set("authorization", `Bearer ${key}`);
  header.set("x-modelgrid-client", CLIENT_NAME);
  const url = `${window.location.origin}/${method.parent.typeName}/${method.name}`;
  const response = await fetch(url, { method: "POST", headers: header, body, signal });
  const { headerError } = validateResponse(response.status, response.headers);
  if (headerError) throw headerError;
  const bytes = new Uint8Array(await response.arrayBuffer());
  let reply: MessageShape<O> | undefined;
  let trailer: Headers | undefined;
  for (let at = 0; at + 5 <= bytes.length; ) {
    const size = new DataView(bytes.buffer, bytes.byteOffset + at + 1, 4).getUint32(0);
    const data = bytes.subarray(at + 5, at + 5 + size);
    if ((bytes[at] & trailerFlag) === trailerFlag) trailer = trailerParse(data);
    else reply = fromBinary(method.output, data);
    at += 5 + size;
  }
  validateTrailer(trailer ?? new Headers(), response.headers); // a non-OK status throws its ConnectError
  if (reply === undefined) throw new ConnectError(`${method.name} answered no message`, Code.Internal);
  return reply;
}
