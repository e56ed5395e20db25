#!/usr/bin/env node
/**
 * Smoke test of the Node client: `node clients/node/smoke.mjs ADDRESS`.
 *
 * Calls every RPC of wafer.v1.Inference, wafer.v1.Models and wafer.v1.Index, plus
 * grpc.health.v1.Health Check and Watch (Watch's outcome is reported, not required), a Generate
 * stream left early, and two deliberate errors (Embed and Generate with the
 * unknown model "nope", both NOT_FOUND). Prints one JSON object summarising the answers on stdout
 * and exits 0; any unexpected failure is printed on stderr and exits 1.
 * Leaves a collection `node-smoke` behind (re-running it is safe: ids are stable).
 */

import { connect, fromStruct, SERVICES, toDate, toStruct, WaferError } from './wafer.mjs';

const ON_DEMAND_MODEL = 'paraphrase-minilm-l3';
const COLLECTION = 'node-smoke';
const RERANK_DOCUMENTS = [
  'The train to Edinburgh leaves at 9:15 from platform 4.',
  'Your parcel has been delivered to the front door.',
  'The meeting has been moved to 3pm on Thursday in room B.',
  'Happy birthday! Hope you have a great day.',
];
const DOCUMENTS = [
  { id: 'n1', text: 'The meeting has been moved to 3pm on Thursday.', payload: { sender: 'ann', urgent: true } },
  { id: 'n2', text: 'Can you pick up milk and bread on the way home?', payload: { sender: 'bob', urgent: false } },
  { id: 'n3', text: 'Your parcel will be delivered tomorrow morning.', payload: { sender: 'shop', tags: ['a', 'b'] } },
];

function norm(values) {
  return Math.sqrt(values.reduce((sum, v) => sum + v * v, 0));
}

/** The client's services, with every method recording its full name in `called` when invoked. */
function recording(connection, called) {
  return Object.fromEntries(
    Object.entries(SERVICES).map(([property, service]) => [
      property,
      Object.fromEntries(
        connection.methods
          .filter((m) => m.service === service)
          .map((m) => [
            m.name,
            (...args) => {
              called.add(m.method);
              return connection[property][m.name](...args);
            },
          ]),
      ),
    ]),
  );
}

/** Run `run`, which must fail: returns the WaferError's code, name, details and request id. */
async function expectError(run) {
  try {
    await run();
  } catch (error) {
    if (!(error instanceof WaferError)) throw error;
    return { code: error.code, code_name: error.codeName, details: error.details, request_id: error.requestId };
  }
  throw new Error('the call was expected to fail but succeeded');
}

