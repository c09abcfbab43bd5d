// The runner every Node SDK driver shares: the same spec and the same one-JSON-line-per-line
// output as tests/sdk/drivers/common.py. The SDKs are required from NODE_PATH (the cache's
// node_modules, made by tests/sdk/envs.py with `npm ci`).
'use strict';
const fs = require('node:fs');

const TIMEOUT_MS = 20000; // each SDK call, with no retry

class Context {
  constructor(spec) {
    this.spec = spec;
    this.baseURL = spec.base_url;
    this.apiKey = spec.api_key;
    this.label = spec.label;
    this.data = spec.data;
    this.state = {};
    this.line = '';
  }
  headers() {
    return { 'X-Meter-Feature': this.line, 'X-Meter-Environment': this.label };
  }
  marker() {
    return `matrix ${this.label} ${this.line}`;
  }
  messages() {
    return [{ role: 'user', content: `${this.marker()}: how much did this cost?` }];
  }
  options() {
    const base = this.baseURL === null ? {} : { baseURL: this.baseURL };
    return { apiKey: this.apiKey, maxRetries: 0, timeout: TIMEOUT_MS, defaultHeaders: this.headers(), ...base };
  }
  get batchId() {
    if (!this.state.batchId) throw new Error('no batch: batches_create did not succeed');
    return this.state.batchId;
  }
}

function describe(err) {
  const status = typeof err?.status === 'number' ? err.status : null;
  let message = err?.message ?? (typeof err === 'object' ? JSON.stringify(err) : String(err));
  if (status === null && err?.stack) message += ' | ' + err.stack.split('\n').slice(0, 4).join(' / ');
  return { type: err?.constructor?.name ?? typeof err, status, message: String(message).slice(0, 1500) };
}

async function run(sdk, version, lines) {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const ctx = new Context(spec);
  for (const line of spec.lines) {
    ctx.line = line;
    const started = Date.now();
    const out = { line };
    try {
      const impl = lines[line];
      if (!impl) throw Object.assign(new Error(`${sdk} has no call for ${line}`), { name: 'NotApplicable' });
      out.ok = true;
      out.fields = await impl(ctx);
    } catch (err) {
      out.ok = false;
      delete out.fields;
      out.error = describe(err);
    }
    out.seconds = (Date.now() - started) / 1000;
    process.stdout.write(JSON.stringify(out) + '\n');
  }
  process.stdout.write(JSON.stringify({ line: '_done', sdk, version, node: process.version }) + '\n');
}

function usage(u) {
  return u ? [u.prompt_tokens, u.completion_tokens] : null;
}

module.exports = { Context, run, usage };
