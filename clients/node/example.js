// Calls epochlens from Node.js with the standard gRPC packages (@grpc/grpc-js,
// @grpc/proto-loader): creates a run, writes two predictions, lists them back.
//
//   EPOCHLENS_TOKEN=<JWT> node example.js [--contracts=proto|descriptors]
//
// --contracts=proto (default) loads the .proto files from protos/ with the
// include path google-proto-files provides (google/rpc/status.proto lives there);
// --contracts=descriptors loads protos/epochlens.binpb, the self-contained
// FileDescriptorSet that `make descriptors` builds, and needs no include path.
// Settings: EPOCHLENS_WRITER_ADDRESS (default localhost:50051),
// EPOCHLENS_QUERY_ADDRESS (default localhost:50052), EPOCHLENS_TOKEN (required),
// EPOCHLENS_RUN_NAME (default node-example), EPOCHLENS_PROTOS_DIR (default ../../protos).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const googleProtoFiles = require('google-proto-files');

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

function loadContracts(mode, protosDir) {
  if (mode === 'descriptors') {
    const buffer = fs.readFileSync(path.join(protosDir, 'epochlens.binpb'));
    return protoLoader.loadFileDescriptorSetFromBuffer(buffer, LOADER_OPTIONS);
  }
  if (mode !== 'proto') {
    throw new Error(`--contracts must be proto or descriptors, not ${mode}`);
  }
  const includeDirs = [protosDir, googleProtoFiles.getProtoPath('..')];
  return protoLoader.loadSync(['epochlens/v1/writer.proto', 'epochlens/v1/query.proto'],
    { ...LOADER_OPTIONS, includeDirs });
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function main() {
  const arg = process.argv.find((a) => a.startsWith('--contracts='));
  const mode = arg ? arg.split('=')[1] : 'proto';
  const token = process.env.EPOCHLENS_TOKEN;
  if (!token) {
    throw new Error('EPOCHLENS_TOKEN is not set (a JWT whose sub is your user id)');
  }
  const protosDir = process.env.EPOCHLENS_PROTOS_DIR || path.join(__dirname, '..', '..', 'protos');
  const v1 = grpc.loadPackageDefinition(loadContracts(mode, protosDir)).epochlens.v1;
  const credentials = grpc.credentials.createInsecure();
  const writer = new v1.PredictionWriterService(
    process.env.EPOCHLENS_WRITER_ADDRESS || 'localhost:50051', credentials);
  const query = new v1.QueryService(process.env.EPOCHLENS_QUERY_ADDRESS || 'localhost:50052', credentials);
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);

  const run = await call(writer, 'CreateRun', {
    name: process.env.EPOCHLENS_RUN_NAME || 'node-example', model_name: 'tiny-llama',
  }, metadata);
  console.log(`created run ${run.id} state ${run.state}`);
  const written = await call(writer, 'WritePredictions', {
    run_id: run.id,
    predictions: [
      { epoch: 1, step: 10, sample_index: 0, prompt: '2+2', ground_truth: '4', prediction: '4' },
      { epoch: 1, step: 10, sample_index: 1, prompt: '3+3', ground_truth: '6', prediction: '7' },
    ],
  }, metadata);
  console.log(`wrote inserted=${written.inserted_count} duplicates=${written.duplicate_count}`);
  const listed = await call(query, 'ListPredictions', { run_id: run.id, page_size: 10 }, metadata);
  for (const p of listed.predictions) {
    console.log(`epoch ${p.epoch} step ${p.step} sample ${p.sample_index}: ${p.prompt} -> ${p.prediction}`);
  }
  writer.close();
  query.close();
}

main().catch((error) => {
  console.error(`epochlens example failed: ${error.code !== undefined ? `code ${error.code}: ` : ''}${error.message}`);
  process.exit(1);
});
