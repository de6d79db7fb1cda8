// A ksm smart-module guest in plain JavaScript (world `ksm:smart-module@1.0.0`,
// `smart-module`), componentized with componentize-js (StarlingMonkey).
//
// It ports the Rust reference guest (guest/src/) faithfully, with no npm
// runtime dependency:
// - subscription filtering (exact, case-sensitive; a lone `*` matches all);
// - the MODE Event JSON, keys in the reference order, eventData re-serialised
//   exactly as serde_json (preserve_order) does: keys in document order, a
//   duplicate key keeps its first position and its last value, numbers as
//   u64 / i64 / f64 with serde_json's parsing (float_roundtrip: every float
//   to its nearest double) and zmij's formatting (serde_json 1.0.154);
// - event payload errors with serde_json's byte offsets (a JSON parser that
//   follows serde_json's control flow, not JSON.parse, which reorders
//   integer-like keys and rounds big integers);
// - bulk data: hand-written MessagePack scanning returning spans of the
//   payload, as bulk.rs;
// - UUIDv4 partition keys from crypto.getRandomValues (wasi:random);
// - size limits (data bytes plus partition-key bytes, inclusive).
//
// WIT values in JS (componentize-js conventions): records are objects with
// camelCase fields, u64 is a BigInt, u32 a Number, list<u8> a Uint8Array,
// option<T> is T or undefined, a variant is { tag, val }, and a function
// returning result<T, E> returns T or throws the E value.

// ---------------------------------------------------------------------------
// Errors (the WIT `error` variant)

/** Thrown for the `err` side of a result: the WIT `error` value itself. */
function guestError(tag, val) {
  return val === undefined ? { tag } : { tag, val };
}

const invalidField = (field, detail) => guestError('invalid-field', { field, detail });
const malformed = (offset, detail) =>
  guestError('malformed-payload', { offset: BigInt(offset), detail });

// ---------------------------------------------------------------------------
// Text helpers

// ignoreBOM: keep a leading U+FEFF, as Rust's from_utf8 does.
const utf8Strict = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const utf8Lossy = new TextDecoder('utf-8', { ignoreBOM: true });
const utf8Encoder = new TextEncoder();
const HEX = '0123456789abcdef';
// Control characters that make a JSON string invalid.
const CONTROL = /[\u0000-\u001f]/;

/**
 * Index of the first byte of the first invalid UTF-8 sequence in `bytes`
 * (Rust's `Utf8Error::valid_up_to`), or `bytes.length` if all is valid.
 */
function utf8ValidUpTo(bytes) {
  const n = bytes.length;
  let i = 0;
  while (i < n) {
    const c = bytes[i];
    if (c < 0x80) {
      i += 1;
      continue;
    }
    let need;
    let lo = 0x80;
    let hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c === 0xe0) { need = 2; lo = 0xa0; }
    else if ((c >= 0xe1 && c <= 0xec) || c === 0xee || c === 0xef) need = 2;
    else if (c === 0xed) { need = 2; hi = 0x9f; }
    else if (c === 0xf0) { need = 3; lo = 0x90; }
    else if (c >= 0xf1 && c <= 0xf3) need = 3;
    else if (c === 0xf4) { need = 3; hi = 0x8f; }
    else return i;
    if (i + 1 >= n) return i;
    const c1 = bytes[i + 1];
    if (c1 < lo || c1 > hi) return i;
    for (let k = 2; k <= need; k++) {
      if (i + k >= n) return i;
      const ck = bytes[i + k];
      if (ck < 0x80 || ck > 0xbf) return i;
    }
    i += need + 1;
  }
  return n;
}

// ---------------------------------------------------------------------------
// JSON: a parser following serde_json 1.x (`from_slice` into a `Value`,
// features `preserve_order`, no `float_roundtrip`, no `arbitrary_precision`),
// so that values, duplicate keys, numbers and error offsets come out as the
// reference guest's.
//
// Values: null, true/false, JS strings, JsonNumber, arrays, and Maps (which
// keep insertion order; `set` on an existing key keeps its position, as
// IndexMap's `insert` does).

/** A JSON number as serde_json keeps it: its serialised text, and whether it is a u64. */
class JsonNumber {
  constructor(text, unsigned) {
    this.text = text;
    this.unsigned = unsigned; // a u64 (non-negative integer, `as_u64` is Some)
  }
}

/** A syntax error, offset already computed as the reference guest does. */
class JsonFault {
  constructor(offset, detail) {
    this.offset = offset;
    this.detail = detail;
  }
}

const U64_MAX = 0xffffffffffffffffn;
const TWO_POW_63 = 0x8000000000000000n;

// Parser state (one parse at a time).
const EMPTY = new Uint8Array(0);
let buf = EMPTY;
let len = 0;
let pos = 0;
// Where the number being scanned starts (its `-`, or its first digit).
let numberStart = 0;
let depth = 128;
// Whitespace bytes skipped so far (a value is compact if none were skipped
// inside it), and where the top-level object's last `eventData` lies.
let skipped = 0;
let eventDataSpan = null;
// Scratch for strings with escapes.
let scratch = new Uint8Array(256);
let scratchLen = 0;

function scratchPush(byte) {
  if (scratchLen === scratch.length) growScratch(1);
  scratch[scratchLen++] = byte;
}

function scratchAppend(bytes) {
  if (scratchLen + bytes.length > scratch.length) growScratch(bytes.length);
  scratch.set(bytes, scratchLen);
  scratchLen += bytes.length;
}

