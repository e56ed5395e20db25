/**
 * A Node.js client for Wafer, built only from the repository's protos/.
 *
 * Nothing here is generated and nothing comes from the Python side: the .proto files are read at
 * run time with @grpc/proto-loader (protos/wafer/v1/*.proto, plus this folder's copy of the standard
 * grpc/health/v1/health.proto), and every RPC of every service found there becomes a method:
 *
 *   import { connect, toStruct, fromStruct } from './wafer.mjs';
 *
 *   const wafer = connect('127.0.0.1:50051');
 *   const { embeddings } = await wafer.inference.embed({ inputs: ['hello'] });
 *   for await (const chunk of wafer.inference.generate({ prompt: 'Hi', max_tokens: 16 })) {
 *     process.stdout.write(chunk.text);
 *   }
 *   await wafer.index.upsert({ collection: 'sms', documents: [{ id: '1', text: 'hi', payload: toStruct({ from: 'Ann' }) }] });
 *   const { status } = await wafer.health.check({ service: 'wafer.v1.Inference' });
 *   wafer.close();
 *
 * Services and methods: `wafer.inference`, `wafer.models`, `wafer.index`, `wafer.health`, each with
 * one method per RPC, named like the RPC in lowerCamelCase (Embed → embed, ListModels → listModels,
 * GetDocuments → getDocuments). A unary RPC returns a Promise of the response; a server-streaming
 * RPC (Inference/Generate, Health/Watch) returns an async iterable of responses (breaking out of the
 * loop cancels the call).
 *
 * Messages are plain objects with the proto's field names (keepCase: snake_case, e.g. `max_tokens`).
 * Decoded messages carry every field (defaults: true; an unset sub-message is null); enums are their
 * names ('FINISH_REASON_LENGTH', 'MODEL_STATE_READY'); 64-bit integers (`memory_bytes`,
 * `documents`, Timestamp `seconds`) are decimal strings; proto3 `optional` fields
 * (`temperature`, `top_p`, `seed`, `normalize`) are unset when the key is left out.
 * google.protobuf.Struct (document payloads, search filters) is `{ fields: { key: Value } }`: use
 * `toStruct` / `fromStruct`. Note the well-known types keep their own camelCase field names
 * (`stringValue`, `numberValue`), unlike Wafer's own messages.
 *
 * Every method takes `(request, options)`, with options `{ timeoutMs, metadata }`: `timeoutMs`
 * overrides the deadline given to `connect` (0 for none), `metadata` is an object of extra request
 * headers (e.g. `{ 'x-request-id': 'abc' }`). A failed call rejects (or, for a stream, throws from
 * the loop) with a `WaferError` carrying the gRPC status: `code` (number), `codeName`
 * ('NOT_FOUND'), `details` (the server's message), `requestId` (the server's x-request-id) and
 * `retryAfterMs` when the server suggests one.
 */

import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const HERE = dirname(fileURLToPath(import.meta.url));

/** The repository's protos/ folder: the API contract. */
export const PROTOS_DIR = join(HERE, '..', '..', 'protos');
/** This client's own protos: a copy of the public, standard grpc/health/v1/health.proto. */
export const LOCAL_PROTOS_DIR = join(HERE, 'protos');

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS_DIR, LOCAL_PROTOS_DIR],
};

/** Client property name → fully qualified service name. */
export const SERVICES = Object.freeze({
  inference: 'wafer.v1.Inference',
  models: 'wafer.v1.Models',
  index: 'wafer.v1.Index',
  health: 'grpc.health.v1.Health',
});

const DEFAULT_TIMEOUT_MS = 120_000;

let loaded = null;

/** Load every protos/wafer/v1/*.proto and health.proto once; returns grpc's package object. */
export function loadProtos() {
  if (loaded === null) {
    const wafer = readdirSync(join(PROTOS_DIR, 'wafer', 'v1'))
      .filter((name) => name.endsWith('.proto'))
      .sort()
      .map((name) => `wafer/v1/${name}`);
    const definition = protoLoader.loadSync([...wafer, 'grpc/health/v1/health.proto'], LOADER_OPTIONS);
    loaded = grpc.loadPackageDefinition(definition);
  }
  return loaded;
}

/** A failed call: the gRPC status code (number and name), the server's details and request id. */
export class WaferError extends Error {
  constructor({ code, details, metadata, method }) {
    const codeName = grpc.status[code] ?? 'UNKNOWN';
    super(`${method} failed: ${codeName} (${code}): ${details}`);
    this.name = 'WaferError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.method = method;
    this.metadata = metadata ?? null;
    this.requestId = firstValue(metadata, 'x-request-id');
    const retryAfter = firstValue(metadata, 'retry-after-ms');
    this.retryAfterMs = retryAfter === null ? null : Number(retryAfter);
  }

