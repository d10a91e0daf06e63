// Flux runtime prelude: evaluated once in every request's fresh context (a realm, or a whole new
// isolate; see isolate.py), before the function's own code.
//
// It owns the JS half of the host bridge and of the recording. JS never calls Python: ctx calls
// push [callId, op, args, parentSpanId, seq, callsite] onto an outbox and return a Promise;
// the host drains the outbox ("drain"), runs the calls, and settles them ("settle"). Every eval
// is cancelable, so a spinning function can always be stopped.
//
// The script's value is the bridge, `bridge(op, input)`, and nothing of it is left on the global
// object: a function that could call it could settle its own calls with forged results, off the
// tape. The host keeps the bridge where the function's code cannot name it (isolate.py).
//
// Non-determinism the function observes (Date, Math.random, crypto) is recorded on a tape with
// one sequence counter shared with host calls, so the replay engine knows the order of all of it.
// Span timing and ids use the real, unrecorded clock and generator.
(function () {
  "use strict";
  const g = globalThis;
  const RealDate = Date;
  const realNow = RealDate.now.bind(RealDate);
  const realRandom = Math.random.bind(Math);
  const RealBigInt = BigInt;
  const MAX_TAPE_EVENTS = 10000;
  // ctx calls and timers waiting at once: each is a task on the host's loop, which other requests share.
  const MAX_PENDING_CALLS = 1000;
  const MAX_TIMER_MS = 2147483647; // as browsers: a longer delay would overflow
  // What a request records of its logs and steps, at most: the gateway redacts, encodes and queues
  // each trace in memory that every tenant shares, and a full queue drops other requests' traces.
  // Past a limit, what comes next is counted on the function span, not kept (nor cut: a secret cut
  // in two is past what redaction recognises).
  const MAX_EVENTS = 1000;
  const MAX_EVENT_CHARS = 2 * 1024 * 1024; // of the kept events' attributes, as JSON
  const MAX_STEPS = 1000;
  const MAX_LOG_DEPTH = 64; // a log's attributes nested deeper are noted, as a stored trace notes them
  const MAX_PARAM_DEPTH = 254; // the most levels the host writes a jsonb parameter with (orjson)

  const outbox = [];
  const pending = new Map();
  const cancelled = []; // ids of timers cleared after they went to the host, since the last drain
  // What each drain hands the host, so that a request cut short (a time limit) still has its
  // recording and its spans up to its last step.
  const tape = [];           // tape events since the last drain
  const spans = [];          // step spans finished since the last drain
  const functionEvents = []; // ctx.log / console events on the function span, since the last drain
  const openSteps = [];
  // Whether openSteps (or an open step's events) changed since the last drain: only then does the
  // drain carry them, since the host reads every drain on the loop all requests share.
  let openChanged = false;
  let taped = 0;
  let entropySent = 0;
  let truncated = false;
  let nextCall = 1;
  let seq = 0;
  let entropy = "";
  let entropyAt = 0;
  let functionSpanId = null;
  let fileName = "";
  let done = null;
  let reported = false; // unhandled rejections, once the handler has finished
  let started = false;
  let eventsKept = 0;
  let eventChars = 0;
  let eventsDropped = 0;
  let stepsKept = 0;
  let stepsDropped = 0;

  function record(kind, value) {
    const s = seq++;
    if (taped < MAX_TAPE_EVENTS) {
      taped++;
      tape.push([s, kind, value]);
    } else {
      truncated = true;
    }
    return s;
  }

  // --- recorded sources of non-determinism -------------------------------------------
  function now() {
    const t = realNow();
    record("now", t);
    return t;
  }
  g.Date = new Proxy(RealDate, {
    construct(target, args, newTarget) {
      return Reflect.construct(target, args.length === 0 ? [now()] : args, newTarget);
    },
    apply() {
      return new RealDate(now()).toString();
    },
    get(target, prop, receiver) {
      return prop === "now" ? now : Reflect.get(target, prop, receiver);
    },
    // Object.getOwnPropertyDescriptor(Date, "now").value would otherwise be the real, unrecorded clock.
    getOwnPropertyDescriptor(target, prop) {
      const desc = Reflect.getOwnPropertyDescriptor(target, prop);
      if (prop === "now" && desc && "value" in desc) desc.value = now;
      return desc;
    },
  });
  // An instance's constructor would otherwise hand out the real, unrecorded Date.
  Object.defineProperty(RealDate.prototype, "constructor", { value: g.Date, writable: true, configurable: true });

  // Temporal.Now reads the clock past the tape, and wrapping it would cost about 0.16 ms per
  // context (measured in a fresh isolate: reading Temporal builds all of it), so functions run
  // without Temporal; a polyfill that reads the clock through Date is recorded. V8_FLAGS leaves
  // Temporal out already; this covers an application that started V8 with its own flags.
  delete g.Temporal;
  // A nested realm would have its own, unrecorded clock and random numbers.
  delete g.ShadowRealm;

  // Nothing of a request may run after it ends: its isolate serves the next request (in a fresh
  // realm). These would run the function's callbacks from V8's own task queue, between the host's
  // evals, at any later time: finalizers, async waits, and WebAssembly compiled in the background.
  // WebAssembly keeps its promise API, compiled synchronously instead.
  delete g.FinalizationRegistry;
  // A WeakRef's deref() says whether V8 has collected its target yet: GC timing, which no replay
  // can reproduce.
  delete g.WeakRef;
  if (g.Atomics) delete g.Atomics.waitAsync;
  // Shared memory (a SharedArrayBuffer, a shared WebAssembly memory) is the process's, not the
  // isolate's: the memory limit does not see it (flux.runtime.external), and with no other thread
  // there is nothing to share it with. A module that declares a shared memory is refused with it.
  delete g.SharedArrayBuffer;
  if (g.WebAssembly) {
    const W = g.WebAssembly;
    const RealMemory = W.Memory;
    const RealModule = W.Module;
    const noShared = (what) => new TypeError(`${what}: shared memory is not available in Flux (nothing runs beside the function to share it with)`);
    // The descriptor read once, into an object without a prototype: a getter or an inherited
    // `shared` cannot answer one thing here and another to V8.
    const Memory = new Proxy(RealMemory, {
      construct(target, args, newTarget) {
        const given = args[0];
        const descriptor = Object.create(null);
        if (given !== null && typeof given === "object") {
          for (const key of ["initial", "minimum", "maximum", "address", "index", "shared"]) {
            const value = given[key];
            if (value !== undefined) descriptor[key] = value;
          }
        }
        if (descriptor.shared) throw noShared("WebAssembly.Memory");
        return Reflect.construct(target, [given !== null && typeof given === "object" ? descriptor : given], newTarget);
      },
    });
    // The module's bytes copied once, then read for a memory section entry with the shared flag.
    const Module = new Proxy(RealModule, {
      construct(target, args, newTarget) {
        const source = args[0];
        const bytes = source instanceof ArrayBuffer ? new Uint8Array(source).slice()
          : ArrayBuffer.isView(source) ? new Uint8Array(source.buffer, source.byteOffset, source.byteLength).slice() : source;
        if (bytes instanceof Uint8Array && declaresSharedMemory(bytes)) throw noShared("WebAssembly.Module");
        return Reflect.construct(target, [bytes, ...args.slice(1)], newTarget);
      },
    });
    Object.defineProperty(RealMemory.prototype, "constructor", { value: Memory, writable: true, configurable: true });
    Object.defineProperty(RealModule.prototype, "constructor", { value: Module, writable: true, configurable: true });
    W.Memory = Memory;
    W.Module = Module;
    const toModule = (source) => (source instanceof Module ? source : new Module(source));
    W.compile = function compile(bytes) {
      return Promise.resolve().then(() => new Module(bytes));
    };
    W.instantiate = function instantiate(source, imports) {
      return Promise.resolve().then(() => {
        const module = toModule(source);
        const instance = new W.Instance(module, imports);
        return source instanceof Module ? instance : { module, instance };
      });
    };
    delete W.compileStreaming;
    delete W.instantiateStreaming;
  }

  // Whether a WebAssembly binary's memory section declares a shared memory (its limits' flag
  // 0x02). A binary this misreads is one V8 refuses to compile anyway.
  function declaresSharedMemory(bytes) {
    let at = 8; // past the magic number and the version
    const leb = () => {
      let value = 0;
      for (let shift = 0; at < bytes.length; shift += 7) {
        const byte = bytes[at++];
        value += (byte & 0x7f) * 2 ** shift;
        if (!(byte & 0x80)) break;
      }
      return value;
    };
    while (at < bytes.length) {
      const id = bytes[at++];
      const end = leb() + at;
      if (id === 5) {
        for (let count = leb(); count > 0 && at < end; count--) {
          const flags = leb();
          if (flags & 0x02) return true;
          leb();
          if (flags & 0x01) leb();
        }
      }
      at = end;
    }
    return false;
  }

  // Intl's format() and formatToParts() without a date read the clock too.
  const DateTimeFormat = Intl.DateTimeFormat.prototype;
  const realFormat = Object.getOwnPropertyDescriptor(DateTimeFormat, "format").get;
  const realFormatToParts = DateTimeFormat.formatToParts;
  const boundFormats = new WeakMap(); // format is a getter returning one bound function per formatter
  Object.defineProperty(DateTimeFormat, "format", {
    configurable: true,
    get() {
      let format = boundFormats.get(this);
      if (!format) {
        const real = realFormat.call(this);
        format = (date) => real(date === undefined ? now() : date);
        boundFormats.set(this, format);
      }
      return format;
    },
  });
  Object.defineProperty(DateTimeFormat, "formatToParts", {
    configurable: true,
    writable: true,
    value: function formatToParts(date) { return realFormatToParts.call(this, date === undefined ? now() : date); },
  });

  // ICU's objects behind Intl live outside V8's heap, and V8 counts them nowhere: a Date's
  // toLocaleString with a locale or options left 27 KB each until a garbage collection, which a
  // heap barely growing never brings (500 MB in 2.5 s), and kept formatters were never freed
  // (a memory limit of 64 MB held 1.2 GB of them). Each Intl object, and each call that makes one
  // for itself, allocates beside it its weight in the heap (about what ICU holds for it, measured
  // with V8 14's ICU): kept formatters then count against the memory limit, and made ones bring
  // the collections that free them.
  const weights = new WeakMap(); // an Intl object -> its weight, alive as long as it is
  let weighed = null; // a call's weight: garbage at once, but it cannot be optimised away
  const weigh = (kilobytes) => new Array(kilobytes * 256); // 256 slots of 4 bytes (8 uncompressed)
  function weighted(Real, kilobytes) {
    const make = (target, args, newTarget) => {
      const made = Reflect.construct(target, args, newTarget);
      weights.set(made, weigh(kilobytes));
      return made;
    };
    const Weighted = new Proxy(Real, {
      construct: make,
      apply(target, thisArg, args) { // Intl.DateTimeFormat() makes one too; Intl.Locale() throws, as it did
        const made = Reflect.apply(target, thisArg, args);
        if (made !== null && typeof made === "object" && !weights.has(made)) weights.set(made, weigh(kilobytes));
        return made;
      },
    });
    Object.defineProperty(Real.prototype, "constructor", { value: Weighted, writable: true, configurable: true });
    return Weighted;
  }
  const INTL_KILOBYTES = { DateTimeFormat: 28, RelativeTimeFormat: 8, Segmenter: 7, PluralRules: 4, Collator: 2,
    DisplayNames: 2, DurationFormat: 2, NumberFormat: 1, ListFormat: 1, Locale: 1 };
  // The constructors are wrapped at the first read of `Intl`, not in every fresh realm: wrapping
  // them all there cost about 0.1 ms of each request.
  const RealIntl = Intl;
  const settleIntl = (value) => Reflect.defineProperty(g, "Intl", { value, writable: true, enumerable: false, configurable: true });
  Reflect.defineProperty(g, "Intl", {
    configurable: true,
    enumerable: false,
    get() {
      settleIntl(RealIntl);
      for (const [name, kilobytes] of Object.entries(INTL_KILOBYTES)) {
        if (typeof RealIntl[name] === "function") RealIntl[name] = weighted(RealIntl[name], kilobytes);
      }
      if (RealIntl.Segmenter) weighCall(RealIntl.Segmenter.prototype, "segment", 9, false);
      return RealIntl;
    },
    set(value) { settleIntl(value); },
  });
  // A method that makes a formatter of its own each call; `arguments` keeps its length as it was.
  function weighCall(proto, name, kilobytes, whenArgs) {
    const real = proto[name];
    if (typeof real !== "function") return;
    const call = name === "segment"
      ? { segment(string) { return weighThen(real, this, arguments, kilobytes, whenArgs); } }.segment
      : { [name]() { return weighThen(real, this, arguments, kilobytes, whenArgs); } }[name];
    Reflect.defineProperty(proto, name, { value: call, writable: true, enumerable: false, configurable: true });
  }
  function weighThen(real, self, args, kilobytes, whenArgs) {
    if (!whenArgs || args[0] !== undefined || args[1] !== undefined) weighed = weigh(kilobytes);
    return Reflect.apply(real, self, args);
  }
  // Without a locale or options V8 formats with one cached formatter: nothing to weigh.
  for (const name of ["toLocaleString", "toLocaleDateString", "toLocaleTimeString"]) weighCall(RealDate.prototype, name, 28, true);
  weighCall(Number.prototype, "toLocaleString", 1, true);
  if (typeof BigInt === "function") weighCall(BigInt.prototype, "toLocaleString", 1, true);

  Math.random = function random() {
    const v = realRandom();
    record("random", v);
    return v;
  };

  function takeEntropy(n) {
    // The file's top-level code runs before a request (when the function loads, and when its fresh
    // context is made), and the host's randomness comes with the request.
    if (!started) {
      throw new Error("Flux: crypto.randomUUID() and crypto.getRandomValues() work inside the handler, not in the file's " +
        "top-level code, which runs before the request: make the value in the handler");
    }
    if (entropyAt + 2 * n > entropy.length) {
      throw new Error("Flux: this request used up its 1 KB of randomness (64 crypto.randomUUID() calls, or getRandomValues bytes)");
    }
    const bytes = new Uint8Array(n);
    for (let i = 0; i < n; i++) bytes[i] = parseInt(entropy.substr(entropyAt + 2 * i, 2), 16);
    entropyAt += 2 * n;
    return bytes;
  }
  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  g.crypto = Object.freeze({
    randomUUID() {
      const b = takeEntropy(16);
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const h = hex(b);
      const uuid = `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
      record("uuid", uuid);
      return uuid;
    },
    getRandomValues(array) {
      if (!ArrayBuffer.isView(array) || array instanceof Float32Array || array instanceof Float64Array) {
        throw new TypeError("crypto.getRandomValues needs an integer typed array");
      }
      if (array.byteLength > 65536) throw new RangeError("crypto.getRandomValues: at most 65536 bytes");
      const src = takeEntropy(array.byteLength);
      new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(src);
      record("random_bytes", hex(src));
      return array;
    },
  });

  // A body that is not text crosses the bridge as base64 and reaches the function as its bytes
  // (V8 14's Uint8Array.fromBase64, kept before the function could change it).
  const fromBase64 = Uint8Array.fromBase64;

  // --- the host bridge ------------------------------------------------------------------
  // V8's structured frames of the stack below `below` (at most `limit` of them; null: the
  // function's own Error.stackTraceLimit), or null when the function made that impossible (froze
  // Error). Read from structured frames: formatting the whole stack as text (`new Error().stack`)
  // cost about 0.09 ms per call in a fresh isolate, on the request path. The prelude's hook and
  // limit are set on the real Error for one synchronous capture and the function's own put back,
  // by descriptor, so that none of the function's code (a setter, a getter) runs meanwhile. The
  // frames' methods are V8's, which the function cannot replace (non-writable, non-configurable).
  const RealError = Error;
  const captureStackTrace = Error.captureStackTrace;
  const { defineProperty, deleteProperty, getOwnPropertyDescriptor } = Reflect;
  const isArray = Array.isArray;
  const structuredFrames = (_, frames) => frames;

  function setOwn(object, key, value) {
    const own = getOwnPropertyDescriptor(object, key);
    return defineProperty(object, key, own ? { value } : { value, writable: true, configurable: true });
  }

  function putBack(object, key, own) {
    if (own) defineProperty(object, key, own);
    else deleteProperty(object, key);
  }

  function stackFrames(below, limit) {
    const hook = getOwnPropertyDescriptor(RealError, "prepareStackTrace");
    const depth = getOwnPropertyDescriptor(RealError, "stackTraceLimit");
    try {
      if (!setOwn(RealError, "prepareStackTrace", structuredFrames)) return null;
      if (limit !== null && !setOwn(RealError, "stackTraceLimit", limit)) return null;
      const holder = {};
      captureStackTrace(holder, below);
      const frames = holder.stack;
      return isArray(frames) ? frames : null;
    } finally {
      putBack(RealError, "prepareStackTrace", hook);
      putBack(RealError, "stackTraceLimit", depth);
    }
  }

  // Where in the function's file a ctx call was made ("functions/x.js:LINE:COL"), within the
  // function's own Error.stackTraceLimit (the first `limit` of `frames`, when they were read past
  // it); null if the stack cannot be read.
  function callsite(frames, limit = Infinity) {
    if (!fileName || frames === null) return null;
    for (let i = 0; i < frames.length && i + 1 <= limit; i++) {
      const frame = frames[i];
      if (frame.getScriptNameOrSourceURL() === fileName) return `${fileName}:${frame.getLineNumber()}:${frame.getColumnNumber()}`;
    }
    return null;
  }

  // A ctx call's promise is a CallPromise, so that the prelude can tell whether anything took up
  // its rejection: await, then, catch, finally and Promise.all all call `then` on a promise that
  // is not a plain Promise (a plain one they take up inside V8, unseen), and what `then` returns
  // is a CallPromise too. A rejection nothing took up by the time the handler finished is logged
  // on the function span, as Node reports an unhandled rejection. The function's own promises
  // (an async function's, Promise.reject) are V8's, whose rejection hook mini-racer does not
  // expose: those go unseen.
  const unhandled = new Map(); // rejected CallPromise -> its reason, until something takes it up
  const takenUp = new WeakSet();
  class CallPromise extends Promise {
    constructor(executor) {
      let self = null;
      super((resolve, reject) => executor(resolve, (reason) => {
        if (self !== null && !takenUp.has(self)) unhandled.set(self, reason);
        reject(reason);
      }));
      self = this;
    }

    then(onFulfilled, onRejected) {
      takenUp.add(this);
      unhandled.delete(this);
      return super.then(onFulfilled, onRejected);
    }
  }

  function reportUnhandled() {
    for (const reason of unhandled.values()) {
      const text = reason instanceof RealError ? `${reason.name}: ${reason.message}` : formatArgs([reason]);
      keepEvent(functionEvents, { name: "log", time: realNow(), attributes: {
        message: `Unhandled promise rejection: ${text}`, level: "error",
        ...(reason instanceof RealError ? exceptionAttributes(reason) : {}) } });
    }
    unhandled.clear();
  }

  function hostCall(op, args, parent, site) {
    if (pending.size >= MAX_PENDING_CALLS) {
      throw new RangeError(`Flux: at most ${MAX_PENDING_CALLS} ctx calls and timers can be pending at once in a request`);
    }
    const id = nextCall++;
    const callSeq = seq++;
    outbox.push([id, op, args, parent, callSeq, site]);
    return new CallPromise((resolve, reject) => pending.set(id, { resolve, reject, site, callSeq }));
  }

  function makeError(info, site) {
    const err = new Error(info.message);
    err.name = info.name || "Error";
    for (const key of ["code", "sqlstate", "detail", "hint", "position", "status", "timeout", "span"]) {
      if (info[key] !== undefined && info[key] !== null) err[key] = info[key];
    }
    if (site) err.stack = `${err.name}: ${err.message}\n    at ${site}`;
    return err;
  }

  // JSON would send NaN and the infinities as null: SQL NULL, silently.
  const nonFinite = (n) => `${n}, which a parameter cannot carry (JSON has no such number): pass null, or the string ` +
    `'${n}' for a float column`;
  // A BigInt inside an array or object parameter crosses as this mark and its digits, in the
  // parameter's JSON text (JSON has no BigInt); the host makes each the exact integer. A nonce of
  // this context's, so that no string of the function's (nor one its caller sent) can pass for one.
  const PARAM_BIGINT_MARK = `flux_bigint_param_${spanId()}:`;
  // What JSON.stringify meets inside an array or object parameter (after toJSON), one checker per
  // parameter; `held.bigint` says whether it met a BigInt.
  function paramChecker(held) {
    const levels = new Map();
    return function checkParam(_key, value) {
      if (typeof value === "number" && !Number.isFinite(value)) throw new TypeError(`it holds ${nonFinite(value)}`);
      if (typeof value === "bigint") {
        held.bigint = true;
        return `${PARAM_BIGINT_MARK}${value}`; // a template's ToString: no method of the function's runs
      }
      if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
        throw new TypeError("it holds bytes (an ArrayBuffer or a typed array): bytes can be a parameter of their own (bytea), not inside an array or object");
      }
      if (value !== null && typeof value === "object") {
        const level = (levels.get(this) ?? 0) + 1;
        if (level > MAX_PARAM_DEPTH) throw new TypeError(`it is nested deeper than ${MAX_PARAM_DEPTH} levels`);
        levels.set(value, level);
      }
      return value;
    };
  }

  // Bytes cross the bridge (JSON) as a string of one character per byte, U+0000 to U+00FF: exact,
  // and a secret in ASCII stays visible to redaction (base64 would hide it).
  function bytesToLatin1(bytes) {
    let out = "";
    for (let i = 0; i < bytes.length; i += 8192) out += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
    return out;
  }
  function latin1ToBytes(text) {
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  // The Response of ctx.fetch, as fetch's: `headers` a read-only Headers (names in any case,
  // iterable in name order, Set-Cookie values apart), text()/json() the body as text, and
  // arrayBuffer()/bytes() its bytes exactly. The body can be read any number of times.
  function makeResponse(r) {
    const values = new Map(Object.entries(r.headers || {})); // a Map: a name such as "constructor" is only a name
    const setCookie = r.setCookie || [];
    const pairs = () => {
      const out = [];
      for (const name of [...values.keys()].sort()) {
        if (name === "set-cookie") for (const v of setCookie) out.push([name, v]);
        else out.push([name, values.get(name)]);
      }
      return out;
    };
    const headers = Object.freeze({
      get: (name) => values.get(String(name).toLowerCase()) ?? null,
      has: (name) => values.has(String(name).toLowerCase()),
      getSetCookie: () => setCookie.slice(),
      entries: () => pairs()[Symbol.iterator](),
      keys: () => pairs().map(([k]) => k)[Symbol.iterator](),
      values: () => pairs().map(([, v]) => v)[Symbol.iterator](),
      forEach(callback, thisArg) {
        for (const [k, v] of pairs()) callback.call(thisArg, v, k, headers);
      },
      [Symbol.iterator]: () => pairs()[Symbol.iterator](),
    });
    // The body's bytes: sent apart when the text is not their UTF-8 (binary, or another charset).
    const bytes = () => (r.binary !== undefined ? latin1ToBytes(r.binary) : latin1ToBytes(unescape(encodeURIComponent(r.body))));
    return Object.freeze({
      status: r.status,
      statusText: r.statusText || "",
      ok: r.status >= 200 && r.status < 300,
      url: r.url,
      headers,
      text: async () => r.body,
      json: async () => JSON.parse(r.body),
      arrayBuffer: async () => bytes().buffer,
      bytes: async () => bytes(),
    });
  }

  // fetch's init.headers: an object, an array of [name, value] pairs, or anything iterable over
  // pairs (a Response's headers); a name given twice gets its values joined, as Headers.append does.
  function headerList(given) {
    const headers = Object.create(null);
    if (given === undefined || given === null) return headers;
    if (typeof given !== "object") throw new TypeError("ctx.fetch: init.headers must be an object or an array of [name, value] pairs");
    const pairs = Array.isArray(given) || typeof given[Symbol.iterator] === "function" ? Array.from(given) : Object.entries(given);
    for (const pair of pairs) {
      if (!Array.isArray(pair) || pair.length !== 2) {
        throw new TypeError("ctx.fetch: each of init.headers must be a [name, value] pair");
      }
      const name = String(pair[0]).toLowerCase();
      const value = String(pair[1]).replace(HTTP_SPACE_AROUND, ""); // as fetch trims it (a secret's final newline)
      headers[name] = name in headers ? `${headers[name]}, ${value}` : value;
    }
    return headers;
  }

  const HTTP_SPACE_AROUND = /^[\t\n\r ]+|[\t\n\r ]+$/g;

  // What a ctx.fetch call sends to the host, each part of `init` read once.
  function fetchArgs(url, init) {
    init = init || {};
    const headers = headerList(init.headers);
    const { body, binary } = requestBody(init.body, headers);
    const timeout = init.timeout_ms ?? init.timeout ?? null;
    if (timeout !== null && !(typeof timeout === "number" && timeout > 0 && timeout <= MAX_TIMER_MS)) {
      throw new TypeError(`ctx.fetch: timeout_ms must be a positive number of milliseconds, not ${String(timeout)}`);
    }
    const args = { url: String(url), method: String(init.method || "GET").toUpperCase(), headers, body,
      name: init.name == null ? null : String(init.name), timeout_ms: timeout };
    if (binary) args.binary = true;
    return args;
  }

  // A CallPromise rejected with `reason`: reported as unhandled if nothing takes it up, as a call's
  // is (rejected after it is made: a CallPromise rejected inside its executor is not tracked).
  function rejectedCall(reason) {
    let reject = null;
    const promise = new CallPromise((_, rej) => { reject = rej; });
    reject(reason);
    return promise;
  }

  // fetch's body: a string is text/plain;charset=UTF-8, bytes (an ArrayBuffer or a view of one)
  // are sent as they are, anything else as JSON with application/json; a content-type the
  // function set stands.
  const tagOf = Object.prototype.toString;  // taken before the function's code runs, which may replace it
  function requestBody(body, headers) {
    if (body === undefined || body === null) return { body: null, binary: false };
    if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) {
      const view = body instanceof ArrayBuffer ? new Uint8Array(body) : new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
      return { body: bytesToLatin1(view), binary: true };
    }
    if (typeof body === "string") {
      if (!("content-type" in headers)) headers["content-type"] = "text/plain;charset=UTF-8";
      return { body, binary: false };
    }
    // A form, as fetch sends one; told by its tag, so that a body of another kind does not
    // compile url.js to ask `instanceof`.
    if (tagOf.call(body) === "[object URLSearchParams]") {
      if (!("content-type" in headers)) headers["content-type"] = "application/x-www-form-urlencoded;charset=UTF-8";
      return { body: String(body), binary: false };
    }
    if (typeof body !== "object") {
      if (!("content-type" in headers)) headers["content-type"] = "text/plain;charset=UTF-8";
      return { body: String(body), binary: false };
    }
    const json = JSON.stringify(body);
    if (json === undefined) return { body: null, binary: false }; // a toJSON() that gave undefined: no body
    if (!("content-type" in headers)) headers["content-type"] = "application/json";
    return { body: json, binary: false };
  }

  // Where a call through the root ctx (or the console) nests: under the innermost open step whose
  // callback it is made in, synchronously or after awaits, or under the function span when it is
  // made in the handler outside any step. V8's async stack frames say which: each step runs its
  // callback in a function named by its marker, and the handler runs in one named HANDLER_MARK.
  // Only while a step is open: the common request, with none, captures no stack.
  function currentParent(bound) {
    if (bound) return bound;
    if (!openSteps.length) return functionSpanId;
    return parentOnStack(stackFrames(currentParent, Infinity)) ?? chainParent();
  }

  // A ctx.db or ctx.fetch call's [parent span, callsite]. While a step is open both come from one
  // read of the whole stack (its callsite from the frames within the function's own
  // Error.stackTraceLimit, as V8 would have read them); a second read only when that limit is not
  // a plain number, which V8 reads its own way.
  function placeCall(bound) {
    if (bound || !openSteps.length) return [bound || functionSpanId, callsite(stackFrames(placeCall, null))];
    const frames = stackFrames(placeCall, Infinity);
    const parent = parentOnStack(frames) ?? chainParent();
    const own = getOwnPropertyDescriptor(RealError, "stackTraceLimit");
    const limit = own === undefined ? undefined : getOwnPropertyDescriptor(own, "value"); // no getter of the function's runs
    if (limit === undefined || typeof limit.value !== "number") return [parent, callsite(stackFrames(placeCall, null))];
    return [parent, callsite(frames, limit.value)];
  }

  // Markers no code of the function's can name by chance: a nonce of this context's. A function
  // can read one off its own stack, but a function it names so only points its calls at one of
  // its own open steps, as handing it that step's ctx would.
  const HANDLER_MARK = `flux_handler_${spanId()}`;
  const STEP_MARK = `flux_step_${spanId()}_`;
  const stepsByMark = new Map(); // an open step's marker -> its span

  // The innermost step or the handler on the stack, or null when the stack reaches neither (V8
  // keeps no async frames into a timer's callback, a `.then` callback on a CallPromise or one
  // nothing awaits, an async function that nothing awaits or only Promise.race does) or cannot
  // be read (the function froze Error). All frames are read, whatever the function's own
  // Error.stackTraceLimit, so that a deep stack of its own cannot hide a marker.
  function parentOnStack(frames) {
    if (frames === null) return null;
    for (let i = 0; i < frames.length; i++) {
      const name = frames[i].getFunctionName();
      if (name === HANDLER_MARK) return functionSpanId;
      const step = stepsByMark.get(name);
      if (step !== undefined) return step.id;
    }
    return null;
  }

  // Where the stack says nothing: under the open step while the open steps form a chain (each
  // started inside the one before), else under the function span.
  function chainParent() {
    for (let i = 0; i < openSteps.length; i++) {
      const expected = i === 0 ? functionSpanId : openSteps[i - 1].id;
      if (openSteps[i].parent !== expected) return functionSpanId;
    }
    return openSteps[openSteps.length - 1].id;
  }

  function spanId() {
    let s = "";
    for (let i = 0; i < 16; i++) s += Math.floor(realRandom() * 16).toString(16);
    return s;
  }

  // The function's own frames only: the prelude's frames say nothing to the user.
  function userStack(stack) {
    return String(stack || "").split("\n").filter((line) => !line.includes("<anonymous>"))
      .map((line) => line.replace("globalThis.__flux_handler", "default")).join("\n");
  }

  // What the function threw, as text: never throws itself (a getter or toString of the thrown value
  // may), or the request would never finish and end as a Promise nothing settles.
  function describe(e) {
    try {
      if (e instanceof Error) {
        return { name: String(e.name), message: String(e.message), stack: userStack(e.stack),
          sqlstate: e.sqlstate === undefined || e.sqlstate === null ? null : String(e.sqlstate) };
      }
      let text;
      try { text = logJson(e); } catch (_) { text = String(e); }
      return { name: "NonErrorThrown", message: `the function threw a non-Error value: ${text}`, stack: "", sqlstate: null };
    } catch (failure) {
      let why;
      try { why = failure instanceof Error ? `${failure.name}: ${failure.message}` : String(failure); } catch (_) { why = "a value that cannot be read"; }
      return { name: "UnreadableThrow", message: `the function threw a value that could not be read (reading it threw ${why})`,
        stack: "", sqlstate: null };
    }
  }

  // Log arguments as Node's console writes them: an Error as "Name: message", its stack frames and
  // its own fields (`code`) as JSON; anything else as JSON, an Error inside it as "Name: message"
  // (JSON.stringify would give {}: an Error's fields are not enumerable).
  function formatArgs(args) {
    return args.map((a) => {
      if (typeof a === "string") return a;
      try { return a instanceof RealError ? errorText(a) : logJson(a) ?? String(a); } catch (_) { return String(a); }
    }).join(" ");
  }

  function errorsAsText(key, value) {
    return value instanceof RealError ? `${value.name}: ${value.message}` : value;
  }

  // JSON with errors as "Name: message" and a BigInt as Node writes it, 123n, where JSON.stringify
  // throws: each goes through as a string marked with a nonce no value of the function's can hold
  // by chance, unquoted at the end.
  const BIGINT_MARK = `flux_bigint_${spanId()}_`;
  const MARKED_BIGINT = new RegExp(`"${BIGINT_MARK}(-?\\d+)"`, "g");
  function logJson(value) {
    let marked = false;
    const text = JSON.stringify(value, (key, v) => {
      if (typeof v !== "bigint") return errorsAsText(key, v);
      marked = true;
      return BIGINT_MARK + v;
    });
    return marked ? text.replace(MARKED_BIGINT, "$1n") : text;
  }

  function errorText(e) {
    const frames = userStack(e.stack).split("\n").filter((line) => /^\s+at /.test(line));
    const fields = Object.fromEntries(Object.entries(e).filter(([k]) => k !== "name" && k !== "message" && k !== "stack"));
    let own = "";
    if (Object.keys(fields).length) {
      try { own = ` ${logJson(fields)}`; } catch (_) { own = ""; }  // a getter that throws, say
    }
    return [`${e.name}: ${e.message}`, ...frames].join("\n") + own;
  }

  // An Error as OpenTelemetry's exception attributes.
  function exceptionAttributes(e) {
    return { "exception.type": String(e.name), "exception.message": String(e.message), "exception.stacktrace": userStack(e.stack) };
  }

  // A log's own keys win over the attributes passed with it: one of those named like them is kept
  // as `attributes.<name>`, so nothing the function logs is lost and nothing overrides the message.
  const LOG_KEYS = new Set(["message", "level", "exception.type", "exception.message", "exception.stacktrace"]);
  function logAttributes(event, attrs) {
    const levels = new Map();
    const plainValue = function (key, value) {
      if (typeof value === "bigint") return String(value); // its exact digits: JSON has no BigInt
      value = errorsAsText(key, value);
      if (value !== null && typeof value === "object") {
        const level = (levels.get(this) ?? 0) + 1;
        if (level > MAX_LOG_DEPTH) return `[not recorded: nested deeper than ${MAX_LOG_DEPTH} levels]`;
        levels.set(value, level);
      }
      return value;
    };
    let plain;
    try { plain = JSON.parse(JSON.stringify(attrs, plainValue)); } catch (e) { plain = { "attributes.error": String(e) }; }
    for (const [k, v] of Object.entries(plain)) event[LOG_KEYS.has(k) ? `attributes.${k}` : k] = v;
    return event;
  }

  function addEvent(parent, name, attributes) {
    const event = { name, time: realNow(), attributes };
    const step = openSteps.find((s) => s.id === parent);
    if (step) openChanged = true;
    keepEvent(step ? step.events : functionEvents, event);
  }

  // An event kept while the request's events are under MAX_EVENTS and MAX_EVENT_CHARS, else counted.
  function keepEvent(list, event) {
    const size = JSON.stringify(event.attributes).length; // plain JSON by now: strings, and logAttributes' output
    if (eventsKept >= MAX_EVENTS || eventChars + size > MAX_EVENT_CHARS) {
      eventsDropped++;
      return;
    }
    eventsKept++;
    eventChars += size;
    list.push(event);
  }

  async function rejectWith(e) {
    throw e;
  }

  // A step past MAX_STEPS runs as a step, unrecorded: its calls and logs go where this ctx's do.
  async function unrecordedStep(fn, info, bound) {
    if (typeof fn !== "function") throw new TypeError("ctx.step(name, fn): fn must be a function");
    stepsDropped++;
    return await fn(makeCtx(info, bound));
  }

  // Runs a step's callback in a function named by the step's marker, which V8's stack frames then
  // show below every call made in the callback, synchronously or after an await.
  function runStep(span, fn, stepCtx) {
    const mark = STEP_MARK + span.id;
    const run = { async [mark]() {
      try {
        return await fn(stepCtx);
      } catch (e) {
        const d = describe(e);
        span.status = "error";
        span.error = d.message;
        keepEvent(span.events, { name: "exception", time: realNow(),
          attributes: { "exception.type": d.name, "exception.message": d.message, "exception.stacktrace": d.stack } });
        throw e;
      } finally {
        span.duration_ms = realNow() - span.start;
        openSteps.splice(openSteps.indexOf(span), 1);
        stepsByMark.delete(mark);
        openChanged = true;
        spans.push(span);
      }
    } }[mark];
    openSteps.push(span);
    stepsByMark.set(mark, span);
    openChanged = true;
    return run();
  }

  function makeCtx(info, bound) {
    const ctx = {
      requestId: info.request_id,
      tenant: info.tenant,
      function: info.function,
      replay: info.replay,
      secrets: info.secrets,
      db: Object.freeze({
        query(sql, params) {
          if (typeof sql !== "string") throw new TypeError("ctx.db.query(sql, params): sql must be a string");
          if (params !== undefined && !Array.isArray(params)) {
            throw new TypeError("ctx.db.query(sql, params): params must be an array (use $1, $2 ... placeholders)");
          }
          const binary = [];
          const marked = []; // sent as their JSON text, holding BigInts (PARAM_BIGINT_MARK)
          params = (params || []).map((p, i) => {
            // A BigInt goes as its decimal text, which PostgreSQL reads into any numeric column.
            if (typeof p === "bigint") return p.toString();
            if (typeof p === "number" && !Number.isFinite(p)) throw new TypeError(`ctx.db.query(sql, params): $${i + 1} is ${nonFinite(p)}`);
            if (ArrayBuffer.isView(p) && !(p instanceof Uint8Array)) {
              throw new TypeError(`ctx.db.query(sql, params): $${i + 1} is a ${p.constructor.name}: pass Array.from(it) for an ` +
                "array of numbers, or a Uint8Array of its bytes for bytea");
            }
            if (p instanceof Uint8Array || p instanceof ArrayBuffer) {
              binary.push(i); // bytea: its bytes cross as one character each
              return bytesToLatin1(p instanceof ArrayBuffer ? new Uint8Array(p) : p);
            }
            if (p !== null && typeof p === "object") {
              const held = { bigint: false };
              let text;
              try {
                text = JSON.stringify(p, paramChecker(held));
              } catch (e) {
                throw new TypeError(`ctx.db.query(sql, params): $${i + 1} cannot be sent: ${e.message}`);
              }
              if (held.bigint) {
                marked.push(i);
                return text;
              }
            }
            return p;
          });
          let args = binary.length ? { sql, params, binary } : { sql, params };
          if (marked.length) args = { ...args, bigints: { mark: PARAM_BIGINT_MARK, params: marked } };
          const place = placeCall(bound); // indexed: spreading would run the function's Array iterator
          return hostCall("db", args, place[0], place[1]);
        },
      }),
      fetch(url, init) {
        let args;
        try {
          args = fetchArgs(url, init);
        } catch (e) {
          return rejectedCall(e); // fetch rejects, never throws: `.catch` takes up a bad init (or its throwing getter) too
        }
        const place = placeCall(bound);
        return hostCall("fetch", args, place[0], place[1]).then(makeResponse);
      },
      // ctx.log(message..., attrs): a last object is the event's attributes; an Error last (or
      // before them) is its exception attributes, and the message is what comes before it.
      log(...args) {
        if (eventsKept >= MAX_EVENTS) return void eventsDropped++; // not even formatted
        const last = args[args.length - 1];
        const attrs = args.length > 1 && last && typeof last === "object" && !(last instanceof RealError) ? args.pop() : null;
        const error = args[args.length - 1] instanceof RealError ? args[args.length - 1] : null;
        if (error) args.pop();
        const event = { message: args.length ? formatArgs(args) : `${error.name}: ${error.message}` };
        if (error) Object.assign(event, exceptionAttributes(error));
        addEvent(currentParent(bound), "log", attrs ? logAttributes(event, attrs) : event);
      },
      step(name, fn) {
        if (typeof fn !== "function" || stepsKept >= MAX_STEPS) return unrecordedStep(fn, info, bound);
        let spanName;
        try {
          spanName = String(name);
        } catch (e) {
          return rejectWith(e); // as an async function's throw: ctx.step always returns a promise
        }
        stepsKept++;
        const span = { id: spanId(), parent: currentParent(bound), name: spanName, kind: "internal", start: realNow(),
          duration_ms: 0, status: "ok", error: null, attributes: { "flux.kind": "step" }, events: [] };
        return runStep(span, fn, makeCtx(info, span.id));
      },
    };
    return Object.freeze(ctx);
  }

  // Timers run on the host, so the host always knows what the function is waiting for.
  const timers = new Map();
  g.setTimeout = function setTimeout(fn, ms, ...args) {
    const id = nextCall;
    const delay = Math.min(Math.max(0, Number(ms) || 0), MAX_TIMER_MS);
    timers.set(id, true);
    hostCall("timer", { ms: delay }, null, callsite(stackFrames(setTimeout, null))).then(() => {
      if (timers.delete(id) && typeof fn === "function") fn(...args);
    });
    return id;
  };
  // A cleared timer never fires and stops counting against the limit at once: its call leaves
  // the outbox if it has not gone to the host yet, else the host cancels it (`cancel`, drained).
  g.clearTimeout = function clearTimeout(id) {
    if (!timers.delete(id)) return;
    pending.delete(id);
    const at = outbox.findIndex((call) => call[0] === id);
    if (at === -1) cancelled.push(id);
    else outbox.splice(at, 1);
  };
  g.console = Object.freeze(Object.fromEntries(["log", "info", "warn", "error", "debug"].map((level) =>
    [level, (...args) => (eventsKept >= MAX_EVENTS ? void eventsDropped++
      : addEvent(currentParent(null), "log", { message: formatArgs(args), level }))])));

  // The return value as JSON, refusing what JSON.stringify would silently change, in one pass:
  // JSON.stringify calls each value's toJSON (once, as it always does) and then the replacer, with
  // the value's holder as `this`, before it descends into the value. `paths` names each object
  // descended into (`body.items[2]`, "" for the value itself) for the error; `parents` chains
  // them, for cycles. A header's number or BigInt is sent as its JS text (`1e-7`, not Python's `1e-07`).
  // Nesting is refused past what the gateway can send (MAX_RETURN_DEPTH), before the transaction
  // commits: the host's JSON readers stop at about 1,000 levels, and a response must not fail
  // once its writes are in.
  const MAX_RETURN_DEPTH = 255; // the return value's levels: a body of 254, the most orjson writes
  function serialize(value) {
    const paths = new Map();
    const parents = new Map();
    const levels = new Map();
    let headers = null;
    const pathOf = (holder, key) => {
      const at = paths.get(holder);
      return at === undefined ? "" : Array.isArray(holder) ? `${at}[${key}]` : at ? `${at}.${key}` : key;
    };
    const refuse = (holder, key, what) => {
      const path = pathOf(holder, key);
      return new TypeError(`${path ? `the return value's ${path}` : "the return value"} ${what}`);
    };
    return JSON.stringify(value, function (key, v) {
      const t = typeof v;
      if (v === null || v === undefined || t === "string" || t === "boolean") return v;
      if (t === "number" || t === "bigint") {
        if (t === "number" && !Number.isFinite(v)) throw refuse(this, key, `is ${v}, which JSON cannot represent`);
        const header = headers !== null && (this === headers || (parents.get(this) === headers && Array.isArray(this)));
        if (header) return String(v);
        if (t === "bigint") {
          throw refuse(this, key, "is a BigInt, which JSON cannot represent: convert it with String() to send its exact digits");
        }
        return v;
      }
      if (t !== "object") throw refuse(this, key, `is a ${t}, which JSON cannot represent`);
      for (let h = this; h !== undefined; h = parents.get(h)) {
        if (h === v) throw refuse(this, key, "refers back to itself (a cycle)");
      }
      const level = (levels.get(this) ?? 0) + 1;
      if (level > MAX_RETURN_DEPTH) {
        throw new TypeError(`the return value is nested deeper than ${MAX_RETURN_DEPTH} levels (a body deeper than ` +
          `${MAX_RETURN_DEPTH - 1}), more than a response can carry`);
      }
      levels.set(v, level);
      const proto = Object.getPrototypeOf(v);
      if (proto !== Object.prototype && proto !== null && !Array.isArray(v)) {
        throw refuse(this, key, `is a ${v.constructor?.name || "non-plain object"}, which JSON cannot represent`);
      }
      const path = pathOf(this, key);
      paths.set(v, path);
      parents.set(v, this);
      if (path === "headers") headers = v;
      return v;
    });
  }

  function finish(ok, payload) {
    if (done) return;
    done = ok ? { ok: true, value: payload } : { ok: false, error: payload };
  }

  function start(input) {
    if (started) throw new Error("Flux: an isolate runs one request only");
    started = true;
    const info = JSON.parse(input);
    if (info.body_base64) info.request.body = fromBase64(info.request.body);
    entropy = info.entropy;
    functionSpanId = info.span_id;
    fileName = info.file;
    // The function's file assigned its default export here (isolate.py, to_script).
    const handler = g.__flux_handler;
    Reflect.deleteProperty(g, "__flux_handler");
    if (typeof handler !== "function") {
      finish(false, { name: "TypeError", message: `${info.file} must \`export default async function (req, ctx)\``, stack: "" });
      return;
    }
    const ctx = makeCtx(info, null);
    // Named HANDLER_MARK so that V8's stack frames show it below every call the handler makes (see
    // currentParent). Awaiting the handler's value takes the turns `Promise.resolve(value).then`
    // took before, so results and callbacks interleave as they did.
    const run = { async [HANDLER_MARK]() {
      let value;
      try {
        value = await handler(info.request, ctx);
      } catch (e) {
        finish(false, describe(e));
        return;
      }
      try {
        if (value === undefined || value === null || typeof value !== "object" || Array.isArray(value)) {
          throw new TypeError(`the handler must return {status, headers, body}, not ${value === null ? "null" : Array.isArray(value) ? "an array" : typeof value}`);
        }
        finish(true, serialize(value));
      } catch (e) {
        finish(false, { ...describe(e), name: "NonSerializableReturn" });
      }
    } }[HANDLER_MARK];
    run();
  }

  // What the function did since the last drain. Microtasks run only when an eval ends, so the host
  // drains in an eval of its own after each start and settle (posted right behind it).
  function drain() {
    if (done && !reported) {  // the handler has finished: a rejection nothing took up by now never will be
      reported = true;
      reportUnhandled();
    }
    const out = { calls: outbox.splice(0, outbox.length), done };
    if (cancelled.length) out.cancel = cancelled.splice(0, cancelled.length);
    if (tape.length) out.tape = tape.splice(0, tape.length);
    if (spans.length) out.spans = spans.splice(0, spans.length);
    if (functionEvents.length) out.events = functionEvents.splice(0, functionEvents.length);
    if (openChanged) {
      out.open = openSteps;
      openChanged = false;
    }
    if (truncated) out.truncated = true;
    if (eventsDropped) out.events_dropped = eventsDropped;
    if (stepsDropped) out.steps_dropped = stepsDropped;
    if (entropyAt > entropySent) {
      out.entropy = entropy.slice(entropySent, entropyAt);
      entropySent = entropyAt;
    }
    return JSON.stringify(out);
  }

  // Results reach the function in the order the host settles them, which need not be the order of
  // the calls, and several may reach it in one turn, before any callback of theirs runs: the tape
  // says when and together with which ("settled", the seqs of the calls of one turn, in order).
  // Whether two results came together changes how the callbacks waiting on them interleave.
  function settle(input) {
    const turn = [];
    for (const [id, ok, value, bigints] of JSON.parse(input)) {
      const p = pending.get(id);
      if (!p) continue;
      pending.delete(id);
      turn.push(p.callSeq);
      if (bigints !== undefined) withBigInts(value.rows, bigints);
      if (ok) p.resolve(value);
      else p.reject(makeError(value, p.site));
    }
    if (turn.length) record("settled", turn);
  }

  // A db result's int8 values past Number's safe range, which JSON.parse rounded: the host sends
  // [path, exact decimal text] for each (only those), and each becomes its BigInt.
  function withBigInts(rows, bigints) {
    for (let i = 0; i < bigints.length; i++) {
      const [path, text] = bigints[i];
      let holder = rows;
      for (let k = 0; k < path.length - 1; k++) holder = holder[path[k]];
      holder[path[path.length - 1]] = RealBigInt(text);
    }
  }

  const operations = { start, drain, settle };
  return function bridge(op, input) {
    return operations[op](input);
  };
})();