function growScratch(extra) {
  let size = scratch.length * 2;
  while (size < scratchLen + extra) size *= 2;
  const bigger = new Uint8Array(size);
  bigger.set(scratch.subarray(0, scratchLen));
  scratch = bigger;
}

function lineStart(i) {
  return i === 0 ? 0 : buf.lastIndexOf(10, i - 1) + 1;
}

/**
 * The reference guest's offset for a serde_json error at index `i` (what
 * serde_json turns into line and column): the byte before `i`, or `i`
 * itself at the start of a line.
 */
function offsetAt(i) {
  const start = lineStart(i);
  const column = i - start;
  return Math.min(column === 0 ? start : start + column - 1, len);
}

function lineNumber(i) {
  let line = 1;
  for (let k = buf.indexOf(10); k >= 0 && k < i; k = buf.indexOf(10, k + 1)) line++;
  return line;
}

/** Where serde_json says an error is, for people: `line L column C`. */
function lineColumn(i) {
  return `line ${lineNumber(i)} column ${i - lineStart(i)}`;
}

/** serde_json `error` (at the index after the byte just read). */
function syntaxError(message) {
  return new JsonFault(offsetAt(pos), `${message} at ${lineColumn(pos)}`);
}

/** serde_json `peek_error` (at the byte peeked). */
function peekError(message) {
  const i = Math.min(len, pos + 1);
  return new JsonFault(offsetAt(i), `${message} at ${lineColumn(i)}`);
}

/** An error of serde_json's `Eof` category: reported at the payload's end. */
function eofError(message) {
  return new JsonFault(len, `${message} at ${lineColumn(len)}`);
}

function skipWhitespace() {
  while (pos < len) {
    const c = buf[pos];
    if (c === 0x20 || c === 0x0a || c === 0x09 || c === 0x0d) {
      pos++;
      skipped++;
    } else {
      return c;
    }
  }
  return -1;
}

/** Parses a whole payload: one value, then only whitespace. */
function parseJson(bytes) {
  buf = bytes;
  len = bytes.length;
  pos = 0;
  depth = 128;
  eventDataSpan = null;
  const value = parseValue();
  if (skipWhitespace() >= 0) throw peekError('trailing characters');
  return value;
}

function parseValue() {
  const c = skipWhitespace();
  if (c < 0) throw eofError('EOF while parsing a value');
  switch (c) {
    case 0x6e: // n
      pos++;
      parseIdent('ull');
      return null;
    case 0x74: // t
      pos++;
      parseIdent('rue');
      return true;
    case 0x66: // f
      pos++;
      parseIdent('alse');
      return false;
    case 0x2d: // -
      numberStart = pos;
      pos++;
      return parseInteger(false);
    case 0x22: // "
      pos++;
      return parseString();
    case 0x5b: { // [
      if (--depth === 0) throw peekError('recursion limit exceeded');
      pos++;
      const items = parseArrayItems();
      depth++;
      skipWhitespace();
      pos++; // the `]` that ended the items
      return items;
    }
    case 0x7b: { // {
      if (--depth === 0) throw peekError('recursion limit exceeded');
      pos++;
      const map = parseObjectEntries();
      depth++;
      skipWhitespace();
      pos++; // the `}` that ended the entries
      return map;
    }
    default:
      if (c >= 0x30 && c <= 0x39) {
        numberStart = pos;
        return parseInteger(true);
      }
      throw peekError('expected value');
  }
}

function parseIdent(rest) {
  for (let i = 0; i < rest.length; i++) {
    if (pos >= len) throw eofError('EOF while parsing a value');
    const c = buf[pos++];
    if (c !== rest.charCodeAt(i)) throw syntaxError('expected ident');
  }
}

function parseArrayItems() {
  const items = [];
  let first = true;
  for (;;) {
    const c = skipWhitespace();
    if (c < 0) throw eofError('EOF while parsing a list');
    if (c === 0x5d) return items; // ]
    if (first) {
      first = false;
    } else if (c === 0x2c) { // ,
      pos++;
      const d = skipWhitespace();
      if (d === 0x5d) throw peekError('trailing comma');
      if (d < 0) throw eofError('EOF while parsing a value');
    } else {
      throw peekError('expected `,` or `]`');
    }
    items.push(parseValue());
  }
}

function parseObjectEntries() {
  const map = new Map();
  const topLevel = depth === 127;
  let first = true;
  for (;;) {
    const c = skipWhitespace();
    if (c < 0) throw eofError('EOF while parsing an object');
    if (c === 0x7d) return map; // }
    if (first) {
      first = false;
      if (c !== 0x22) throw peekError('key must be a string');
    } else if (c === 0x2c) { // ,
      pos++;
      const d = skipWhitespace();
      if (d === 0x7d) throw peekError('trailing comma');
      if (d < 0) throw eofError('EOF while parsing a value');
      if (d !== 0x22) throw peekError('key must be a string');
    } else {
      throw peekError('expected `,` or `}`');
    }
    pos++; // the key's opening quote
    const key = parseString();
    const colon = skipWhitespace();
    if (colon < 0) throw eofError('EOF while parsing an object');
    if (colon !== 0x3a) throw peekError('expected `:`');
    pos++;
    if (topLevel && key === 'eventData') {
      skipWhitespace();
      const start = pos;
      const before = skipped;
      map.set(key, parseValue());
      eventDataSpan = { start, end: pos, compact: skipped === before };
    } else {
      map.set(key, parseValue());
    }
  }
}

