// together-ai (npm): `new Together({ baseURL: 'http://proxy/v1' })`; its files.upload reads
// TOGETHER_API_BASE_URL instead (set it to the same URL).
'use strict';
const fs = require('node:fs');
const { run, usage } = require('./common.cjs');
const TogetherModule = require('together-ai');
const Together = TogetherModule.default ?? TogetherModule;
const version = require('together-ai/version').VERSION;

const client = (ctx) => new Together(ctx.options());

const lines = {
  async chat(ctx) {
    const r = await client(ctx).chat.completions.create({
      model: ctx.data.chat_model, messages: ctx.messages(), max_tokens: 5,
    });
    return { id: r.id, content: r.choices[0].message.content, usage: usage(r.usage) };
  },
  async chat_stream(ctx) {
    const stream = await client(ctx).chat.completions.create({
      model: ctx.data.chat_model, messages: ctx.messages(), max_tokens: 6, stream: true,
    });
    let content = '';
    let chunks = 0;
    let last = null;
    for await (const c of stream) {
      chunks += 1;
      content += c.choices?.[0]?.delta?.content ?? '';
      if (c.usage) last = c.usage;
    }
    return { content, chunks, usage: usage(last) };
  },
  async completions(ctx) {
    const r = await client(ctx).completions.create({ model: ctx.data.language_model, prompt: ctx.marker(), max_tokens: 4 });
    return { id: r.id, text: r.choices[0].text, usage: usage(r.usage) };
  },
  async embeddings(ctx) {
    const r = await client(ctx).embeddings.create({ model: ctx.data.embedding_model, input: [ctx.marker(), 'a second input'] });
    return { count: r.data.length, dims: r.data[0].embedding.length };
  },
  async rerank(ctx) {
    const r = await client(ctx).rerank.create({
      model: ctx.data.rerank_model, query: ctx.marker(), documents: ctx.data.documents, top_n: 2,
    });
    return { results: r.results.map((x) => [x.index, x.relevance_score]), usage: usage(r.usage) };
  },
  async images(ctx) {
    const r = await client(ctx).images.generate({
      model: ctx.data.image_model, prompt: ctx.marker(), width: 512, height: 512, steps: 4, n: 1,
    });
    return { count: r.data.length, has_image: Boolean(r.data[0]?.url || r.data[0]?.b64_json) };
  },
  async audio_speech(ctx) {
    const r = await client(ctx).audio.speech.create({
      model: ctx.data.speech_model, input: ctx.marker(), voice: ctx.data.voice, response_format: 'wav',
    });
    return { bytes: (await r.arrayBuffer()).byteLength };
  },
  async audio_transcription(ctx) {
    const r = await client(ctx).audio.transcriptions.create({
      file: fs.createReadStream(ctx.data.audio_path), model: ctx.data.transcription_model,
    });
    return { text: r.text };
  },
  async files_upload(ctx) {
    const r = await client(ctx).files.upload(ctx.data.upload_path, 'batch-api', false);
    return { id: r.id, purpose: r.purpose, bytes: r.bytes };
  },
  // the same upload with the documented work-around (README): the SDK's PUT sends a stream body
  // without `duplex: 'half'`, which Node's fetch refuses; a fetch that adds it lets it through
  async files_upload_duplex(ctx) {
    const plain = globalThis.fetch;
    globalThis.fetch = (url, init) =>
      plain(url, init?.body && typeof init.body.pipe === 'function' ? { ...init, duplex: 'half' } : init);
    try {
      return await lines.files_upload(ctx);
    } finally {
      globalThis.fetch = plain;
    }
  },
  async batches_create(ctx) {
    const r = await client(ctx).batches.create({
      input_file_id: ctx.data.batch_file_id, endpoint: '/v1/chat/completions', completion_window: '24h',
    });
    ctx.state.batchId = r.job.id;
    return { id: r.job.id, status: r.job.status, input_file_id: r.job.input_file_id };
  },
  async batches_retrieve(ctx) {
    const r = await client(ctx).batches.retrieve(ctx.batchId);
    return { id: r.id, status: r.status };
  },
  async batches_list(ctx) {
    const r = await client(ctx).batches.list();
    return { ids: r.map((b) => b.id) };
  },
  async batches_cancel(ctx) {
    const r = await client(ctx).batches.cancel(ctx.batchId);
    return { id: r.id, status: r.status };
  },
  async models_list(ctx) {
    const r = await client(ctx).models.list();
    const ids = r.map((m) => m.id);
    return { count: ids.length, has_chat_model: ids.includes(ctx.data.chat_model) };
  },
  async videos(ctx) {
    const r = await client(ctx).videos.create({ model: ctx.data.video_model, prompt: ctx.marker() });
    return { id: r.id, status: r.status ?? null };
  },
};

run('together-ai', version, lines).catch((err) => {
  process.stderr.write(String(err?.stack ?? err) + '\n');
  process.exit(1);
});
