// Web APIs that runtimes add to JavaScript and V8 leaves out: DOMException, atob and btoa,
// TextEncoder and TextDecoder, queueMicrotask, structuredClone. The file is one expression, the
// object of those globals, compiled in a realm the first time a request reads one of them
// (lazy.js, isolate.py). Nothing here observes time or randomness, so nothing of it goes on the
// tape.
//
// Each global is as the standard defines it (WHATWG Encoding, HTML, Web IDL), down to the
// errors: a non-enumerable property of the global object. Departures, all stated in the README:
// TextDecoder knows UTF-8, UTF-16LE/BE and windows-1252 (latin-1 and ASCII are its labels), as
// Node's build without full ICU does; structuredClone cannot tell a Proxy from its target.
(() => {
  "use strict";
  const g = globalThis;
  const exported = {};
  const define = (name, value) => { exported[name] = value; };
  const tag = (cls, name) =>
    Object.defineProperty(cls.prototype, Symbol.toStringTag, { value: name, configurable: true });
  // Decoded UTF-16 code units, made into text 8 K at a time: an array of every unit of a large
  // input would hold several times its size.
  class Sink {
    codes = [];
    text = "";
    constructor(skipBOM) { this.skipBOM = skipBOM; }
    push(code) {
      if (this.skipBOM) {
        this.skipBOM = false;
        if (code === 0xfeff) return;
      }
      this.codes.push(code);
      if (this.codes.length >= 8192) this.flush();
    }
    flush() {
      this.text += String.fromCharCode.apply(null, this.codes);
      this.codes.length = 0;
    }
    done() { this.flush(); return this.text; }
  }

  // --- DOMException (Web IDL) -------------------------------------------------------------
  // The legacy code constants, in code order (1 to 25), and the names that have a code.
  const CODE_CONSTANTS = ("INDEX_SIZE DOMSTRING_SIZE HIERARCHY_REQUEST WRONG_DOCUMENT INVALID_CHARACTER NO_DATA_ALLOWED " +
    "NO_MODIFICATION_ALLOWED NOT_FOUND NOT_SUPPORTED INUSE_ATTRIBUTE INVALID_STATE SYNTAX INVALID_MODIFICATION NAMESPACE " +
    "INVALID_ACCESS VALIDATION TYPE_MISMATCH SECURITY NETWORK ABORT URL_MISMATCH QUOTA_EXCEEDED TIMEOUT INVALID_NODE_TYPE " +
    "DATA_CLONE").split(" ");
  const CODES = {
    IndexSizeError: 1, HierarchyRequestError: 3, WrongDocumentError: 4, InvalidCharacterError: 5,
    NoModificationAllowedError: 7, NotFoundError: 8, NotSupportedError: 9, InvalidStateError: 11, SyntaxError: 12,
    InvalidModificationError: 13, NamespaceError: 14, InvalidAccessError: 15, TypeMismatchError: 17, SecurityError: 18,
    NetworkError: 19, AbortError: 20, URLMismatchError: 21, QuotaExceededError: 22, TimeoutError: 23,
    InvalidNodeTypeError: 24, DataCloneError: 25,
  };
  class DOMException extends Error {
    #name;
    #message;
    constructor(message = "", name = "Error") {
      super();  // no own message: name and message are the prototype's, as in browsers; the stack is kept
      this.#message = String(message);
      this.#name = String(name);
      // V8 heads the stack with the name alone (it reads no message getter): head it as browsers do.
      const stack = String(this.stack);
      const frames = stack.includes("\n") ? stack.slice(stack.indexOf("\n")) : "";
      const head = this.#message ? this.#name + ": " + this.#message : this.#name;
      Object.defineProperty(this, "stack", { value: head + frames, writable: true, configurable: true });
    }
    get name() { return this.#name; }
    get message() { return this.#message; }
    get code() { return Object.hasOwn(CODES, this.#name) ? CODES[this.#name] : 0; }
  }
  CODE_CONSTANTS.forEach((constant, at) => {
    for (const target of [DOMException, DOMException.prototype]) {
      Object.defineProperty(target, constant + "_ERR", { value: at + 1, enumerable: true });
    }
  });
  tag(DOMException, "DOMException");
  define("DOMException", DOMException);
  const domError = (message, name) => new DOMException(message, name);

  // --- atob / btoa (HTML, forgiving-base64) -----------------------------------------------
  define("btoa", function btoa(data) {
    if (arguments.length === 0) throw new TypeError("btoa: 1 argument required, but only 0 present.");
    const text = String(data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) {
      const code = text.charCodeAt(i);
      if (code > 0xff) throw domError("The string to be encoded contains characters outside of the Latin1 range.", "InvalidCharacterError");
      bytes[i] = code;
    }
    return bytes.toBase64();
  });
  define("atob", function atob(data) {
    if (arguments.length === 0) throw new TypeError("atob: 1 argument required, but only 0 present.");
    let text = String(data).replace(/[\t\n\f\r ]/g, "");
    if (text.length % 4 === 0) text = text.replace(/==?$/, "");
    if (text.length % 4 === 1 || /[^A-Za-z0-9+/]/.test(text)) {
      throw domError("The string to be decoded is not correctly encoded.", "InvalidCharacterError");
    }
    // Checked as the standard says above; V8's decoder does the rest ("loose": the last chunk
    // may be short, and its leftover bits are discarded, as the standard says).
    const bytes = Uint8Array.fromBase64(text, { lastChunkHandling: "loose" });
    let out = "";
    for (let i = 0; i < bytes.length; i += 8192) out += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
    return out;
  });

  // --- TextEncoder / TextDecoder (WHATWG Encoding) ----------------------------------------
  class TextEncoder {
    get encoding() { return "utf-8"; }
    encode(input = "") {
      const text = String(input);
      // Short text into the most it can take, then cut; long text measured first, so that
      // the bytes are never held twice over (they count against the memory limit).
      if (text.length <= 65536) {
        const out = new Uint8Array(text.length * 3);
        return out.slice(0, encodeInto(text, out).written);
      }
      const out = new Uint8Array(utf8Length(text));
      encodeInto(text, out);
      return out;
    }
    encodeInto(source, destination) {
      if (!(destination instanceof Uint8Array)) throw new TypeError("TextEncoder.encodeInto: destination must be a Uint8Array");
      return encodeInto(String(source), destination);
    }
  }
  function utf8Length(text) {
    let length = 0;
    for (let i = 0; i < text.length; i++) {
      const code = text.charCodeAt(i);
      if (code < 0x80) length += 1;
      else if (code < 0x800) length += 2;
      else if (code >= 0xd800 && code <= 0xdbff && i + 1 < text.length && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
        length += 4;
        i++;
      } else length += 3;  // a lone surrogate is U+FFFD, three bytes
    }
    return length;
  }
  // UTF-8 of text into out as far as whole characters fit; a lone surrogate is U+FFFD.
  function encodeInto(text, out) {
    let read = 0;
    let written = 0;
    const n = text.length;
    const room = out.length;
    while (read < n) {
      let code = text.charCodeAt(read);
      let units = 1;
      if (code >= 0xd800 && code <= 0xdfff) {
        const next = read + 1 < n ? text.charCodeAt(read + 1) : 0;
        if (code <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) {
          code = 0x10000 + ((code - 0xd800) << 10) + (next - 0xdc00);
          units = 2;
        } else {
          code = 0xfffd;
        }
      }
      const size = code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
      if (written + size > room) break;
      if (size === 1) {
        out[written++] = code;
      } else if (size === 2) {
        out[written++] = 0xc0 | (code >> 6);
        out[written++] = 0x80 | (code & 0x3f);
      } else if (size === 3) {
        out[written++] = 0xe0 | (code >> 12);
        out[written++] = 0x80 | ((code >> 6) & 0x3f);
        out[written++] = 0x80 | (code & 0x3f);
      } else {
        out[written++] = 0xf0 | (code >> 18);
        out[written++] = 0x80 | ((code >> 12) & 0x3f);
        out[written++] = 0x80 | ((code >> 6) & 0x3f);
        out[written++] = 0x80 | (code & 0x3f);
      }
      read += units;
    }
    return { read, written };
  }
  tag(TextEncoder, "TextEncoder");

  const LABELS = new Map();
  for (const [encoding, labels] of [
    ["utf-8", "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8"],
    ["utf-16le", "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le"],
    ["utf-16be", "unicodefffe utf-16be"],
    ["windows-1252", "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 " +
      "iso88591 iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252"],
  ]) {
    for (const label of labels.split(" ")) LABELS.set(label, encoding);
  }
  // windows-1252's bytes 0x80-0x9F; the rest of its bytes are their own code points.
  const CP1252 = [0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039, 0x152,
    0x8d, 0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x2dc, 0x2122, 0x161, 0x203a,
    0x153, 0x9d, 0x17e, 0x178];
  const bytesOf = (input) => {
    if (input === undefined) return new Uint8Array(0);
    if (ArrayBuffer.isView(input)) return new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
    if (input instanceof ArrayBuffer) return new Uint8Array(input);
    throw new TypeError("TextDecoder.decode: input must be an ArrayBuffer or an ArrayBufferView");
  };

  class TextDecoder {
    #encoding;
    #fatal;
    #ignoreBOM;
    #pending = [];   // bytes of an unfinished character, kept across decode(..., {stream: true})
    #bomSeen = false;
    constructor(label = "utf-8", options = {}) {
      const encoding = LABELS.get(String(label).trim().toLowerCase());
      if (encoding === undefined) throw new RangeError("TextDecoder: the encoding '" + label + "' is not supported (Flux knows UTF-8, UTF-16LE/BE and windows-1252)");
      this.#encoding = encoding;
      this.#fatal = Boolean(options?.fatal);
      this.#ignoreBOM = Boolean(options?.ignoreBOM);
    }
    get encoding() { return this.#encoding; }
    get fatal() { return this.#fatal; }
    get ignoreBOM() { return this.#ignoreBOM; }
    decode(input, options = {}) {
      const stream = Boolean(options?.stream);
      const view = bytesOf(input);
      let bytes = view;
      if (this.#pending.length) {  // the unfinished character's bytes first, without spreading the input
        bytes = new Uint8Array(this.#pending.length + view.length);
        bytes.set(this.#pending);
        bytes.set(view, this.#pending.length);
      }
      this.#pending = [];
      // A BOM is dropped at the start of a stream only (windows-1252 has none).
      const codes = new Sink(!this.#ignoreBOM && !this.#bomSeen && this.#encoding !== "windows-1252");
      const fail = () => {
        if (this.#fatal) {
          this.#bomSeen = false;
          throw new TypeError("TextDecoder: the " + this.#encoding + " data is invalid");
        }
        codes.push(0xfffd);
      };
      let rest;
      if (this.#encoding === "utf-8") rest = decodeUtf8(bytes, codes, fail, stream);
      else if (this.#encoding === "windows-1252") rest = decodeCp1252(bytes, codes);
      else rest = decodeUtf16(bytes, codes, fail, stream, this.#encoding === "utf-16be");
      this.#pending = Array.from(rest);
      if (!codes.skipBOM) this.#bomSeen = true;  // the stream's first character was read
      if (!stream) this.#bomSeen = false;
      return codes.done();
    }
  }
  tag(TextDecoder, "TextDecoder");

  const pushCodePoint = (codes, cp) => {
    if (cp < 0x10000) {
      codes.push(cp);
    } else {
      codes.push(0xd800 + ((cp - 0x10000) >> 10));
      codes.push(0xdc00 + ((cp - 0x10000) & 0x3ff));
    }
  };
  // The standard's UTF-8 decoder: a byte that cannot continue a sequence ends it as one U+FFFD
  // and is read again. Returns the bytes of an unfinished last character when streaming.
  function decodeUtf8(bytes, codes, fail, stream) {
    let i = 0;
    const n = bytes.length;
    while (i < n) {
      const first = bytes[i];
      if (first < 0x80) { codes.push(first); i++; continue; }
      let needed, cp, lower = 0x80, upper = 0xbf;
      if (first >= 0xc2 && first <= 0xdf) { needed = 1; cp = first & 0x1f; }
      else if (first >= 0xe0 && first <= 0xef) {
        needed = 2; cp = first & 0xf;
        if (first === 0xe0) lower = 0xa0;
        if (first === 0xed) upper = 0x9f;
      } else if (first >= 0xf0 && first <= 0xf4) {
        needed = 3; cp = first & 0x7;
        if (first === 0xf0) lower = 0x90;
        if (first === 0xf4) upper = 0x8f;
      } else { fail(); i++; continue; }
      let j = i + 1;
      let ok = true;
      for (let k = 0; k < needed; k++, j++) {
        if (j >= n) {
          if (stream) return bytes.subarray(i);
          ok = false;
          break;
        }
        const b = bytes[j];
        if (b < lower || b > upper) { ok = false; break; }
        lower = 0x80; upper = 0xbf;
        cp = (cp << 6) | (b & 0x3f);
      }
      if (!ok) { fail(); i = j; continue; }
      pushCodePoint(codes, cp);
      i = j;
    }
    return bytes.subarray(n);
  }
  function decodeCp1252(bytes, codes) {
    for (const b of bytes) codes.push(b >= 0x80 && b <= 0x9f ? CP1252[b - 0x80] : b);
    return bytes.subarray(bytes.length);
  }
  function decodeUtf16(bytes, codes, fail, stream, bigEndian) {
    const n = bytes.length;
    let i = 0;
    while (i + 1 < n) {
      const unit = bigEndian ? (bytes[i] << 8) | bytes[i + 1] : bytes[i] | (bytes[i + 1] << 8);
      if (unit >= 0xd800 && unit <= 0xdbff) {
        if (i + 3 >= n) {  // the input ends inside a pair: one error for what is left, as the standard's end of queue
          if (stream) return bytes.subarray(i);
          fail();
          return bytes.subarray(n);
        }
        const next = bigEndian ? (bytes[i + 2] << 8) | bytes[i + 3] : bytes[i + 2] | (bytes[i + 3] << 8);
        if (next >= 0xdc00 && next <= 0xdfff) { codes.push(unit); codes.push(next); i += 4; }
        else { fail(); i += 2; }
      } else if (unit >= 0xdc00 && unit <= 0xdfff) { fail(); i += 2; }
      else { codes.push(unit); i += 2; }
    }
    if (i < n) {
      if (stream) return bytes.subarray(i);
      fail();
    }
    return bytes.subarray(n);
  }
  define("TextEncoder", TextEncoder);
  define("TextDecoder", TextDecoder);

  // --- queueMicrotask (HTML) --------------------------------------------------------------
  define("queueMicrotask", function queueMicrotask(callback) {
    if (typeof callback !== "function") throw new TypeError("queueMicrotask: the callback is not a function");
    Promise.resolve().then(() => {
      try {
        callback();
      } catch (error) {
        // A browser reports it as uncaught and goes on; here it becomes an error event of the
        // function's span, through the console the prelude defines.
        g.console?.error?.("Uncaught (in queueMicrotask)", error);
      }
    });
  });

  // --- structuredClone (HTML's structured serialize and deserialize, in one pass) ---------
  const getter = (proto, name) => Object.getOwnPropertyDescriptor(proto, name).get;
  const brands = {
    date: Date.prototype.getTime,
    regexpSource: getter(RegExp.prototype, "source"),
    mapSize: getter(Map.prototype, "size"),
    setSize: getter(Set.prototype, "size"),
    bufferLength: getter(ArrayBuffer.prototype, "byteLength"),
    bufferResizable: getter(ArrayBuffer.prototype, "resizable"),
    bufferDetached: getter(ArrayBuffer.prototype, "detached"),
    typedArrayName: getter(Object.getPrototypeOf(Uint8Array.prototype), Symbol.toStringTag),
    dataViewLength: getter(DataView.prototype, "byteLength"),
    weakMapHas: WeakMap.prototype.has,
    weakSetHas: WeakSet.prototype.has,
  };
  const is = (check, value, ...args) => {
    try { check.call(value, ...args); return true; } catch { return false; }
  };
  const ERROR_TYPES = { Error, EvalError, RangeError, ReferenceError, SyntaxError, TypeError, URIError };
  const PRIMITIVE_WRAPPERS = [
    [Boolean, Boolean.prototype.valueOf], [Number, Number.prototype.valueOf], [String, String.prototype.valueOf],
    [BigInt, BigInt.prototype.valueOf],
  ];
  const uncloneable = (value) => domError(describe(value) + " could not be cloned.", "DataCloneError");
  const describe = (value) => {
    if (typeof value === "function") return Function.prototype.toString.call(value).slice(0, 60);
    if (typeof value === "symbol") return value.toString();
    return Object.prototype.toString.call(value).replace(/^\[object (.*)\]$/, "#<$1>");
  };

  function clone(value, memory) {
    const type = typeof value;
    if (value === null || (type !== "object" && type !== "function" && type !== "symbol")) return value;
    if (type !== "object") throw uncloneable(value);
    if (memory.has(value)) return memory.get(value);
    let copy;
    const keep = (made) => { memory.set(value, made); return made; };
    for (const [Wrapper, valueOf] of PRIMITIVE_WRAPPERS) {
      if (is(valueOf, value)) return keep(Object(valueOf.call(value)));
    }
    if (is(brands.date, value)) return keep(new Date(brands.date.call(value)));
    if (is(brands.regexpSource, value) && value instanceof RegExp) return keep(new RegExp(brands.regexpSource.call(value), value.flags));
    if (is(brands.bufferLength, value)) {
      if (brands.bufferDetached.call(value)) throw domError("An ArrayBuffer is detached and could not be cloned.", "DataCloneError");
      const resizable = brands.bufferResizable.call(value);
      const made = resizable ? new ArrayBuffer(value.byteLength, { maxByteLength: value.maxByteLength }) : new ArrayBuffer(value.byteLength);
      new Uint8Array(made).set(new Uint8Array(value));
      return keep(made);
    }
    if (ArrayBuffer.isView(value)) {
      const name = brands.typedArrayName.call(value);
      const buffer = clone(value.buffer, memory);
      if (name === undefined) return keep(new DataView(buffer, value.byteOffset, brands.dataViewLength.call(value)));
      return keep(new g[name](buffer, value.byteOffset, value.length));
    }
    if (is(brands.mapSize, value)) {
      copy = keep(new Map());
      for (const [k, v] of Array.from(Map.prototype.entries.call(value))) copy.set(clone(k, memory), clone(v, memory));
      return copy;
    }
    if (is(brands.setSize, value)) {
      copy = keep(new Set());
      for (const v of Array.from(Set.prototype.values.call(value))) copy.add(clone(v, memory));
      return copy;
    }
    if (Error.isError(value)) {
      const nameOf = value.name;
      const Type = Object.hasOwn(ERROR_TYPES, nameOf) ? ERROR_TYPES[nameOf] : Error;
      const message = Object.getOwnPropertyDescriptor(value, "message");
      copy = keep(message && "value" in message ? new Type(String(message.value)) : new Type());
      if (typeof value.stack === "string") Object.defineProperty(copy, "stack", { value: value.stack, writable: true, configurable: true });
      if (Object.hasOwn(value, "cause")) Object.defineProperty(copy, "cause", { value: clone(value.cause, memory), writable: true, configurable: true });
      return copy;
    }
    if (is(brands.weakMapHas, value, {}) || is(brands.weakSetHas, value, {}) || value instanceof Promise) throw uncloneable(value);
    copy = keep(Array.isArray(value) ? new Array(value.length) : {});
    for (const key of Object.keys(value)) {  // defined, not assigned: an own "__proto__" stays a property
      Object.defineProperty(copy, key, { value: clone(value[key], memory), writable: true, enumerable: true, configurable: true });
    }
    return copy;
  }

  define("structuredClone", function structuredClone(value, options = undefined) {
    if (arguments.length === 0) throw new TypeError("structuredClone: 1 argument required, but only 0 present.");
    const transfer = options?.transfer === undefined ? [] : Array.from(options.transfer);
    const memory = new Map();
    for (const buffer of transfer) {
      if (!is(brands.bufferLength, buffer)) throw domError(describe(buffer) + " is not transferable.", "DataCloneError");
      if (memory.has(buffer)) throw domError("An ArrayBuffer is listed twice in the transfer list.", "DataCloneError");
      if (brands.bufferDetached.call(buffer)) throw domError("An ArrayBuffer in the transfer list is detached.", "DataCloneError");
      memory.set(buffer, clone(buffer, new Map()));
    }
    const copy = clone(value, memory);
    for (const buffer of transfer) buffer.transfer();  // detached, as a transfer leaves the original
    return copy;
  });
  return exported;
})();