/** A string whose opening quote was just read. */
function parseString() {
  let start = pos;
  // Fast path: no escape and no control character up to the next quote,
  // all in native calls (a large string would be slow byte by byte in an
  // interpreter). Else serde_json's loop, which gives its errors in its
  // order: runs of plain bytes, escapes, the closing quote.
  let nextQuote = buf.indexOf(0x22, pos);
  if (nextQuote >= 0) {
    const end = nextQuote;
    const raw = buf.subarray(pos, end);
    if (raw.indexOf(0x5c) < 0) {
      let text;
      try {
        text = utf8Strict.decode(raw);
      } catch {
        text = undefined;
      }
      if (text !== undefined && !CONTROL.test(text)) {
        pos = end + 1;
        return text;
      }
    }
  }
  let escaped = false;
  scratchLen = 0;
  for (;;) {
    // `nextQuote` is kept so that a string with many escapes is not
    // searched to its end again after each one.
    if (nextQuote >= 0 && nextQuote < pos) nextQuote = buf.indexOf(0x22, pos);
    pos = plainRunEnd(pos, nextQuote < 0 ? len : nextQuote);
    if (pos === len) throw eofError('EOF while parsing a string');
    const c = buf[pos];
    if (c === 0x22) {
      let bytes;
      if (escaped) {
        scratchAppend(buf.subarray(start, pos));
        bytes = scratch.subarray(0, scratchLen);
      } else {
        bytes = buf.subarray(start, pos);
      }
      pos++;
      return asString(bytes);
    }
    if (c === 0x5c) {
      scratchAppend(buf.subarray(start, pos));
      escaped = true;
      pos++;
      parseEscape();
      start = pos;
    } else {
      pos++;
      throw syntaxError('control character (\\u0000-\\u001F) found while parsing a string');
    }
  }
}

/**
 * The index of the first `"`, `\` or control character at or after `p`
 * (`len` if none), knowing that the next `"` is at `quote` (or `len`).
 * Long runs are checked with native calls, short ones byte by byte.
 */
function plainRunEnd(p, quote) {
  if (quote - p >= 64) {
    const backslash = buf.subarray(p, quote).indexOf(0x5c);
    const end = backslash < 0 ? quote : p + backslash;
    // The run ends at `end` unless it holds a control character (which,
    // being ASCII, survives lossy decoding of any invalid UTF-8 around it).
    if (!CONTROL.test(utf8Lossy.decode(buf.subarray(p, end)))) return end;
  }
  while (p < len) {
    const c = buf[p];
    if (c === 0x22 || c === 0x5c || c < 0x20) break;
    p++;
  }
  return p;
}

/** serde_json `as_str`: UTF-8 check of a string's content at its closing quote. */
function asString(bytes) {
  try {
    return utf8Strict.decode(bytes);
  } catch {
    const validUpTo = utf8ValidUpTo(bytes);
    const start = lineStart(pos);
    const column = Math.max(0, pos - start - (bytes.length - validUpTo));
    const offset = Math.min(column === 0 ? start : start + column - 1, len);
    throw new JsonFault(offset, `invalid unicode code point at line ${lineNumber(pos)} column ${column}`);
  }
}

function parseEscape() {
  if (pos >= len) throw eofError('EOF while parsing a string');
  const c = buf[pos++];
  switch (c) {
    case 0x22: scratchPush(0x22); break;
    case 0x5c: scratchPush(0x5c); break;
    case 0x2f: scratchPush(0x2f); break;
    case 0x62: scratchPush(0x08); break;
    case 0x66: scratchPush(0x0c); break;
    case 0x6e: scratchPush(0x0a); break;
    case 0x72: scratchPush(0x0d); break;
    case 0x74: scratchPush(0x09); break;
    case 0x75: parseUnicodeEscape(); break;
    default: throw syntaxError('invalid escape');
  }
}

function hexValue(c) {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  return -1;
}

function decodeHexEscape() {
  if (pos + 4 > len) {
    pos = len;
    throw eofError('EOF while parsing a string');
  }
  const a = hexValue(buf[pos]);
  const b = hexValue(buf[pos + 1]);
  const c = hexValue(buf[pos + 2]);
  const d = hexValue(buf[pos + 3]);
  pos += 4;
  if (a < 0 || b < 0 || c < 0 || d < 0) throw syntaxError('invalid escape');
  return (a << 12) | (b << 8) | (c << 4) | d;
}

function parseUnicodeEscape() {
  const n1 = decodeHexEscape();
  if (n1 >= 0xdc00 && n1 <= 0xdfff) throw syntaxError('lone leading surrogate in hex escape');
  if (n1 < 0xd800 || n1 > 0xdbff) {
    pushCodePoint(n1);
    return;
  }
  if (pos >= len) throw eofError('EOF while parsing a string');
  if (buf[pos] !== 0x5c) {
    pos++;
    throw syntaxError('unexpected end of hex escape');
  }
  pos++;
  if (pos >= len) throw eofError('EOF while parsing a string');
  if (buf[pos] !== 0x75) {
    pos++;
    throw syntaxError('unexpected end of hex escape');
  }
  pos++;
  const n2 = decodeHexEscape();
  if (n2 < 0xdc00 || n2 > 0xdfff) throw syntaxError('lone leading surrogate in hex escape');
  pushCodePoint((((n1 - 0xd800) << 10) | (n2 - 0xdc00)) + 0x10000);
}