  /** Wrap an error from @grpc/grpc-js (anything without a status code is passed through). */
  static from(error, method) {
    if (error instanceof WaferError || typeof error?.code !== 'number') {
      return error;
    }
    return new WaferError({ code: error.code, details: error.details, metadata: error.metadata, method });
  }
}

function firstValue(metadata, key) {
  const values = metadata?.get?.(key) ?? [];
  return values.length > 0 ? String(values[0]) : null;
}

function lowerCamel(name) {
  return name.charAt(0).toLowerCase() + name.slice(1);
}

function lookup(root, dotted) {
  const found = dotted.split('.').reduce((node, part) => node?.[part], root);
  if (typeof found !== 'function') {
    throw new Error(`service ${dotted} not found in the loaded protos`);
  }
  return found;
}

function callArguments(options, defaultTimeoutMs) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of Object.entries(options.metadata ?? {})) {
    metadata.add(key, String(value));
  }
  const timeoutMs = options.timeoutMs ?? defaultTimeoutMs;
  const callOptions = timeoutMs > 0 && Number.isFinite(timeoutMs) ? { deadline: Date.now() + timeoutMs } : {};
  return [metadata, callOptions];
}

function unaryMethod(stub, rpc, method, defaultTimeoutMs) {
  return (request = {}, options = {}) =>
    new Promise((resolve, reject) => {
      stub[rpc](request, ...callArguments(options, defaultTimeoutMs), (error, response) => {
        if (error) {
          reject(WaferError.from(error, method));
        } else {
          resolve(response);
        }
      });
    });
}

function streamingMethod(stub, rpc, method, defaultTimeoutMs) {
  return (request = {}, options = {}) =>
    (async function* stream() {
      const call = stub[rpc](request, ...callArguments(options, defaultTimeoutMs));
      // grpc-js emits 'error' (CANCELLED) after the loop is left early; without a listener that
      // would be an uncaught exception. The iterator below still sees real errors.
      call.on('error', () => {});
      try {
        for await (const message of call) {
          yield message;
        }
      } catch (error) {
        throw WaferError.from(error, method);
      } finally {
        call.cancel(); // a no-op once the call has ended
      }
    })();
}

/**
 * Open a channel to a Wafer server ('127.0.0.1:50051', 'unix:///path/wafer.sock').
 *
 * options: `timeoutMs` — default deadline of each call (120 s; 0 for none); `credentials` — grpc
 * channel credentials (insecure by default); `channelOptions` — passed to grpc-js.
 *
 * Returns `{ inference, models, index, health, methods, close() }`; `methods` lists every RPC as
 * `{ service, rpc, method: 'pkg.Service/Rpc', name, streaming }`.
 */
export function connect(address, options = {}) {
  const root = loadProtos();
  const credentials = options.credentials ?? grpc.credentials.createInsecure();
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const client = { methods: [] };
  let channel = null;
  for (const [property, serviceName] of Object.entries(SERVICES)) {
    const Stub = lookup(root, serviceName);
    // All services share one channel (one HTTP/2 connection).
    const stub = new Stub(address, credentials, {
      ...options.channelOptions,
      ...(channel ? { channelOverride: channel } : {}),
    });
    channel ??= stub.getChannel();
    const service = {};
    for (const [rpc, definition] of Object.entries(Stub.service)) {
      const method = `${serviceName}/${rpc}`;
      const name = lowerCamel(rpc);
      if (definition.requestStream) {
        continue; // no client-streaming RPCs in these protos
      }
      service[name] = definition.responseStream
        ? streamingMethod(stub, rpc, method, timeoutMs)
        : unaryMethod(stub, rpc, method, timeoutMs);
      client.methods.push({ service: serviceName, rpc, method, name, streaming: definition.responseStream });
    }
    client[property] = Object.freeze(service);
  }
  client.close = () => channel.close();
  return Object.freeze(client);
}

/** A plain JSON-able object → google.protobuf.Struct. */
export function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object ?? {}).map(([key, value]) => [key, toValue(value)])) };
}

function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`cannot put a ${typeof value} in a google.protobuf.Struct`);
}

/** google.protobuf.Struct (as decoded, or null) → a plain object. */
export function fromStruct(struct) {
  if (!struct) return {};
  return Object.fromEntries(Object.entries(struct.fields ?? {}).map(([key, value]) => [key, fromValue(value)]));
}

function fromValue(value) {
  const kind = value?.kind ?? Object.keys(value ?? {}).find((key) => key.endsWith('Value') && value[key] != null);
  switch (kind) {
    case 'numberValue':
    case 'stringValue':
    case 'boolValue':
      return value[kind];
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue?.values ?? []).map(fromValue);
    default:
      return null;
  }
}

/** google.protobuf.Timestamp (as decoded, or null) → Date, or null. */
export function toDate(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.round(timestamp.nanos / 1e6));
}