async function main(address) {
  const connection = connect(address, { timeoutMs: 60_000 });
  const called = new Set();
  const wafer = recording(connection, called);
  try {
    const summary = { address };

    // grpc.health.v1.Health
    const health = await wafer.health.check({ service: 'wafer.v1.Inference' });
    const overall = await wafer.health.check({ service: '' });
    // Watch streams the current status first; leaving the loop cancels the stream. Reported, not
    // required: the server answers it INTERNAL today (see README.md), so its error is recorded.
    let watch;
    try {
      for await (const update of wafer.health.watch({ service: 'wafer.v1.Inference' })) {
        watch = { status: update.status };
        break;
      }
    } catch (error) {
      if (!(error instanceof WaferError)) throw error;
      watch = { error: error.codeName, details: error.details };
    }
    summary.health = { inference: health.status, server: overall.status, watch };

    // wafer.v1.Inference
    const embedded = await wafer.inference.embed({
      inputs: ['Are we still on for lunch?', 'Running late, sorry'],
      input_type: 'INPUT_TYPE_DOCUMENT',
    });
    summary.embed = {
      model: embedded.model,
      count: embedded.embeddings.length,
      dims: embedded.embeddings.map((e) => e.values.length),
      norm: norm(embedded.embeddings[0].values),
      usage: embedded.usage,
      inference_ms: embedded.timings.inference_ms,
    };

    const reranked = await wafer.inference.rerank({
      query: 'what time is the meeting?',
      documents: RERANK_DOCUMENTS,
      return_documents: true,
    });
    const scores = reranked.results.map((r) => r.score);
    summary.rerank = {
      model: reranked.model,
      top_index: reranked.results[0].index,
      top_document: reranked.results[0].document,
      sorted: scores.every((score, i) => i === 0 || scores[i - 1] >= score),
      count: reranked.results.length,
    };

    const chunks = [];
    for await (const chunk of wafer.inference.generate({
      messages: [
        { role: 'user', content: 'Count from one to twenty.' },
      ],
      max_tokens: 16,
      temperature: 0,
    })) {
      chunks.push(chunk);
    }
    const last = chunks.at(-1);
    summary.generate = {
      model: last.model,
      text: chunks.map((c) => c.text).join(''),
      chunks: chunks.length,
      finish_reason: last.finish_reason,
      unfinished_before_last: chunks.slice(0, -1).every((c) => c.finish_reason === 'FINISH_REASON_UNSPECIFIED'),
      usage: last.usage,
      time_to_first_token_ms: last.timings?.time_to_first_token_ms ?? null,
    };

    // Leaving a stream early cancels the call; the next call on the channel is unaffected.
    let early = 0;
    for await (const chunk of wafer.inference.generate({ prompt: 'Once upon a time', max_tokens: 64 })) {
      early += chunk.text.length > 0 ? 1 : 0;
      break;
    }
    summary.generate.early_break_chunks = early;

    // wafer.v1.Models
    const { models } = await wafer.models.listModels({});
    summary.list_models = Object.fromEntries(models.map((m) => [m.name, m.state]));
    const minilm = models.find((m) => m.name === 'minilm');
    summary.minilm = {
      state: minilm.state,
      tasks: minilm.tasks,
      default_for: minilm.default_for,
      dimensions: minilm.dimensions,
      load_policy: minilm.load_policy,
      memory_bytes: minilm.memory_bytes,
    };

    const before = await wafer.models.getModel({ name: ON_DEMAND_MODEL });
    const loaded = await wafer.models.loadModel({ name: ON_DEMAND_MODEL });
    const used = await wafer.inference.embed({ model: ON_DEMAND_MODEL, inputs: ['a test'] });
    const afterUse = await wafer.models.getModel({ name: ON_DEMAND_MODEL });
    const unloaded = await wafer.models.unloadModel({ name: ON_DEMAND_MODEL });
    const after = await wafer.models.getModel({ name: ON_DEMAND_MODEL });
    summary.on_demand = {
      name: ON_DEMAND_MODEL,
      load_policy: before.load_policy,
      state_before: before.state,
      load_state: loaded.state,
      load_memory_bytes: loaded.memory_bytes,
      embed_model: used.model,
      embed_dims: used.embeddings[0].values.length,
      last_used: toDate(afterUse.last_used)?.toISOString() ?? null,
      unload_state: unloaded.state,
      state_after: after.state,
      memory_bytes_after: after.memory_bytes,
      not_loaded_reason_after: after.not_loaded_reason,
    };

    // Quantize and pull, through their refusals (no side effects on the shared server): smollm2 is
    // GGUF, not ONNX; minilm's weights come from a Python package, not the Hub.
    summary.quantize_error = await expectError(() =>
      wafer.models.quantizeModel({ source_model: 'smollm2', name: 'node-smoke-int8' }),
    );
    summary.pull_error = await expectError(async () => {
      for await (const progress of wafer.models.pullModel({ name: 'minilm' })) {
        void progress;
      }
    });

    // wafer.v1.Index
    const written = await wafer.index.upsert({
      collection: COLLECTION,
      documents: DOCUMENTS.map((d) => ({ ...d, payload: toStruct(d.payload) })),
    });
    const searched = await wafer.index.search({ collection: COLLECTION, query: 'when is the meeting?', top_k: 2 });
    const filtered = await wafer.index.search({
      collection: COLLECTION,
      query: 'groceries',
      filter: toStruct({ sender: 'bob' }),
    });
    const got = await wafer.index.getDocuments({ collection: COLLECTION, ids: ['n3', 'n1', 'missing'] });
    await wafer.index.deleteDocuments({ collection: COLLECTION, ids: ['n2'] });
    const remaining = await wafer.index.getDocuments({ collection: COLLECTION, ids: ['n1', 'n2', 'n3'] });
    const { collections } = await wafer.index.listCollections({});
    const info = collections.find((c) => c.name === COLLECTION) ?? null;
    summary.index = {
      upsert_model: written.model,
      upsert_ids: written.ids,
      search_ids: searched.results.map((r) => r.document.id),
      search_top_id: searched.results[0]?.document.id ?? null,
      search_top_payload: fromStruct(searched.results[0]?.document.payload),
      search_scores: searched.results.map((r) => r.score),
      filtered_ids: filtered.results.map((r) => r.document.id),
      get_ids: got.documents.map((d) => d.document.id),
      get_payloads: Object.fromEntries(got.documents.map((d) => [d.document.id, fromStruct(d.document.payload)])),
      after_delete_ids: remaining.documents.map((d) => d.document.id),
      collection: info,
    };

    // Deliberate errors: a unary call and a stream, both naming an unknown model.
    summary.error = await expectError(() => wafer.inference.embed({ model: 'nope', inputs: ['x'] }));
    // A context (contextual models such as cde-small-v1 only) sent to a model that takes none.
    summary.context_error = await expectError(() =>
      wafer.inference.embed({ inputs: ['x'], context_documents: ['a corpus document'] }),
    );
    summary.embed.context_id = embedded.context_id;
    summary.stream_error = await expectError(async () => {
      for await (const chunk of wafer.inference.generate({ model: 'nope', prompt: 'x', max_tokens: 2 })) {
        void chunk;
      }
    });

    summary.rpcs = connection.methods.map((m) => m.method);
    summary.not_called = summary.rpcs.filter((method) => !called.has(method));
    return summary;
  } finally {
    connection.close();
  }
}

const address = process.argv[2];
if (!address) {
  console.error('usage: node smoke.mjs HOST:PORT');
  process.exit(2);
}
try {
  const summary = await main(address);
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  process.exit(0);
} catch (error) {
  console.error(`smoke test failed: ${error instanceof WaferError ? error.message : (error?.stack ?? error)}`);
  process.exit(1);
}