function pushCodePoint(n) {
  if (n < 0x80) {
    scratchPush(n);
  } else if (n < 0x800) {
    scratchPush(0xc0 | (n >> 6));
    scratchPush(0x80 | (n & 0x3f));
  } else if (n < 0x10000) {
    scratchPush(0xe0 | (n >> 12));
    scratchPush(0x80 | ((n >> 6) & 0x3f));
    scratchPush(0x80 | (n & 0x3f));
  } else {
    scratchPush(0xf0 | (n >> 18));
    scratchPush(0x80 | ((n >> 12) & 0x3f));
    scratchPush(0x80 | ((n >> 6) & 0x3f));
    scratchPush(0x80 | (n & 0x3f));
  }
}

// --- numbers ---------------------------------------------------------------
// A significand is a Number while below 2^53 (exact), a BigInt above.

const isDigit = (c) => c >= 0x30 && c <= 0x39;
const peekOrNull = () => (pos < len ? buf[pos] : 0);

/** significand * 10 + digit, or null when that overflows u64. */
function mulAdd(sig, digit) {
  if (typeof sig === 'number') {
    const r = sig * 10 + digit;
    if (r <= Number.MAX_SAFE_INTEGER) return r;
    sig = BigInt(sig);
  }
  const r = sig * 10n + BigInt(digit);
  return r > U64_MAX ? null : r;
}

const toF64 = (sig) => (typeof sig === 'number' ? sig : Number(sig));
const isZero = (sig) => sig === 0 || sig === 0n;

function parseInteger(positive) {
  if (pos >= len) throw eofError('EOF while parsing a value');
  const c = buf[pos++];
  if (c === 0x30) {
    if (isDigit(peekOrNull())) throw peekError('invalid number');
    return parseNumber(positive, 0);
  }
  if (c >= 0x31 && c <= 0x39) {
    let sig = c - 0x30;
    for (;;) {
      const d = peekOrNull();
      if (!isDigit(d)) return parseNumber(positive, sig);
      const next = mulAdd(sig, d - 0x30);
      if (next === null) return floatNumber(parseLongInteger(positive, sig));
      pos++;
      sig = next;
    }
  }
  throw syntaxError('invalid number');
}

function parseNumber(positive, sig) {
  const c = peekOrNull();
  if (c === 0x2e) return floatNumber(parseDecimal(positive, sig));
  if (c === 0x65 || c === 0x45) return floatNumber(parseExponent(positive, sig));
  if (positive) return new JsonNumber(String(sig), true);
  // i64 when it fits and is not -0; else f64.
  if (isZero(sig) || (typeof sig !== 'number' && sig > TWO_POW_63)) {
    return floatNumber(-toF64(sig));
  }
  return new JsonNumber(`-${sig}`, false);
}

function parseDecimal(positive, sig) {
  pos++; // .
  let digits = 0;
  for (;;) {
    const c = peekOrNull();
    if (!isDigit(c)) break;
    const next = mulAdd(sig, c - 0x30);
    if (next === null) return parseDecimalOverflow(positive, sig);
    pos++;
    sig = next;
    digits += 1;
  }
  if (digits === 0) {
    if (pos < len) throw peekError('invalid number');
    throw eofError('EOF while parsing a value');
  }
  const c = peekOrNull();
  if (c === 0x65 || c === 0x45) return parseExponent(positive, sig);
  return f64FromParts();
}

function parseExponent(positive, sig) {
  pos++; // e or E
  let positiveExp = true;
  const sign = peekOrNull();
  if (sign === 0x2b) {
    pos++;
  } else if (sign === 0x2d) {
    pos++;
    positiveExp = false;
  }
  if (pos >= len) throw eofError('EOF while parsing a value');
  const first = buf[pos++];
  if (!isDigit(first)) throw syntaxError('invalid number');
  let exp = first - 0x30;
  for (;;) {
    const c = peekOrNull();
    if (!isDigit(c)) break;
    pos++;
    const digit = c - 0x30;
    if (exp >= 214748364 && (exp > 214748364 || digit > 7)) {
      return parseExponentOverflow(positive, isZero(sig), positiveExp);
    }
    exp = exp * 10 + digit;
  }
  return f64FromParts();
}

/**
 * The number scanned from `numberStart` to `pos` as the nearest double, as
 * serde_json's float_roundtrip parses it (ECMAScript's Number() of a
 * decimal string is correctly rounded); too large for a double is an error.
 */
function f64FromParts() {
  let text = '';
  for (let at = numberStart; at < pos; at += 4096) {
    text += String.fromCharCode(...buf.subarray(at, Math.min(pos, at + 4096)));
  }
  const f = Number(text);
  if (!Number.isFinite(f)) throw syntaxError('number out of range');
  return f;
}

function parseLongInteger(positive, sig) {
  for (;;) {
    const c = peekOrNull();
    if (isDigit(c)) {
      pos++;
    } else if (c === 0x2e) {
      return parseDecimal(positive, sig);
    } else if (c === 0x65 || c === 0x45) {
      return parseExponent(positive, sig);
    } else {
      return f64FromParts();
    }
  }
}

