// Reference client outside Python: trains an edgetune bundle's adapter with stock onnxruntime-node.
//
//   node client.mjs --bundle B --init adapter.safetensors --batches batches.json --steps 10 --lr 1e-3 \
//                   --out trained.safetensors [--losses losses.json]
//
// The bundle's portable gradient graph (edgetune.json "portable") takes the batch (input_ids,
// attention_mask, labels and, when the manifest's inputs list it, position_ids: int64 (B, T)) and every trainable tensor (by graph_name) as inputs and
// returns `loss` and one `<graph_name>_grad` per trainable tensor. This client runs it, applies
// AdamW as torch.optim.AdamW does (the manifest's "optimizer": betas, eps, weight_decay), and
// writes the trained tensors as safetensors (graph names), which `edgetune` can pack as a delta.
// batches.json: [{"input_ids": [[...]], "attention_mask": [[...]], "labels": [[...]]}, ...] (e.g. from
// the data edgetune tokenized); the steps cycle through them.
import fs from "node:fs";
import path from "node:path";
import ort from "onnxruntime-node";

function args() {
  const a = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) a[argv[i].replace(/^--/, "")] = argv[i + 1];
  for (const k of ["bundle", "init", "batches", "out"]) if (!a[k]) throw new Error(`--${k} is required`);
  return { ...a, steps: Number(a.steps ?? 10), lr: Number(a.lr ?? 1e-3) };
}

// safetensors: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, data.
export function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
  const out = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (info.dtype !== "F32") throw new Error(`${file}: ${name} is ${info.dtype}; only F32 is read`);
    const [start, end] = info.data_offsets;
    const bytes = buf.subarray(8 + n + start, 8 + n + end);
    out[name] = { shape: info.shape, data: new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length)) };
  }
  return out;
}

export function writeSafetensors(file, tensors) {
  const header = {};
  let offset = 0;
  const names = Object.keys(tensors).sort();
  for (const name of names) {
    const bytes = tensors[name].data.length * 4;
    header[name] = { dtype: "F32", shape: tensors[name].shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), "utf8");
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]); // pad to 8 bytes with spaces
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const data = names.map((n) => Buffer.from(tensors[n].data.buffer, tensors[n].data.byteOffset, tensors[n].data.byteLength));
  fs.writeFileSync(file, Buffer.concat([len, json, ...data]));
}

// torch.optim.AdamW: p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)   (float64 scalars, float32 tensors)
class AdamW {
  constructor({ betas, eps, weight_decay }, tensors) {
    [this.b1, this.b2] = betas;
    this.eps = eps;
    this.wd = weight_decay;
    this.t = 0;
    this.m = {};
    this.v = {};
    for (const [k, x] of Object.entries(tensors)) {
      this.m[k] = new Float32Array(x.data.length);
      this.v[k] = new Float32Array(x.data.length);
    }
  }
  step(tensors, grads, lr) {
    this.t += 1;
    const c1 = 1 - this.b1 ** this.t, c2 = 1 - this.b2 ** this.t;
    for (const [k, x] of Object.entries(tensors)) {
      const p = x.data, g = grads[k], m = this.m[k], v = this.v[k];
      for (let i = 0; i < p.length; i++) {
        p[i] = p[i] * (1 - lr * this.wd);
        m[i] = this.b1 * m[i] + (1 - this.b1) * g[i];
        v[i] = this.b2 * v[i] + (1 - this.b2) * g[i] * g[i];
        p[i] = p[i] - (lr * (m[i] / c1)) / (Math.sqrt(v[i] / c2) + this.eps);
      }
    }
  }
}

function int64Tensor(rows) {
  const flat = rows.flat();
  return new ort.Tensor("int64", BigInt64Array.from(flat.map((x) => BigInt(x))), [rows.length, rows[0].length]);
}

async function main() {
  const a = args();
  const manifest = JSON.parse(fs.readFileSync(path.join(a.bundle, "edgetune.json"), "utf8"));
  if (!manifest.portable || !manifest.portable.supported) throw new Error(`${a.bundle}: the bundle has no portable gradient graph; re-export it`);
  const session = await ort.InferenceSession.create(path.join(a.bundle, manifest.portable.file), { intraOpNumThreads: 1 });
  const init = readSafetensors(a.init);
  const tensors = {};
  for (const t of manifest.trainable) {
    if (!init[t.graph_name]) throw new Error(`${a.init}: no tensor ${t.graph_name}`);
    tensors[t.graph_name] = init[t.graph_name];
  }
  const batches = JSON.parse(fs.readFileSync(a.batches, "utf8"));
  const optimizer = new AdamW(manifest.optimizer, tensors);
  const losses = [];
  for (let step = 0; step < a.steps; step++) {
    const b = batches[step % batches.length];
    const feeds = { input_ids: int64Tensor(b.input_ids), attention_mask: int64Tensor(b.attention_mask), labels: int64Tensor(b.labels) };
    // Bundles that take packed rows also list position_ids (manifest "inputs"): 0..T-1 per row unless given.
    if (manifest.inputs.some((i) => i.name === "position_ids"))
      feeds.position_ids = int64Tensor(b.position_ids ?? b.input_ids.map((row) => row.map((_, t) => t)));
    for (const [k, x] of Object.entries(tensors)) feeds[k] = new ort.Tensor("float32", Float32Array.from(x.data), x.shape);
    const out = await session.run(feeds);
    const grads = {};
    for (const [k, name] of Object.entries(manifest.portable.gradients)) grads[k] = out[name].data;
    losses.push(Number(out[manifest.portable.loss ?? "loss"].data[0]));
    optimizer.step(tensors, grads, a.lr);
  }
  writeSafetensors(a.out, tensors);
  if (a.losses) fs.writeFileSync(a.losses, JSON.stringify(losses));
  console.log(JSON.stringify({ steps: a.steps, first_loss: losses[0], last_loss: losses[losses.length - 1] }));
}

main().catch((e) => { console.error(`error: ${e.message}`); process.exit(2); });
