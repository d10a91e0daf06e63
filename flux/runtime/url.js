// WHATWG URL and URLSearchParams (https://url.spec.whatwg.org/), written from the standard's
// algorithms for Flux functions, whose V8 has no Web APIs. The file is one expression, the object
// of the two classes, compiled in a realm the first time a request reads URL or URLSearchParams
// (lazy.js, isolate.py): compiled in every realm at its start, it made each about 0.06 to 0.13 ms
// slower.
//
// Where it differs from the standard (README, Functions): domain to ASCII approximates UTS #46
// without its tables (see domainToAscii; no Bidi or ContextJ checks, ZWJ and ZWNJ refused); the
// only encoding is UTF-8. Its tests compare it with Node 20, except where Node departs from the
// standard (tests/runtime/test_url.py).
(() => {
  "use strict";
  const FAILURE = null;
  const SPECIAL = { __proto__: null, ftp: 21, file: null, http: 80, https: 443, ws: 80, wss: 443 };
  const isSpecialScheme = (scheme) => scheme in SPECIAL;
  function usv(value) { // WebIDL's USVString: a lone surrogate becomes U+FFFD
    if (typeof value === "symbol") throw new TypeError("Cannot convert a Symbol value to a string");
    return String(value).toWellFormed();
  }
  const isAlpha = (c) => c !== undefined && /^[A-Za-z]$/.test(c);
  const isDigit = (c) => c !== undefined && c >= "0" && c <= "9";
  const isHex = (c) => c !== undefined && /^[0-9A-Fa-f]$/.test(c);

  // Percent-encode sets, as predicates on a code point.
  const C0_CONTROL = (c) => c < 0x20 || c > 0x7e;
  const FRAGMENT_SET = (c) => C0_CONTROL(c) || c === 0x20 || c === 0x22 || c === 0x3c || c === 0x3e || c === 0x60;
  const QUERY_SET = (c) => C0_CONTROL(c) || c === 0x20 || c === 0x22 || c === 0x23 || c === 0x3c || c === 0x3e;
  const SPECIAL_QUERY_SET = (c) => QUERY_SET(c) || c === 0x27;
  const PATH_SET = (c) => QUERY_SET(c) || c === 0x3f || c === 0x60 || c === 0x7b || c === 0x7d;
  const USERINFO_SET = (c) => PATH_SET(c) || c === 0x2f || c === 0x3a || c === 0x3b || c === 0x3d || c === 0x40 ||
    (c >= 0x5b && c <= 0x5e) || c === 0x7c;
  const COMPONENT_SET = (c) => USERINFO_SET(c) || (c >= 0x24 && c <= 0x26) || c === 0x2b || c === 0x2c;
  const FORM_SET = (c) => COMPONENT_SET(c) || c === 0x21 || (c >= 0x27 && c <= 0x29) || c === 0x7e;

  // One code point (a well-formed string of one or two UTF-16 units), percent-encoded as UTF-8 if in the set.
  function encodeCodePoint(ch, set) {
    const c = ch.codePointAt(0);
    if (!set(c)) return ch;
    if (c < 0x80) return (c < 0x10 ? "%0" : "%") + c.toString(16).toUpperCase();
    return encodeURIComponent(ch); // UTF-8, upper-case hex: what the standard writes
  }

  function encodeString(text, set, spaceAsPlus = false) {
    let out = "";
    for (const ch of text) out += spaceAsPlus && ch === " " ? "+" : encodeCodePoint(ch, set);
    return out;
  }

  function utf8Bytes(text) {
    const bytes = [];
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (c < 0x80) bytes.push(c);
      else if (c < 0x800) bytes.push(0xc0 | (c >> 6), 0x80 | (c & 0x3f));
      else if (c < 0x10000) bytes.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
      else bytes.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 0x3f), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
    }
    return bytes;
  }

  function percentDecode(text) {
    const bytes = utf8Bytes(text);
    const out = [];
    for (let i = 0; i < bytes.length; i++) {
      const b = bytes[i];
      if (b === 0x25 && isHex(String.fromCharCode(bytes[i + 1] ?? 0)) && isHex(String.fromCharCode(bytes[i + 2] ?? 0))) {
        out.push(parseInt(String.fromCharCode(bytes[i + 1], bytes[i + 2]), 16));
        i += 2;
      } else out.push(b);
    }
    return out;
  }

  // The Encoding Standard's UTF-8 decode without BOM: each maximal invalid sequence is one U+FFFD.
  function utf8Decode(bytes) {
    let out = "";
    let i = 0;
    while (i < bytes.length) {
      const b = bytes[i];
      if (b < 0x80) {
        out += String.fromCharCode(b);
        i++;
        continue;
      }
      let need, cp, lower = 0x80, upper = 0xbf;
      if (b >= 0xc2 && b <= 0xdf) [need, cp] = [1, b & 0x1f];
      else if (b >= 0xe0 && b <= 0xef) {
        [need, cp] = [2, b & 0xf];
        if (b === 0xe0) lower = 0xa0;
        if (b === 0xed) upper = 0x9f;
      } else if (b >= 0xf0 && b <= 0xf4) {
        [need, cp] = [3, b & 0x7];
        if (b === 0xf0) lower = 0x90;
        if (b === 0xf4) upper = 0x8f;
      } else {
        out += "\ufffd";
        i++;
        continue;
      }
      let j = i + 1;
      let ok = true;
      for (let k = 0; k < need; k++, j++) {
        const next = bytes[j];
        if (next === undefined || next < lower || next > upper) {
          ok = false; // the offending byte is read again, as the start of what follows
          break;
        }
        [lower, upper] = [0x80, 0xbf];
        cp = (cp << 6) | (next & 0x3f);
      }
      out += ok ? String.fromCodePoint(cp) : "\ufffd";
      i = j;
    }
    return out;
  }

  // Punycode (RFC 3492), for the non-ASCII labels of a domain.
  const BASE = 36, T_MIN = 1, T_MAX = 26, SKEW = 38, DAMP = 700;
  function adapt(delta, points, first) {
    delta = first ? Math.floor(delta / DAMP) : delta >> 1;
    delta += Math.floor(delta / points);
    let k = 0;
    for (; delta > ((BASE - T_MIN) * T_MAX) >> 1; k += BASE) delta = Math.floor(delta / (BASE - T_MIN));
    return k + Math.floor(((BASE - T_MIN + 1) * delta) / (delta + SKEW));
  }
  const threshold = (k, bias) => (k <= bias ? T_MIN : k >= bias + T_MAX ? T_MAX : k - bias);

  function punycodeEncode(label) {
    const points = Array.from(label, (ch) => ch.codePointAt(0));
    let out = "";
    for (const c of points) if (c < 0x80) out += String.fromCharCode(c);
    const basic = out.length;
    let handled = basic;
    if (basic > 0) out += "-";
    let n = 0x80, delta = 0, bias = 72;
    while (handled < points.length) {
      let m = Infinity;
      for (const c of points) if (c >= n && c < m) m = c;
      delta += (m - n) * (handled + 1);
      n = m;
      for (const c of points) {
        if (c < n) delta++;
        if (c !== n) continue;
        let q = delta;
        for (let k = BASE; ; k += BASE) {
          const t = threshold(k, bias);
          if (q < t) break;
          const d = t + ((q - t) % (BASE - t));
          out += String.fromCharCode(d < 26 ? 0x61 + d : 0x16 + d);
          q = Math.floor((q - t) / (BASE - t));
        }
        out += String.fromCharCode(q < 26 ? 0x61 + q : 0x16 + q);
        bias = adapt(delta, handled + 1, handled === basic);
        delta = 0;
        handled++;
      }
      delta++;
      n++;
    }
    return out;
  }

  // The label a punycode string stands for, or FAILURE.
  function punycodeDecode(input) {
    const cut = input.lastIndexOf("-");
    const points = [];
    for (let i = 0; i < Math.max(cut, 0); i++) {
      if (input.charCodeAt(i) >= 0x80) return FAILURE;
      points.push(input.charCodeAt(i));
    }
    let n = 0x80, bias = 72, i = 0;
    for (let p = cut > 0 ? cut + 1 : 0; p < input.length;) {
      const old = i;
      for (let w = 1, k = BASE; ; k += BASE) {
        if (p >= input.length) return FAILURE;
        const c = input.charCodeAt(p++);
        const d = c >= 0x30 && c <= 0x39 ? c - 0x16 : c >= 0x61 && c <= 0x7a ? c - 0x61 : c >= 0x41 && c <= 0x5a ? c - 0x41 : BASE;
        if (d >= BASE) return FAILURE;
        i += d * w;
        const t = threshold(k, bias);
        if (d < t) break;
        w *= BASE - t;
        if (i > 0x7fffffff || w > 0x7fffffff) return FAILURE;
      }
      bias = adapt(i - old, points.length + 1, old === 0);
      n += Math.floor(i / (points.length + 1));
      i %= points.length + 1;
      if (n > 0x10ffff) return FAILURE;
      points.splice(i++, 0, n);
    }
    return String.fromCodePoint(...points);
  }

  // Domain to ASCII, an approximation of UTS #46 (see the header): its mapping by lower-casing
  // and NFKC, its "ignored" code points dropped, and the code points it disallows approximated by
  // their general categories (unassigned, private use, controls, format characters, line and
  // paragraph separators; ZWJ and ZWNJ, which UTS #46 allows after a virama, always).
  const IGNORED = /[\u00ad\u034f\u180b-\u180f\u200b\u2060\u2064\ufe00-\ufe0f\ufeff\u{e0100}-\u{e01ef}]/gu;
  const DISALLOWED = /[\p{Cc}\p{Cf}\p{Cn}\p{Co}\p{Cs}\p{Zl}\p{Zp}\ufffd]/u;
  const isAscii = (text) => /^[\x00-\x7f]*$/.test(text);

  function domainToAscii(domain) {
    let result;
    if (isAscii(domain)) result = domain.toLowerCase();
    else {
      const mapped = domain.toLowerCase().replace(IGNORED, "").normalize("NFKC").toLowerCase()
        .replace(/[\u3002\uff0e\uff61]/g, ".").normalize("NFC");
      if (DISALLOWED.test(mapped.replace(/[\x00-\x7f]/g, ""))) return FAILURE; // ASCII: the forbidden code points' check
      const labels = mapped.split(".");
      if (labels.some((label) => !isAscii(label) && label.startsWith("xn--"))) return FAILURE; // "xn--" only ever prefixes ASCII
      result = labels.map((label) => (isAscii(label) ? label : "xn--" + punycodeEncode(label))).join(".");
    }
    for (const label of result.split(".")) {
      if (!label.startsWith("xn--")) continue;
      const decoded = punycodeDecode(label.slice(4));
      if (decoded === FAILURE || decoded === "" || DISALLOWED.test(decoded.replace(/[\x00-\x7f]/g, "")) ||
          decoded !== decoded.normalize("NFC") || decoded !== decoded.toLowerCase()) return FAILURE;
    }
    if (result === "") return FAILURE;
    return result;
  }

  const FORBIDDEN_HOST = /[\x00\t\n\r #/:<>?@[\\\]^|]/;
  const FORBIDDEN_DOMAIN = /[\x00-\x1f #%/:<>?@[\\\]^|\x7f]/;

  // A host as the URL holds it: serialized (IPv4 dotted, IPv6 in brackets, a domain or an opaque host).
  function parseHost(input, isOpaque) {
    if (input.startsWith("[")) {
      if (!input.endsWith("]")) return FAILURE;
      const address = parseIPv6(input.slice(1, -1));
      return address === FAILURE ? FAILURE : "[" + serializeIPv6(address) + "]";
    }
    if (isOpaque) {
      if (FORBIDDEN_HOST.test(input)) return FAILURE;
      return encodeString(input, C0_CONTROL);
    }
    const domain = utf8Decode(percentDecode(input));
    const ascii = domainToAscii(domain);
    if (ascii === FAILURE || FORBIDDEN_DOMAIN.test(ascii)) return FAILURE;
    if (endsInNumber(ascii)) {
      const address = parseIPv4(ascii);
      return address === FAILURE ? FAILURE : serializeIPv4(address);
    }
    return ascii;
  }

  function endsInNumber(input) {
    const parts = input.split(".");
    if (parts[parts.length - 1] === "") {
      if (parts.length === 1) return false;
      parts.pop();
    }
    const last = parts[parts.length - 1];
    if (last !== "" && /^[0-9]+$/.test(last)) return true;
    return parseIPv4Number(last) !== FAILURE;
  }

  function parseIPv4Number(input) {
    if (input === "") return FAILURE;
    let radix = 10;
    if (/^0[xX]/.test(input)) [input, radix] = [input.slice(2), 16];
    else if (input.length > 1 && input[0] === "0") [input, radix] = [input.slice(1), 8];
    if (input === "") return 0;
    const digits = radix === 10 ? /^[0-9]+$/ : radix === 16 ? /^[0-9A-Fa-f]+$/ : /^[0-7]+$/;
    return digits.test(input) ? parseInt(input, radix) : FAILURE;
  }

  function parseIPv4(input) {
    const parts = input.split(".");
    if (parts[parts.length - 1] === "" && parts.length > 1) parts.pop();
    if (parts.length > 4) return FAILURE;
    const numbers = [];
    for (const part of parts) {
      const n = parseIPv4Number(part);
      if (n === FAILURE) return FAILURE;
      numbers.push(n);
    }
    const last = numbers.pop();
    if (numbers.some((n) => n > 255) || last >= 256 ** (4 - numbers.length)) return FAILURE;
    return numbers.reduce((sum, n, i) => sum + n * 256 ** (3 - i), last);
  }

  const serializeIPv4 = (address) => [24, 16, 8, 0].map((shift) => Math.floor(address / 2 ** shift) % 256).join(".");

  function parseIPv6(input) {
    const address = [0, 0, 0, 0, 0, 0, 0, 0];
    let piece = 0, compress = null, p = 0;
    if (input[0] === ":") {
      if (input[1] !== ":") return FAILURE;
      p += 2;
      compress = ++piece;
    }
    while (p < input.length) {
      if (piece === 8) return FAILURE;
      if (input[p] === ":") {
        if (compress !== null) return FAILURE;
        p++;
        compress = ++piece;
        continue;
      }
      let value = 0, length = 0;
      while (length < 4 && isHex(input[p])) {
        value = value * 16 + parseInt(input[p], 16);
        p++;
        length++;
      }
      if (input[p] === ".") {
        if (length === 0) return FAILURE;
        p -= length;
        if (piece > 6) return FAILURE;
        let seen = 0;
        while (p < input.length) {
          let part = null;
          if (seen > 0) {
            if (input[p] === "." && seen < 4) p++;
            else return FAILURE;
          }
          if (!isDigit(input[p])) return FAILURE;
          while (isDigit(input[p])) {
            const digit = +input[p];
            if (part === null) part = digit;
            else if (part === 0) return FAILURE;
            else part = part * 10 + digit;
            if (part > 255) return FAILURE;
            p++;
          }
          address[piece] = address[piece] * 0x100 + part;
          seen++;
          if (seen === 2 || seen === 4) piece++;
        }
        if (seen !== 4) return FAILURE;
        break;
      } else if (input[p] === ":") {
        p++;
        if (p >= input.length) return FAILURE;
      } else if (p < input.length) return FAILURE;
      address[piece++] = value;
    }
    if (compress !== null) {
      let swaps = piece - compress;
      piece = 7;
      while (piece !== 0 && swaps > 0) {
        const other = compress + swaps - 1;
        [address[piece], address[other]] = [address[other], address[piece]];
        piece--;
        swaps--;
      }
    } else if (piece !== 8) return FAILURE;
    return address;
  }

  function serializeIPv6(address) {
    let best = -1, bestLength = 1; // the first longest run of two or more zero pieces
    for (let i = 0; i < 8;) {
      let j = i;
      while (j < 8 && address[j] === 0) j++;
      if (j - i > bestLength) [best, bestLength] = [i, j - i];
      i = j === i ? i + 1 : j;
    }
    let out = "";
    for (let i = 0; i < 8; i++) {
      if (i === best) {
        out += i === 0 ? "::" : ":";
        i += bestLength - 1;
        continue;
      }
      out += address[i].toString(16) + (i === 7 ? "" : ":");
    }
    return out;
  }

  // The URL record. Its path is a list of segments, or a string for an opaque path.
  const newRecord = () => ({ scheme: "", username: "", password: "", host: null, port: null, path: [], query: null, fragment: null });
  const isSpecial = (url) => isSpecialScheme(url.scheme);
  const hasCredentials = (url) => url.username !== "" || url.password !== "";
  const hasOpaquePath = (url) => typeof url.path === "string";
  const cannotHaveCredentialsOrPort = (url) => url.host === null || url.host === "" || url.scheme === "file";
  const isWindowsDriveLetter = (s) => s.length === 2 && isAlpha(s[0]) && (s[1] === ":" || s[1] === "|");
  const isNormalizedDriveLetter = (s) => s.length === 2 && isAlpha(s[0]) && s[1] === ":";
  const isSingleDot = (s) => s === "." || s.toLowerCase() === "%2e";
  const isDoubleDot = (s) => /^(\.|%2e)(\.|%2e)$/i.test(s);

  function startsWithDriveLetter(points, p) {
    return points.length - p >= 2 && isWindowsDriveLetter(points[p] + points[p + 1]) &&
      (points.length - p === 2 || "/\\?#".includes(points[p + 2]));
  }

  function shortenPath(url) {
    if (url.scheme === "file" && url.path.length === 1 && isNormalizedDriveLetter(url.path[0])) return;
    url.path.pop();
  }

  const S = {
    SCHEME_START: 1, SCHEME: 2, NO_SCHEME: 3, SPECIAL_RELATIVE_OR_AUTHORITY: 4, PATH_OR_AUTHORITY: 5, RELATIVE: 6,
    RELATIVE_SLASH: 7, SPECIAL_AUTHORITY_SLASHES: 8, SPECIAL_AUTHORITY_IGNORE_SLASHES: 9, AUTHORITY: 10, HOST: 11,
    HOSTNAME: 12, PORT: 13, FILE: 14, FILE_SLASH: 15, FILE_HOST: 16, PATH_START: 17, PATH: 18, OPAQUE_PATH: 19,
    QUERY: 20, FRAGMENT: 21,
  };

  // The basic URL parser: a new record, or FAILURE; with a url and a state override (a setter),
  // it changes that url in place and its result is not used.
  function basicParse(input, base = null, url = null, override = 0) {
    if (url === null) {
      url = newRecord();
      input = input.replace(/^[\x00-\x20]+|[\x00-\x20]+$/g, "");
    }
    input = input.replace(/[\t\n\r]/g, "");
    const points = Array.from(input);
    let state = override || S.SCHEME_START;
    let buffer = "", atSeen = false, insideBrackets = false, passwordSeen = false;
    for (let p = 0; ; p++) {
      const c = points[p]; // undefined: the end of input
      const special = isSpecial(url);
      const ends = c === undefined || c === "/" || c === "?" || c === "#" || (special && c === "\\");
      switch (state) {
        case S.SCHEME_START:
          if (isAlpha(c)) {
            buffer += c.toLowerCase();
            state = S.SCHEME;
          } else if (!override) {
            state = S.NO_SCHEME;
            p--;
          } else return FAILURE;
          break;
        case S.SCHEME:
          if (c !== undefined && /^[A-Za-z0-9+\-.]$/.test(c)) buffer += c.toLowerCase();
          else if (c === ":") {
            if (override) {
              if (special !== isSpecialScheme(buffer)) return url;
              if ((hasCredentials(url) || url.port !== null) && buffer === "file") return url;
              if (url.scheme === "file" && url.host === "") return url;
            }
            url.scheme = buffer;
            if (override) {
              if (url.port === SPECIAL[url.scheme]) url.port = null;
              return url;
            }
            buffer = "";
            if (url.scheme === "file") state = S.FILE;
            else if (isSpecial(url) && base !== null && base.scheme === url.scheme) state = S.SPECIAL_RELATIVE_OR_AUTHORITY;
            else if (isSpecial(url)) state = S.SPECIAL_AUTHORITY_SLASHES;
            else if (points[p + 1] === "/") {
              state = S.PATH_OR_AUTHORITY;
              p++;
            } else {
              url.path = "";
              state = S.OPAQUE_PATH;
            }
          } else if (!override) {
            buffer = "";
            state = S.NO_SCHEME;
            p = -1; // start over
          } else return FAILURE;
          break;
        case S.NO_SCHEME:
          if (base === null || (hasOpaquePath(base) && c !== "#")) return FAILURE;
          if (hasOpaquePath(base)) {
            Object.assign(url, { scheme: base.scheme, path: base.path, query: base.query, fragment: "" });
            state = S.FRAGMENT;
          } else {
            state = base.scheme === "file" ? S.FILE : S.RELATIVE;
            p--;
          }
          break;
        case S.SPECIAL_RELATIVE_OR_AUTHORITY:
          if (c === "/" && points[p + 1] === "/") {
            state = S.SPECIAL_AUTHORITY_IGNORE_SLASHES;
            p++;
          } else {
            state = S.RELATIVE;
            p--;
          }
          break;
        case S.PATH_OR_AUTHORITY:
          if (c === "/") state = S.AUTHORITY;
          else {
            state = S.PATH;
            p--;
          }
          break;
        case S.RELATIVE:
          url.scheme = base.scheme;
          if (c === "/" || (isSpecial(url) && c === "\\")) state = S.RELATIVE_SLASH;
          else {
            Object.assign(url, { username: base.username, password: base.password, host: base.host, port: base.port,
              path: base.path.slice(), query: base.query });
            if (c === "?") {
              url.query = "";
              state = S.QUERY;
            } else if (c === "#") {
              url.fragment = "";
              state = S.FRAGMENT;
            } else if (c !== undefined) {
              url.query = null;
              shortenPath(url);
              state = S.PATH;
              p--;
            }
          }
          break;
        case S.RELATIVE_SLASH:
          if (special && (c === "/" || c === "\\")) state = S.SPECIAL_AUTHORITY_IGNORE_SLASHES;
          else if (c === "/") state = S.AUTHORITY;
          else {
            Object.assign(url, { username: base.username, password: base.password, host: base.host, port: base.port });
            state = S.PATH;
            p--;
          }
          break;
        case S.SPECIAL_AUTHORITY_SLASHES:
          state = S.SPECIAL_AUTHORITY_IGNORE_SLASHES;
          if (c === "/" && points[p + 1] === "/") p++;
          else p--;
          break;
        case S.SPECIAL_AUTHORITY_IGNORE_SLASHES:
          if (c !== "/" && c !== "\\") {
            state = S.AUTHORITY;
            p--;
          }
          break;
        case S.AUTHORITY:
          if (c === "@") {
            if (atSeen) buffer = "%40" + buffer;
            atSeen = true;
            for (const ch of buffer) {
              if (ch === ":" && !passwordSeen) {
                passwordSeen = true;
                continue;
              }
              if (passwordSeen) url.password += encodeCodePoint(ch, USERINFO_SET);
              else url.username += encodeCodePoint(ch, USERINFO_SET);
            }
            buffer = "";
          } else if (ends) {
            if (atSeen && buffer === "") return FAILURE;
            p -= Array.from(buffer).length + 1;
            buffer = "";
            state = S.HOST;
          } else buffer += c;
          break;
        case S.HOST:
        case S.HOSTNAME:
          if (override && url.scheme === "file") {
            p--;
            state = S.FILE_HOST;
          } else if (c === ":" && !insideBrackets) {
            if (buffer === "" || override === S.HOSTNAME) return FAILURE;
            const host = parseHost(buffer, !special);
            if (host === FAILURE) return FAILURE;
            url.host = host;
            buffer = "";
            state = S.PORT;
          } else if (ends) {
            p--;
            if (special && buffer === "") return FAILURE;
            if (override && buffer === "" && (hasCredentials(url) || url.port !== null)) return FAILURE;
            const host = parseHost(buffer, !special);
            if (host === FAILURE) return FAILURE;
            url.host = host;
            buffer = "";
            if (override) return url;
            state = S.PATH_START;
          } else {
            if (c === "[") insideBrackets = true;
            if (c === "]") insideBrackets = false;
            buffer += c;
          }
          break;
        case S.PORT:
          if (isDigit(c)) buffer += c;
          else if (ends || override) {
            if (buffer !== "") {
              const port = parseInt(buffer, 10);
              if (port > 65535) return FAILURE;
              url.port = port === SPECIAL[url.scheme] ? null : port;
              buffer = "";
              if (override) return url;
            }
            if (override) return FAILURE;
            state = S.PATH_START;
            p--;
          } else return FAILURE;
          break;
        case S.FILE:
          url.scheme = "file";
          url.host = "";
          if (c === "/" || c === "\\") state = S.FILE_SLASH;
          else if (base !== null && base.scheme === "file") {
            Object.assign(url, { host: base.host, path: base.path.slice(), query: base.query });
            if (c === "?") {
              url.query = "";
              state = S.QUERY;
            } else if (c === "#") {
              url.fragment = "";
              state = S.FRAGMENT;
            } else if (c !== undefined) {
              url.query = null;
              if (!startsWithDriveLetter(points, p)) shortenPath(url);
              else url.path = [];
              state = S.PATH;
              p--;
            }
          } else {
            state = S.PATH;
            p--;
          }
          break;
        case S.FILE_SLASH:
          if (c === "/" || c === "\\") state = S.FILE_HOST;
          else {
            if (base !== null && base.scheme === "file") {
              url.host = base.host;
              if (!startsWithDriveLetter(points, p) && base.path.length > 0 && isNormalizedDriveLetter(base.path[0])) {
                url.path.push(base.path[0]);
              }
            }
            state = S.PATH;
            p--;
          }
          break;
        case S.FILE_HOST:
          if (c === undefined || c === "/" || c === "\\" || c === "?" || c === "#") {
            p--;
            if (!override && isWindowsDriveLetter(buffer)) state = S.PATH; // the buffer starts the path
            else if (buffer === "") {
              url.host = "";
              if (override) return url;
              state = S.PATH_START;
            } else {
              let host = parseHost(buffer, !special);
              if (host === FAILURE) return FAILURE;
              if (host === "localhost") host = "";
              url.host = host;
              if (override) return url;
              buffer = "";
              state = S.PATH_START;
            }
          } else buffer += c;
          break;
        case S.PATH_START:
          if (special) {
            state = S.PATH;
            if (c !== "/" && c !== "\\") p--;
          } else if (!override && c === "?") {
            url.query = "";
            state = S.QUERY;
          } else if (!override && c === "#") {
            url.fragment = "";
            state = S.FRAGMENT;
          } else if (c !== undefined) {
            state = S.PATH;
            if (c !== "/") p--;
          } else if (override && url.host === null) url.path.push("");
          break;
        case S.PATH:
          if (c === undefined || c === "/" || (special && c === "\\") || (!override && (c === "?" || c === "#"))) {
            const slash = c === "/" || (special && c === "\\");
            if (isDoubleDot(buffer)) {
              shortenPath(url);
              if (!slash) url.path.push("");
            } else if (isSingleDot(buffer) && !slash) url.path.push("");
            else if (!isSingleDot(buffer)) {
              if (url.scheme === "file" && url.path.length === 0 && isWindowsDriveLetter(buffer)) buffer = buffer[0] + ":";
              url.path.push(buffer);
            }
            buffer = "";
            if (c === "?") {
              url.query = "";
              state = S.QUERY;
            } else if (c === "#") {
              url.fragment = "";
              state = S.FRAGMENT;
            }
          } else buffer += encodeCodePoint(c, PATH_SET);
          break;
        case S.OPAQUE_PATH:
          if (c === "?") {
            url.query = "";
            state = S.QUERY;
          } else if (c === "#") {
            url.fragment = "";
            state = S.FRAGMENT;
          } else if (c !== undefined) url.path += encodeCodePoint(c, C0_CONTROL);
          break;
        case S.QUERY:
          if (c === undefined || (!override && c === "#")) {
            url.query += encodeString(buffer, special ? SPECIAL_QUERY_SET : QUERY_SET);
            buffer = "";
            if (c === "#") {
              url.fragment = "";
              state = S.FRAGMENT;
            }
          } else buffer += c;
          break;
        case S.FRAGMENT:
          if (c !== undefined) url.fragment += encodeCodePoint(c, FRAGMENT_SET);
          break;
      }
      if (p >= points.length) break;
    }
    return url;
  }

  const serializePath = (url) => (hasOpaquePath(url) ? url.path : url.path.map((segment) => "/" + segment).join(""));

  function serialize(url, excludeFragment = false) {
    let out = url.scheme + ":";
    if (url.host !== null) {
      out += "//";
      if (hasCredentials(url)) out += url.username + (url.password !== "" ? ":" + url.password : "") + "@";
      out += url.host + (url.port !== null ? ":" + url.port : "");
    } else if (!hasOpaquePath(url) && url.path.length > 1 && url.path[0] === "") out += "/.";
    out += serializePath(url);
    if (url.query !== null) out += "?" + url.query;
    if (!excludeFragment && url.fragment !== null) out += "#" + url.fragment;
    return out;
  }

  function origin(url) {
    if (url.scheme === "blob") {
      const inner = basicParse(serializePath(url));
      return inner !== FAILURE && (inner.scheme === "http" || inner.scheme === "https") ? origin(inner) : "null";
    }
    if (isSpecial(url) && url.scheme !== "file") return url.scheme + "://" + url.host + (url.port !== null ? ":" + url.port : "");
    return "null";
  }

  function stripTrailingSpaces(url) {
    if (!hasOpaquePath(url) || url.fragment !== null || url.query !== null) return;
    url.path = url.path.replace(/ +$/, "");
  }

  // application/x-www-form-urlencoded
  function parseForm(input) {
    const list = [];
    for (const sequence of input.split("&")) {
      if (sequence === "") continue;
      const at = sequence.indexOf("=");
      const name = at < 0 ? sequence : sequence.slice(0, at);
      const value = at < 0 ? "" : sequence.slice(at + 1);
      list.push([utf8Decode(percentDecode(name.replace(/\+/g, " "))), utf8Decode(percentDecode(value.replace(/\+/g, " ")))]);
    }
    return list;
  }

  const serializeForm = (list) => list.map(([n, v]) => encodeString(n, FORM_SET, true) + "=" + encodeString(v, FORM_SET, true)).join("&");

  function needArguments(given, needed, what) {
    if (given < needed) throw new TypeError(what + ": " + needed + " argument" + (needed > 1 ? "s" : "") + " required, but only " + given + " present");
  }

  // The seams between the two classes, set by their static blocks: no internals on any object.
  let paramsOf, setParams, linkParams, setQuery;

  class URLSearchParams {
    #list = [];
    #url = null; // the URL whose query this is, or null

    constructor(init = "") {
      if (init !== null && (typeof init === "object" || typeof init === "function")) {
        if (init[Symbol.iterator] !== undefined) {
          for (const pair of init) {
            if (pair === null || (typeof pair !== "object" && typeof pair !== "function")) {
              throw new TypeError("URLSearchParams: each pair must be a sequence of a name and a value");
            }
            const items = Array.from(pair, usv);
            if (items.length !== 2) throw new TypeError("URLSearchParams: each pair must have exactly two items");
            this.#list.push(items);
          }
        } else {
          for (const key of Reflect.ownKeys(init)) {
            const desc = Reflect.getOwnPropertyDescriptor(init, key);
            if (desc !== undefined && desc.enumerable) this.#list.push([usv(key), usv(init[key])]);
          }
        }
      } else {
        const text = usv(init);
        this.#list = parseForm(text.startsWith("?") ? text.slice(1) : text);
      }
    }

    static {
      paramsOf = (params) => params.#list;
      setParams = (params, list) => { params.#list = list; };
      linkParams = (params, url) => { params.#url = url; };
    }

    #update() {
      if (this.#url === null) return;
      const text = serializeForm(this.#list);
      setQuery(this.#url, text === "" ? null : text);
    }

    get size() {
      return this.#list.length;
    }

    append(name, value) {
      needArguments(arguments.length, 2, "URLSearchParams.append");
      this.#list.push([usv(name), usv(value)]);
      this.#update();
    }

    delete(name, value = undefined) {
      needArguments(arguments.length, 1, "URLSearchParams.delete");
      name = usv(name);
      if (value === undefined) this.#list = this.#list.filter(([n]) => n !== name);
      else {
        value = usv(value);
        this.#list = this.#list.filter(([n, v]) => n !== name || v !== value);
      }
      this.#update();
    }

    get(name) {
      needArguments(arguments.length, 1, "URLSearchParams.get");
      name = usv(name);
      const pair = this.#list.find(([n]) => n === name);
      return pair === undefined ? null : pair[1];
    }

    getAll(name) {
      needArguments(arguments.length, 1, "URLSearchParams.getAll");
      name = usv(name);
      return this.#list.filter(([n]) => n === name).map(([, v]) => v);
    }

    has(name, value = undefined) {
      needArguments(arguments.length, 1, "URLSearchParams.has");
      name = usv(name);
      if (value === undefined) return this.#list.some(([n]) => n === name);
      value = usv(value);
      return this.#list.some(([n, v]) => n === name && v === value);
    }

    set(name, value) {
      needArguments(arguments.length, 2, "URLSearchParams.set");
      [name, value] = [usv(name), usv(value)];
      const first = this.#list.findIndex(([n]) => n === name);
      if (first < 0) this.#list.push([name, value]);
      else {
        this.#list[first] = [name, value];
        this.#list = this.#list.filter(([n], i) => i <= first || n !== name);
      }
      this.#update();
    }

    sort() {
      // Array.prototype.sort is stable; "<" compares strings by UTF-16 code units, as the standard sorts.
      this.#list.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      this.#update();
    }

    forEach(callback, thisArg = undefined) {
      needArguments(arguments.length, 1, "URLSearchParams.forEach");
      if (typeof callback !== "function") throw new TypeError("URLSearchParams.forEach: the callback is not a function");
      for (let i = 0; i < this.#list.length; i++) {
        const [name, value] = this.#list[i];
        callback.call(thisArg, value, name, this);
      }
    }

    entries() {
      return makeIterator(this, "entries");
    }

    keys() {
      return makeIterator(this, "keys");
    }

    values() {
      return makeIterator(this, "values");
    }

    toString() {
      return serializeForm(this.#list);
    }
  }

  // WebIDL's iterator: live (it reads the list by index as it goes), its next() on a shared
  // prototype made on first use, its state in a WeakMap.
  let iteratorPrototype = null;
  const iteratorState = new WeakMap();
  function makeIterator(params, kind) {
    if (iteratorPrototype === null) {
      iteratorPrototype = Object.create(Object.getPrototypeOf(Object.getPrototypeOf([][Symbol.iterator]())), {
        next: {
          value: function next() {
            const s = iteratorState.get(this);
            if (s === undefined) throw new TypeError("next called on an object that is not a URLSearchParams Iterator");
            const list = paramsOf(s.params);
            if (s.index >= list.length) return { value: undefined, done: true };
            const [name, value] = list[s.index++];
            return { value: s.kind === "keys" ? name : s.kind === "values" ? value : [name, value], done: false };
          },
          writable: true, configurable: true, enumerable: true,
        },
        [Symbol.toStringTag]: { value: "URLSearchParams Iterator", configurable: true },
      });
    }
    const iterator = Object.create(iteratorPrototype);
    iteratorState.set(iterator, { params, kind, index: 0 });
    return iterator;
  }

  Object.defineProperties(URLSearchParams.prototype, {
    [Symbol.iterator]: { value: URLSearchParams.prototype.entries, writable: true, configurable: true },
    [Symbol.toStringTag]: { value: "URLSearchParams", configurable: true },
  });

  function parseOrNull(url, base) {
    let parsedBase = null;
    if (base !== undefined) {
      parsedBase = basicParse(usv(base));
      if (parsedBase === FAILURE) return FAILURE;
    }
    return basicParse(usv(url), parsedBase);
  }

  class URL {
    #url;
    #query;

    constructor(url, base = undefined) {
      needArguments(arguments.length, 1, "URL constructor");
      const parsed = parseOrNull(url, base);
      if (parsed === FAILURE) {
        throw new TypeError("Invalid URL: " + usv(url) + (base === undefined ? "" : " (against the base " + usv(base) + ")"));
      }
      this.#url = parsed;
      this.#query = new URLSearchParams(); // the query parsed as it is: a leading "?" in it is data
      setParams(this.#query, parsed.query === null ? [] : parseForm(parsed.query));
      linkParams(this.#query, this);
    }

    static {
      setQuery = (url, query) => {
        url.#url.query = query;
        if (query === null) stripTrailingSpaces(url.#url);
      };
    }

    static canParse(url, base = undefined) {
      needArguments(arguments.length, 1, "URL.canParse");
      return parseOrNull(url, base) !== FAILURE;
    }

    static parse(url, base = undefined) {
      needArguments(arguments.length, 1, "URL.parse");
      return parseOrNull(url, base) === FAILURE ? null : new URL(url, base);
    }

    get href() {
      return serialize(this.#url);
    }

    set href(value) {
      value = usv(value);
      const parsed = basicParse(value);
      if (parsed === FAILURE) throw new TypeError("Invalid URL: " + value);
      this.#url = parsed;
      setParams(this.#query, parsed.query === null ? [] : parseForm(parsed.query));
    }

    get origin() {
      return origin(this.#url);
    }

    get protocol() {
      return this.#url.scheme + ":";
    }

    set protocol(value) {
      basicParse(usv(value) + ":", null, this.#url, S.SCHEME_START);
    }

    get username() {
      return this.#url.username;
    }

    set username(value) {
      if (cannotHaveCredentialsOrPort(this.#url)) return;
      this.#url.username = encodeString(usv(value), USERINFO_SET);
    }

    get password() {
      return this.#url.password;
    }

    set password(value) {
      if (cannotHaveCredentialsOrPort(this.#url)) return;
      this.#url.password = encodeString(usv(value), USERINFO_SET);
    }

    get host() {
      const url = this.#url;
      if (url.host === null) return "";
      return url.port === null ? url.host : url.host + ":" + url.port;
    }

    set host(value) {
      if (hasOpaquePath(this.#url)) return;
      basicParse(usv(value), null, this.#url, S.HOST);
    }

    get hostname() {
      return this.#url.host ?? "";
    }

    set hostname(value) {
      if (hasOpaquePath(this.#url)) return;
      basicParse(usv(value), null, this.#url, S.HOSTNAME);
    }

    get port() {
      return this.#url.port === null ? "" : String(this.#url.port);
    }

    set port(value) {
      if (cannotHaveCredentialsOrPort(this.#url)) return;
      value = usv(value);
      if (value === "") this.#url.port = null;
      else basicParse(value, null, this.#url, S.PORT);
    }

    get pathname() {
      return serializePath(this.#url);
    }

    set pathname(value) {
      if (hasOpaquePath(this.#url)) return;
      this.#url.path = [];
      basicParse(usv(value), null, this.#url, S.PATH_START);
    }

    get search() {
      const query = this.#url.query;
      return query === null || query === "" ? "" : "?" + query;
    }

    set search(value) {
      value = usv(value);
      const url = this.#url;
      if (value === "") {
        url.query = null;
        setParams(this.#query, []);
        stripTrailingSpaces(url);
        return;
      }
      const input = value.startsWith("?") ? value.slice(1) : value;
      url.query = "";
      basicParse(input, null, url, S.QUERY);
      // The query as set (tabs and newlines dropped, as Node and browsers do), not the raw input.
      setParams(this.#query, parseForm(url.query));
    }

    get searchParams() {
      return this.#query;
    }

    get hash() {
      const fragment = this.#url.fragment;
      return fragment === null || fragment === "" ? "" : "#" + fragment;
    }

    set hash(value) {
      value = usv(value);
      const url = this.#url;
      if (value === "") {
        url.fragment = null;
        stripTrailingSpaces(url);
        return;
      }
      url.fragment = "";
      basicParse(value.startsWith("#") ? value.slice(1) : value, null, url, S.FRAGMENT);
    }

    toString() {
      return serialize(this.#url);
    }

    toJSON() {
      return serialize(this.#url);
    }
  }

  Object.defineProperty(URL.prototype, Symbol.toStringTag, { value: "URL", configurable: true });
  // WebIDL: attributes and operations are enumerable (for-in over a URL lists href, origin, ...).
  for (const target of [URL, URL.prototype, URLSearchParams.prototype]) {
    for (const key of Object.getOwnPropertyNames(target)) {
      if (!["constructor", "prototype", "length", "name"].includes(key)) Object.defineProperty(target, key, { enumerable: true });
    }
  }

  return { URL, URLSearchParams };
})();