function parseDecimalOverflow(positive, sig) {
  while (isDigit(peekOrNull())) pos++;
  const c = peekOrNull();
  if (c === 0x65 || c === 0x45) return parseExponent(positive, sig);
  return f64FromParts();
}

function parseExponentOverflow(positive, zeroSignificand, positiveExp) {
  if (!zeroSignificand && positiveExp) throw syntaxError('number out of range');
  while (isDigit(peekOrNull())) pos++;
  return positive ? 0 : -0;
}

function floatNumber(f) {
  return new JsonNumber(formatF64(f), false);
}

/**
 * A finite f64 as serde_json writes it (with zmij, ryu's successor): the
 * shortest round-tripping digits, plain from 1e-5 to below 1e16 (`1.0`,
 * `0.001`, `123.45`), else exponential (`1e+16`, `1.5e-7`).
 */
function formatF64(f) {
  if (f === 0) return Object.is(f, -0) ? '-0.0' : '0.0';
  let sign = '';
  if (f < 0) {
    sign = '-';
    f = -f;
  }
  // The shortest digits that round-trip, closest to the value (ECMAScript
  // Number::toString), as zmij's: value = digits * 10^exp.
  let text = String(f);
  let exp = 0;
  const e = text.indexOf('e');
  if (e >= 0) {
    exp = Number(text.slice(e + 1));
    text = text.slice(0, e);
  }
  const dot = text.indexOf('.');
  let digits = text;
  if (dot >= 0) {
    digits = text.slice(0, dot) + text.slice(dot + 1);
    exp -= text.length - dot - 1;
  }
  let lead = 0;
  while (lead < digits.length - 1 && digits.charCodeAt(lead) === 0x30) lead++;
  digits = digits.slice(lead);
  let end = digits.length;
  while (end > 1 && digits.charCodeAt(end - 1) === 0x30) end--;
  exp += digits.length - end;
  digits = digits.slice(0, end);

  const length = digits.length;
  const k = exp;
  const kk = length + k; // 10^(kk-1) <= value < 10^kk
  let out;
  if (k >= 0 && kk <= 16) {
    out = `${digits}${'0'.repeat(k)}.0`;
  } else if (kk > 0 && kk <= 16) {
    out = `${digits.slice(0, kk)}.${digits.slice(kk)}`;
  } else if (kk > -5 && kk <= 0) {
    out = `0.${'0'.repeat(-kk)}${digits}`;
  } else {
    const e10 = kk - 1;
    const mantissa = length === 1 ? digits : `${digits[0]}.${digits.slice(1)}`;
    out = `${mantissa}e${e10 < 0 ? '-' : '+'}${Math.abs(e10)}`;
  }
  return sign + out;
}

// --- serialisation (serde_json's compact writer) ----------------------------

