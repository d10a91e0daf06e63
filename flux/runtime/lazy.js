// Globals compiled in a realm the first time its code reads one (isolate.py applies this to
// webapi.js and url.js). Why: V8 runs with --no-lazy, so every function of a script is compiled
// with it, in each realm anew; kept as strings, those files are only scanned when a realm starts.
// Until the first read, each global is an accessor; reading it compiles its file (an indirect
// eval, allowed in realms by --allow-unsafe-function-constructor) and puts the value in its place,
// and assigning it replaces it, as for any global.
(function (sources, globals) {
  "use strict";
  const evaluate = globalThis.eval;  // taken before the function's own code runs, which may replace it
  const made = [];
  const install = (name, value) =>
    Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: false });
  for (const [name, at] of globals) {
    Object.defineProperty(globalThis, name, {
      get() {
        made[at] ??= evaluate(sources[at]);
        install(name, made[at][name]);
        return made[at][name];
      },
      set(value) {
        install(name, value);
      },
      configurable: true,
      enumerable: false,
    });
  }
})
