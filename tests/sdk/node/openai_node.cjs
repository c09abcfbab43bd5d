// openai (npm): `new OpenAI({ baseURL: 'http://proxy/v1' })`. No rerank and no videos: the
// OpenAI SDK has no call for together's.
'use strict';
const fs = require('node:fs');
const { run, usage } = require('./common.cjs');
const OpenAIModule = require('openai');
const OpenAI = OpenAIModule.default ?? OpenAIModule.OpenAI ?? OpenAIModule;
const version = require('openai/version').VERSION;

const client = (ctx) => new OpenAI(ctx.options());

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
  async images(ctx) {
    const r = await client(ctx).images.generate({ model: ctx.data.image_model, prompt: ctx.marker(), n: 1, size: '512x512' });
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
    const r = await client(ctx).files.create({ file: fs.createReadStream(ctx.data.upload_path), purpose: 'batch' });
    return { id: r.id, purpose: r.purpose, bytes: r.bytes };
  },
  async batches_create(ctx) {
    const r = await client(ctx).batches.create({
      input_file_id: ctx.data.batch_file_id, endpoint: '/v1/chat/completions', completion_window: '24h',
    });
    ctx.state.batchId = r.id;
    return { id: r.id, status: r.status, input_file_id: r.input_file_id };
  },
  async batches_retrieve(ctx) {
    const r = await client(ctx).batches.retrieve(ctx.batchId);
    return { id: r.id, status: r.status };
  },
  async batches_list(ctx) {
    const ids = [];
    for await (const b of client(ctx).batches.list()) ids.push(b.id);
    return { ids };
  },
  async batches_cancel(ctx) {
    const r = await client(ctx).batches.cancel(ctx.batchId);
    return { id: r.id, status: r.status };
  },
  async models_list(ctx) {
    const ids = [];
    for await (const m of client(ctx).models.list()) ids.push(m.id);
    return { count: ids.length, has_chat_model: ids.includes(ctx.data.chat_model) };
  },
};

run('openai', version, lines).catch((err) => {
  process.stderr.write(String(err?.stack ?? err) + '\n');
  process.exit(1);
});