const NEEDS_ESCAPE = /["\\\u0000-\u001f]/;
const ESCAPES = /["\\\u0000-\u001f]/g;
const SHORT_ESCAPES = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\t': '\\t', '\n': '\\n', '\f': '\\f', '\r': '\\r' };

function escapeChar(c) {
  return SHORT_ESCAPES[c] ?? `\\u00${HEX[c.charCodeAt(0) >> 4]}${HEX[c.charCodeAt(0) & 0x0f]}`;
}

/**
 * A string as serde_json writes it: `"` and `\` escaped, U+0000..U+001F as
 * \b \t \n \f \r or \u00xx (lowercase), everything else as is. (What
 * JSON.stringify does too, but SpiderMonkey's JSON.stringify grows memory by
 * some 64 MiB for a 1 MB string, past the host's limit.)
 */
function quote(s) {
  return NEEDS_ESCAPE.test(s) ? `"${s.replace(ESCAPES, escapeChar)}"` : `"${s}"`;
}

function writeJson(value, out) {
  if (value === null) {
    out.push('null');
  } else if (value === true) {
    out.push('true');
  } else if (value === false) {
    out.push('false');
  } else if (typeof value === 'string') {
    out.push(quote(value));
  } else if (value instanceof JsonNumber) {
    out.push(value.text);
  } else if (value instanceof Map) {
    out.push('{');
    let first = true;
    for (const [key, item] of value) {
      if (!first) out.push(',');
      first = false;
      out.push(quote(key), ':');
      writeJson(item, out);
    }
    out.push('}');
  } else {
    out.push('[');
    for (let i = 0; i < value.length; i++) {
      if (i > 0) out.push(',');
      writeJson(value[i], out);
    }
    out.push(']');
  }
}

function jsonType(value) {
  if (value === null) return 'null';
  if (typeof value === 'boolean') return 'a boolean';
  if (typeof value === 'string') return 'a string';
  if (value instanceof JsonNumber) return 'a number';
  if (value instanceof Map) return 'an object';
  return 'an array';
}

function jsonText(value) {
  const out = [];
  writeJson(value, out);
  return out.join('');
}

// ---------------------------------------------------------------------------
// RFC 3339 timestamps (timestamp.rs)

function digitsAt(b, at, n) {
  if (at + n > b.length) return -1;
  let v = 0;
  for (let i = at; i < at + n; i++) {
    const c = b[i];
    if (c < 0x30 || c > 0x39) return -1;
    v = v * 10 + (c - 0x30);
  }
  return v;
}

function isLeapYear(year) {
  return (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
}

function daysInMonth(year, month) {
  if (month === 2) return isLeapYear(year) ? 29 : 28;
  if (month === 4 || month === 6 || month === 9 || month === 11) return 30;
  return 31;
}

/** `YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`, `T`/`t`, `Z`/`z`, fields in range. */
function isRfc3339(s) {
  const b = utf8Encoder.encode(s);
  if (b.length < 20) return false;
  const year = digitsAt(b, 0, 4);
  const month = digitsAt(b, 5, 2);
  const day = digitsAt(b, 8, 2);
  const hour = digitsAt(b, 11, 2);
  const minute = digitsAt(b, 14, 2);
  const second = digitsAt(b, 17, 2);
  if (year < 0 || month < 0 || day < 0 || hour < 0 || minute < 0 || second < 0) return false;
  if (b[4] !== 0x2d || b[7] !== 0x2d || (b[10] !== 0x54 && b[10] !== 0x74)) return false;
  if (b[13] !== 0x3a || b[16] !== 0x3a) return false;
  if (month < 1 || month > 12 || day === 0 || day > daysInMonth(year, month)) return false;
  if (hour > 23 || minute > 59 || second > 60) return false;
  let rest = 19;
  if (b[rest] === 0x2e) {
    let n = 0;
    while (rest + 1 + n < b.length && b[rest + 1 + n] >= 0x30 && b[rest + 1 + n] <= 0x39) n++;
    if (n === 0) return false;
    rest += 1 + n;
  }
  const left = b.length - rest;
  if (left === 1) return b[rest] === 0x5a || b[rest] === 0x7a;
  if (left === 6 && (b[rest] === 0x2b || b[rest] === 0x2d)) {
    const h = digitsAt(b, rest + 1, 2);
    const m = digitsAt(b, rest + 4, 2);
    return h >= 0 && m >= 0 && b[rest + 3] === 0x3a && h < 24 && m < 60;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Events (event.rs)

/** Steps 1 and 2: a JSON object with a non-empty string eventType. */
function parsePayload(payload) {
  let value;
  try {
    value = parseJson(payload);
  } catch (e) {
    if (e instanceof JsonFault) {
      throw guestError('invalid-event-json', { offset: BigInt(e.offset), detail: e.detail });
    }
    throw e;
  } finally {
    // Keep no reference to the payload, nor a large scratch buffer.
    buf = EMPTY;
    if (scratch.length > 65536) scratch = new Uint8Array(256);
  }
  if (!(value instanceof Map)) {
    let first = 0;
    while (first < payload.length) {
      const c = payload[first];
      if (c !== 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) break;
      first++;
    }
    if (first === payload.length) first = 0;
    throw guestError('invalid-event-json', {
      offset: BigInt(first),
      detail: `expected a JSON object, found ${jsonType(value)}`,
    });
  }
  const eventType = value.get('eventType');
  value.delete('eventType');
  if (eventType === undefined) throw invalidField('eventType', 'missing');
  if (typeof eventType !== 'string') {
    throw invalidField('eventType', `must be a string, found ${jsonType(eventType)}`);
  }
  if (eventType === '') throw invalidField('eventType', 'must not be empty');
  return { eventType, object: value, payload, eventDataSpan };
}

/**
 * The bytes of the valid JSON value at `span` in `bytes` without the
 * whitespace between its tokens (event.rs: eventData goes out as sent).
 */
function compactBytes(bytes, span) {
  const raw = bytes.subarray(span.start, span.end);
  if (span.compact) return raw;
  const out = new Uint8Array(raw.length);
  let n = 0;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < raw.length; i++) {
    const b = raw[i];
    if (inString) {
      out[n++] = b;
      if (escaped) escaped = false;
      else if (b === 0x5c) escaped = true;
      else if (b === 0x22) inString = false;
    } else if (b !== 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d) {
      inString = b === 0x22;
      out[n++] = b;
    }
  }
  return out.subarray(0, n);
}

const present = (v) => v !== undefined && v !== null;

/** Step 4 and the MODE Event JSON, keys in the reference order. */
function modeEvent(payload, origin) {
  const object = payload.object;
  const eventData = object.get('eventData');
  object.delete('eventData');
  if (eventData === undefined) throw invalidField('eventData', 'missing');
  if (!(eventData instanceof Map)) {
    throw invalidField('eventData', `must be an object, found ${jsonType(eventData)}`);
  }
  let homeId;
  const ctx = origin.context;
  if (origin.device) {
    if (present(ctx.homeId)) {
      homeId = ctx.homeId;
    } else if (object.has('homeId')) {
      const v = object.get('homeId');
      if (!(v instanceof JsonNumber) || !v.unsigned) {
        throw invalidField('homeId', `must be a non-negative integer, found ${jsonText(v)}`);
      }
      homeId = v.text;
    } else {
      throw invalidField(
        'homeId',
        `device ${ctx.deviceId} is not in the device registry and the event carries no homeId`,
      );
    }
  } else {
    homeId = ctx.homeId;
  }
  const ts = object.get('timestamp');
  const timestamp = typeof ts === 'string' && isRfc3339(ts) ? ts : ctx.receivedAt;

  const out = ['{"eventType":', quote(payload.eventType), ',"eventData":'];
  out.push(utf8Lossy.decode(compactBytes(payload.payload, payload.eventDataSpan)));
  out.push(',"timestamp":', quote(timestamp), ',"homeId":', String(homeId));
  const optional = (key, v) => {
    if (present(v)) out.push(',"', key, '":', quote(v));
  };
  if (origin.device) {
    out.push(',"originDeviceId":', String(ctx.deviceId));
    optional('originDeviceClass', ctx.deviceClass);
    optional('originDeviceIp', ctx.deviceIp);
  } else {
    optional('originProjectKeyId', ctx.projectKeyId);
    optional('originProjectKeyName', ctx.projectKeyName);
  }
  out.push('}');
  return utf8Encoder.encode(out.join(''));
}

// ---------------------------------------------------------------------------
// Bulk data (bulk.rs)

const KIND_NAMES = ['nil', 'bool', 'int', 'float', 'str', 'bin', 'array', 'map', 'ext'];
const NIL = 0;
const BOOL = 1;
const INT = 2;
const FLOAT = 3;
const STR = 4;
const BIN = 5;
const ARRAY = 6;
const MAP = 7;
const EXT = 8;

// Scratch results of `head` (one value at a time).
let headKind = 0;
let headLen = 0; // marker, length and type bytes
let bodyLen = 0; // bytes after the header
let headChildren = 0; // nested values: n for arrays, 2n for maps
// `head` outcome: 0 ok, 1 invalid marker (0xc1), 2 truncated header.
const HEAD_OK = 0;
const HEAD_INVALID = 1;
const HEAD_TRUNCATED = 2;

function setHead(kind, header, body, children) {
  headKind = kind;
  headLen = header;
  bodyLen = body;
  headChildren = children;
  return HEAD_OK;
}

/** Reads the header of the value whose marker is at `b[p]` (in bounds). */
function head(b, p) {
  const m = b[p];
  if (m <= 0x7f || m >= 0xe0) return setHead(INT, 1, 0, 0);
  if (m <= 0x8f) return setHead(MAP, 1, 0, 2 * (m & 0x0f));
  if (m <= 0x9f) return setHead(ARRAY, 1, 0, m & 0x0f);
  if (m <= 0xbf) return setHead(STR, 1, m & 0x1f, 0);
  let kind;
  let lenBytes;
  let extra = 0;
  switch (m) {
    case 0xc0: return setHead(NIL, 1, 0, 0);
    case 0xc1: return HEAD_INVALID;
    case 0xc2: case 0xc3: return setHead(BOOL, 1, 0, 0);
    case 0xca: return setHead(FLOAT, 1, 4, 0);
    case 0xcb: return setHead(FLOAT, 1, 8, 0);
    case 0xcc: case 0xd0: return setHead(INT, 1, 1, 0);
    case 0xcd: case 0xd1: return setHead(INT, 1, 2, 0);
    case 0xce: case 0xd2: return setHead(INT, 1, 4, 0);
    case 0xcf: case 0xd3: return setHead(INT, 1, 8, 0);
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
      // fixext 1/2/4/8/16: marker, type byte, data.
      setHead(EXT, 2, 1 << (m - 0xd4), 0);
      return b.length - p < 2 ? HEAD_TRUNCATED : HEAD_OK;
    case 0xc4: kind = BIN; lenBytes = 1; break;
    case 0xc5: kind = BIN; lenBytes = 2; break;
    case 0xc6: kind = BIN; lenBytes = 4; break;
    case 0xc7: kind = EXT; lenBytes = 1; extra = 1; break;
    case 0xc8: kind = EXT; lenBytes = 2; extra = 1; break;
    case 0xc9: kind = EXT; lenBytes = 4; extra = 1; break;
    case 0xd9: kind = STR; lenBytes = 1; break;
    case 0xda: kind = STR; lenBytes = 2; break;
    case 0xdb: kind = STR; lenBytes = 4; break;
    case 0xdc: kind = ARRAY; lenBytes = 2; break;
    case 0xdd: kind = ARRAY; lenBytes = 4; break;
    case 0xde: kind = MAP; lenBytes = 2; break;
    default: kind = MAP; lenBytes = 4; break; // 0xdf
  }
  const header = 1 + lenBytes + extra;
  headKind = kind;
  headLen = header;
  if (p + 1 + lenBytes > b.length || b.length - p < header) return HEAD_TRUNCATED;
  let n = 0;
  for (let i = p + 1; i < p + 1 + lenBytes; i++) n = n * 256 + b[i];
  if (kind === ARRAY) return setHead(kind, header, 0, n);
  if (kind === MAP) return setHead(kind, header, 0, 2 * n);
  return setHead(kind, header, n, 0);
}

/** `head` with its failures as malformed-payload; `start`: the top-level value. */
function readHead(b, p, start) {
  const r = head(b, p);
  if (r === HEAD_INVALID) throw malformed(p, '0xc1 is not a valid MessagePack marker');
  if (r === HEAD_TRUNCATED) {
    throw malformed(
      start,
      `truncated ${KIND_NAMES[headKind]} header: ${headLen} bytes needed, ${b.length - p} left`,
    );
  }
}

// Results of `skipValue`.
let valueKind = 0;
let valueContent = 0;
let valueEnd = 0;

/** Walks over the whole value at `start`, nested values included, iteratively. */
function skipValue(b, start) {
  readHead(b, start, start);
  const kind = headKind;
  const content = start + headLen;
  let p = content + bodyLen;
  if (p > b.length) {
    throw malformed(
      start,
      `truncated ${KIND_NAMES[kind]}: ${bodyLen} content bytes announced, ${b.length - content} left`,
    );
  }
  let pending = headChildren;
  while (pending > 0) {
    if (p >= b.length) {
      throw malformed(
        start,
        `truncated ${KIND_NAMES[kind]}: the payload ends with ${pending} nested value(s) missing`,
      );
    }
    readHead(b, p, start);
    pending = pending - 1 + headChildren;
    const next = p + headLen + bodyLen;
    if (next > b.length) {
      throw malformed(
        start,
        `truncated ${KIND_NAMES[kind]}: a nested ${KIND_NAMES[headKind]} at byte ${p} runs past the end`,
      );
    }
    p = next;
  }
  valueKind = kind;
  valueContent = content;
  valueEnd = p;
}

/** Unpacks a bulk payload into the spans of its byte arrays, in order. */
function unpackBulk(b) {
  if (b.length > 0xffffffff) throw guestError('other', 'bulk payload over 4 GiB');
  if (b.length === 0) throw malformed(0, 'empty payload, expected the version string "1.0"');
  readHead(b, 0, 0);
  if (headKind !== STR) {
    throw malformed(0, `expected the version string "1.0", found ${KIND_NAMES[headKind]}`);
  }
  skipValue(b, 0);
  if (
    !(valueEnd - valueContent === 3 && b[valueContent] === 0x31 &&
      b[valueContent + 1] === 0x2e && b[valueContent + 2] === 0x30)
  ) {
    throw guestError('unsupported-version', utf8Lossy.decode(b.subarray(valueContent, valueEnd)));
  }
  const spans = [];
  let p = valueEnd;
  while (p < b.length) {
    skipValue(b, p);
    if (valueKind !== BIN) {
      throw guestError('not-byte-array', {
        index: spans.length,
        offset: BigInt(p),
        found: KIND_NAMES[valueKind],
      });
    }
    spans.push({ offset: valueContent, len: valueEnd - valueContent });
    p = valueEnd;
  }
  return spans;
}

// ---------------------------------------------------------------------------
// Partition keys, sizes, settings (partition.rs, lib.rs, settings.rs)

/** A fresh UUIDv4, lowercase and hyphenated. */
function uuidV4() {
  const r = crypto.getRandomValues(new Uint8Array(16));
  r[6] = (r[6] & 0x0f) | 0x40;
  r[8] = (r[8] & 0x3f) | 0x80;
  let s = '';
  for (let i = 0; i < 16; i++) {
    if (i === 4 || i === 6 || i === 8 || i === 10) s += '-';
    s += HEX[r[i] >> 4] + HEX[r[i] & 0x0f];
  }
  return s;
}

function partitionKey(useUuid, id) {
  return useUuid ? uuidV4() : String(id);
}

/** The record's size (data plus key bytes; keys are ASCII) against the limit. */
function sizeError(index, dataLen, key, limit) {
  const size = dataLen + key.length;
  if (size > limit) {
    return guestError('record-too-large', {
      index,
      size: BigInt(size),
      limit: BigInt(limit),
    });
  }
  return null;
}

let settings = null;

function requireSettings() {
  if (settings === null) throw guestError('not-configured');
  return settings;
}

function handleEvent(origin, id, payload) {
  const s = requireSettings();
  const parsed = parsePayload(payload);
  if (!s.subscribeEvents.some((e) => e === '*' || e === parsed.eventType)) return [];
  const data = modeEvent(parsed, origin);
  const key = partitionKey(s.useUuid, id);
  const tooLarge = sizeError(0, data.length, key, s.maxRecordSize);
  if (tooLarge !== null) throw tooLarge;
  return [{ data, partitionKey: key, explicitHashKey: undefined }];
}

// ---------------------------------------------------------------------------
// The exported interface `ksm:smart-module/forwarder`.

export const forwarder = {
  configure(moduleSettings) {
    const events = Array.from(moduleSettings.subscribeEvents);
    if (moduleSettings.maxRecordSize === 0) {
      throw guestError('invalid-settings', {
        field: 'max-record-size',
        detail: 'must be at least 1 byte',
      });
    }
    const empty = events.indexOf('');
    if (empty >= 0) {
      throw guestError('invalid-settings', {
        field: 'subscribe-events',
        detail: `entry ${empty} is an empty event type`,
      });
    }
    settings = {
      subscribeEvents: events,
      bulkDataLabel: present(moduleSettings.bulkDataLabel) ? moduleSettings.bulkDataLabel : null,
      useUuid: moduleSettings.useUuid,
      maxRecordSize: moduleSettings.maxRecordSize,
    };
  },

  handleDeviceEvent(context, payload) {
    return handleEvent({ device: true, context }, context.deviceId, payload);
  },

  handleHomeEvent(context, payload) {
    return handleEvent({ device: false, context }, context.homeId, payload);
  },

  handleBulkData(deviceId, label, payload) {
    const s = requireSettings();
    const out = { records: [], rejected: [] };
    if (s.bulkDataLabel === null || s.bulkDataLabel !== label) return out;
    const spans = unpackBulk(payload);
    const deviceKey = String(deviceId);
    for (let index = 0; index < spans.length; index++) {
      const span = spans[index];
      const key = s.useUuid ? uuidV4() : deviceKey;
      const reason = sizeError(index, span.len, key, s.maxRecordSize);
      if (reason === null) {
        out.records.push({ data: span, partitionKey: key, explicitHashKey: undefined });
      } else {
        out.rejected.push({ index, data: span, reason });
      }
    }
    return out;
  },
};
