// Regenerates cases.json, Node's own answers for tests/runtime/test_webapi.py:
//   node tests/data/webapi/generate.js > tests/data/webapi/cases.json
// Inputs are random (a fixed seed) and biased towards the bytes and characters where decoders
// and base64 differ: UTF-8 lead and continuation bounds, surrogates, BOMs, padding, whitespace.
// windows-1252 is left out: Node's "latin1" decodes as ISO-8859-1, which the standard does not.
"use strict";
let seed = 20261207;
const rnd = (n) => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n; };
const BYTES = [0x00, 0x41, 0x7f, 0x80, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xa0, 0xed, 0x9f, 0xef, 0xf0, 0x90,
  0xf4, 0x8f, 0xf5, 0xff, 0xfe, 0xbb, 0xd8, 0xdc, 0x3d];
const decode = [];
for (let i = 0; i < 300; i++) {
  const length = rnd(12);
  const bytes = Array.from({ length }, () => (rnd(3) ? BYTES[rnd(BYTES.length)] : rnd(256)));
  for (const encoding of ["utf-8", "utf-16le", "utf-16be"]) {
    const split = rnd(length + 1);
    const streaming = new TextDecoder(encoding);
    const streamed = streaming.decode(Uint8Array.from(bytes.slice(0, split)), { stream: true }) +
      streaming.decode(Uint8Array.from(bytes.slice(split)));
    let fatal;
    try { fatal = new TextDecoder(encoding, { fatal: true }).decode(Uint8Array.from(bytes)); } catch (e) { fatal = null; }
    decode.push({ encoding, bytes, split, whole: new TextDecoder(encoding).decode(Uint8Array.from(bytes)), streamed, fatal,
      ignoreBOM: new TextDecoder(encoding, { ignoreBOM: true }).decode(Uint8Array.from(bytes)) });
  }
}
const ALPHABET = "AB+/=az09 \t\n\f\r=-_.";
const atob_ = [];
for (let i = 0; i < 500; i++) {
  const input = Array.from({ length: rnd(10) }, () => ALPHABET[rnd(ALPHABET.length)]).join("");
  let output = null;
  try { output = atob(input); } catch (e) { /* InvalidCharacterError: null */ }
  atob_.push({ input, output });
}
const text = [];
for (let i = 0; i < 200; i++) {
  const input = Array.from({ length: rnd(8) }, () => String.fromCharCode(rnd(4) ? rnd(256) : rnd(0x10000))).join("");
  let base64 = null;
  try { base64 = btoa(input); } catch (e) { /* outside latin-1: null */ }
  const out = new Uint8Array(rnd(12));
  const into = new TextEncoder().encodeInto(input, out);
  text.push({ input, base64, utf8: Array.from(new TextEncoder().encode(input)), room: out.length, into, intoBytes: Array.from(out) });
}
process.stdout.write(JSON.stringify({ node: process.version, decode, atob: atob_, text }) + "\n");
