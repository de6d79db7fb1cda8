"""The event payload's JSON: validation as serde_json does it, and the raw
text of the top-level object's members.

`scan(payload)` accepts exactly what serde_json accepts for a `Value` (UTF-8,
paired surrogate escapes, finite numbers, fewer than 128 levels of nesting)
and returns the top-level value's kind and, when it is an object, its
members in document order: the decoded key, the value's text as sent, and
for a string value its decoded content. A payload serde_json refuses raises
`JsonFault` with the offset and wording the reference guest gives (serde_json's
line and column turned into a byte offset, as guest/src/event.rs does).

Two paths, one answer:
- the fast one runs CPython's C JSON scanner (`json.scanner`) member by
  member over the decoded text; it is taken only where that scanner agrees
  with serde_json: whatever could differ (a surrogate escape that is not
  part of a pair, NaN/Infinity, numbers that overflow a double, 128 levels of
  nesting, invalid UTF-8, a top-level value that is not an object) sends the
  payload to the other path;
- the faithful one is a byte-by-byte port of serde_json's parser (the control
  flow of guest.js, which follows serde_json 1.0.154), used for every payload
  the fast path does not take, so every error comes from it.
"""

import json
import json.decoder
import json.scanner
import re
from itertools import accumulate

__all__ = ["JsonFault", "scan", "compact", "KIND_NAMES"]

# Kinds of JSON values, named as error details name them.
NULL, BOOLEAN, NUMBER, STRING, ARRAY, OBJECT = range(6)
KIND_NAMES = ("null", "a boolean", "a number", "a string", "an array", "an object")

# The kind of a valid JSON value from its first character.
_KIND_OF_FIRST = {"n": NULL, "t": BOOLEAN, "f": BOOLEAN, '"': STRING, "[": ARRAY, "{": OBJECT}


def kind_of(raw):
    """The kind of the valid JSON value `raw` (str, no leading whitespace)."""
    return _KIND_OF_FIRST.get(raw[:1], NUMBER)


class JsonFault(Exception):
    """serde_json refused the payload: where (byte offset) and why."""

    def __init__(self, offset, detail):
        super().__init__(offset, detail)
        self.offset = offset
        self.detail = detail


class Member:
    """One member of the top-level object, as sent."""

    __slots__ = ("key", "raw", "text", "_bytes")

    def __init__(self, key, raw, text, raw_bytes=None):
        self.key = key  # decoded key
        self.raw = raw  # the value's JSON text (str), from its first to its last character
        self.text = text  # for a string value: its decoded content; else None
        self._bytes = raw_bytes  # `raw` in UTF-8, when at hand

    def raw_bytes(self):
        """The value's JSON text as the payload's bytes."""
        if self._bytes is None:
            self._bytes = self.raw.encode()
        return self._bytes


def scan(payload):
    """Validates `payload` (bytes) and returns (kind, members).

    `members` lists the top-level object's members in document order
    (duplicates included); it is empty when the value is not an object.
    Raises `JsonFault` for what serde_json refuses.
    """
    result = _fast(payload)
    if result is None:
        result = _Faithful(payload).scan()
    return result


# ---------------------------------------------------------------------------
# Compact copies

_WHITESPACE_BYTES = (b" ", b"\t", b"\n", b"\r")
# A JSON string (valid: every backslash starts an escape), or a run of
# anything but whitespace and quotes between tokens.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^ \t\n\r"]+')


def compact(raw):
    """The valid JSON value `raw` (bytes) without whitespace between tokens."""
    for ws in _WHITESPACE_BYTES:
        if ws in raw:
            return b"".join(_TOKEN.findall(raw))
    return raw


# ---------------------------------------------------------------------------
# The fast path


class _Refused(Exception):
    """The C scanner met something serde_json may judge otherwise."""


def _refuse_constant(_name):
    raise _Refused  # NaN, Infinity, -Infinity: not JSON


def _finite_float(text):
    value = float(text)
    if value - value != 0.0:  # inf (a NaN cannot come from JSON text)
        raise _Refused
    return None


def _finite_int(text):
    if len(text) > 300 and float(text) - float(text) != 0.0:
        raise _Refused
    return None


def _decoder(**hooks):
    # Objects inside values are never looked at: `len` (a C function) turns
    # each one's list of pairs into a small int, so that no dict is built.
    return json.scanner.make_scanner(
        json.JSONDecoder(object_pairs_hook=len, parse_constant=_refuse_constant, **hooks)
    )


# Floats and integers as CPython's C code makes them (fast), and with checks
# that they fit a double, for text where a number might not.
_SCAN = _decoder()
_SCAN_CHECKED = _decoder(parse_float=_finite_float, parse_int=_finite_int)
# Where a number might not fit a double: an exponent of three digits or
# more (`e308`, `E+400`), or 200 digits in a row (with an exponent of at most
# 99, fewer digits cannot reach 1.8e308). Found by searching a copy of the
# payload with every digit made `0` and `E` made `e` (strings included: a
# false alarm only costs the checks).
_NUMBER_SHAPE = bytes.maketrans(b"123456789E", b"000000000e")
_HUGE_SHAPES = (b"e000", b"e+000", b"0" * 200)
_WS = re.compile(r"[ \t\n\r]*")
# Any \u escape of a surrogate, and the valid pairs of them.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
# serde_json's recursion limit: the 128th opening bracket is refused.
_MAX_DEPTH = 127
# The payload's brackets alone, `{` as `[` and `}` as `]`.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = 1
_DEPTH_STEP[ord("]")] = -1


def _depth(brackets):
    """The deepest nesting of a sequence of `[` and `]` (an upper bound of
    the depth a parser reaches before it stops, when unbalanced)."""
    # Each pass takes away the innermost pairs: as many passes as levels.
    # (Counted step by step past 16 levels, or when unbalanced.)
    passes = 0
    while brackets and passes < 16:
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            break  # unbalanced
        brackets = inner
        passes += 1
    if not brackets:
        return passes
    return passes + max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)))


def _too_deep(payload):
    """Whether `payload` might nest 128 levels deep, before the C scanner
    sees it (so that it never goes that deep). Brackets in strings do not
    count: with escaped backslashes and quotes out of the way, every other
    quote opens or closes a string (exactly so up to where a parser would
    stop in a payload that is not JSON)."""
    if len(payload.translate(None, _NOT_BRACKETS)) <= _MAX_DEPTH:
        return False
    unescaped = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(_BRACKETS, _NOT_BRACKETS)
    return len(brackets) > _MAX_DEPTH and _depth(brackets) > _MAX_DEPTH


def _fast(payload):
    """(kind, members) of a payload the C scanner can judge; None otherwise."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _SURROGATE.search(text) is not None:
        # Escaped backslashes out of the way, every backslash left starts an
        # escape (in text the C scanner accepts).
        escapes = text.replace("\\\\", "")
        if _SURROGATE.search(_SURROGATE_PAIR.sub("", escapes)) is not None:
            return None
    if _too_deep(payload):
        return None
    shape = payload.translate(_NUMBER_SHAPE)
    scan_once = _SCAN_CHECKED if any(h in shape for h in _HUGE_SHAPES) else _SCAN
    ws = _WS.match
    n = len(text)
    ascii = n == len(payload)  # then indices in `text` are indices in `payload`
    i = ws(text, 0).end()
    if i >= n or text[i] != "{":
        return None
    members = []
    try:
        i = ws(text, i + 1).end()
        if i < n and text[i] == "}":
            i += 1
        else:
            while True:
                if i >= n or text[i] != '"':
                    return None
                key, i = scan_once(text, i)
                i = ws(text, i).end()
                if i >= n or text[i] != ":":
                    return None
                start = ws(text, i + 1).end()
                value, i = scan_once(text, start)
                members.append(
                    Member(
                        key,
                        text[start:i],
                        value if text[start] == '"' else None,
                        payload[start:i] if ascii else None,
                    )
                )
                i = ws(text, i).end()
                if i < n and text[i] == ",":
                    i = ws(text, i + 1).end()
                elif i < n and text[i] == "}":
                    i += 1
                    break
                else:
                    return None
    except Exception:  # StopIteration, JSONDecodeError, _Refused, RecursionError...
        return None
    if ws(text, i).end() != n:
        return None
    return OBJECT, members


# ---------------------------------------------------------------------------
# The faithful path: serde_json's parser, step by step

_WS_B = re.compile(rb"[ \t\n\r]*")
# A run of string bytes that need no attention: not `"`, `\` or a control character.
_PLAIN_B = re.compile(rb'[^"\\\x00-\x1f]*')
_DIGITS_B = re.compile(rb"[0-9]*")
_U64_MAX = (1 << 64) - 1
_ESCAPES = {
    0x22: 0x22,
    0x5C: 0x5C,
    0x2F: 0x2F,
    0x62: 0x08,
    0x66: 0x0C,
    0x6E: 0x0A,
    0x72: 0x0D,
    0x74: 0x09,
}
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class _Faithful:
    """One parse of one payload, as serde_json's `from_slice` into a `Value`."""

    def __init__(self, payload):
        self.buf = payload
        self.len = len(payload)
        self.pos = 0
        self.depth = 128  # serde_json's remaining depth
        self.number_start = 0

    # --- errors, at serde_json's positions --------------------------------

    def _line_start(self, i):
        return 0 if i == 0 else self.buf.rfind(b"\n", 0, i) + 1

    def _offset_at(self, i):
        """The reference's offset for a serde_json error at index `i`: the
        byte before `i`, or `i` itself at the start of a line."""
        start = self._line_start(i)
        column = i - start
        return min(start if column == 0 else start + column - 1, self.len)

    def _line_column(self, i):
        line = self.buf.count(b"\n", 0, i) + 1
        return f"line {line} column {i - self._line_start(i)}"

    def error(self, message):
        """serde_json `error`: at the index after the byte just read."""
        i = self.pos
        return JsonFault(self._offset_at(i), f"{message} at {self._line_column(i)}")

    def peek_error(self, message):
        """serde_json `peek_error`: at the byte peeked."""
        i = min(self.len, self.pos + 1)
        return JsonFault(self._offset_at(i), f"{message} at {self._line_column(i)}")

    def eof_error(self, message):
        """An error of serde_json's `Eof` category: at the payload's end."""
        return JsonFault(self.len, f"{message} at {self._line_column(self.len)}")

    # --- the grammar -------------------------------------------------------

    def skip_ws(self):
        """Skips whitespace; the next byte, or -1 at the end."""
        self.pos = pos = _WS_B.match(self.buf, self.pos).end()
        return self.buf[pos] if pos < self.len else -1

    def scan(self):
        c = self.skip_ws()
        if c == 0x7B:  # {
            members = self.parse_object(top_level=True)
            kind = OBJECT
        else:
            members = []
            kind = self.parse_value()
        if self.skip_ws() >= 0:
            raise self.peek_error("trailing characters")
        return kind, members

    def parse_value(self):
        """Parses one value; returns its kind."""
        c = self.skip_ws()
        if c < 0:
            raise self.eof_error("EOF while parsing a value")
        if c == 0x6E:  # n
            self.pos += 1
            self.parse_ident(b"ull")
            return NULL
        if c == 0x74:  # t
            self.pos += 1
            self.parse_ident(b"rue")
            return BOOLEAN
        if c == 0x66:  # f
            self.pos += 1
            self.parse_ident(b"alse")
            return BOOLEAN
        if c == 0x2D:  # -
            self.number_start = self.pos
            self.pos += 1
            self.parse_integer()
            return NUMBER
        if 0x30 <= c <= 0x39:
            self.number_start = self.pos
            self.parse_integer()
            return NUMBER
        if c == 0x22:  # "
            self.pos += 1
            self.parse_string()
            return STRING
        if c == 0x5B:  # [
            self.parse_array()
            return ARRAY
        if c == 0x7B:  # {
            self.parse_object(top_level=False)
            return OBJECT
        raise self.peek_error("expected value")

    def parse_ident(self, rest):
        for expected in rest:
            if self.pos >= self.len:
                raise self.eof_error("EOF while parsing a value")
            c = self.buf[self.pos]
            self.pos += 1
            if c != expected:
                raise self.error("expected ident")

    def _enter(self):
        self.depth -= 1
        if self.depth == 0:
            raise self.peek_error("recursion limit exceeded")
        self.pos += 1

    def _leave(self):
        self.depth += 1
        self.skip_ws()
        self.pos += 1  # the bracket that ended the items

    def parse_array(self):
        self._enter()
        first = True
        while True:
            c = self.skip_ws()
            if c < 0:
                raise self.eof_error("EOF while parsing a list")
            if c == 0x5D:  # ]
                break
            if first:
                first = False
            elif c == 0x2C:  # ,
                self.pos += 1
                d = self.skip_ws()
                if d == 0x5D:
                    raise self.peek_error("trailing comma")
                if d < 0:
                    raise self.eof_error("EOF while parsing a value")
            else:
                raise self.peek_error("expected `,` or `]`")
            self.parse_value()
        self._leave()

    def parse_object(self, top_level):
        """Parses an object at `{`; for the top level, returns its members."""
        self._enter()
        members = []
        first = True
        while True:
            c = self.skip_ws()
            if c < 0:
                raise self.eof_error("EOF while parsing an object")
            if c == 0x7D:  # }
                break
            if first:
                first = False
                if c != 0x22:
                    raise self.peek_error("key must be a string")
            elif c == 0x2C:  # ,
                self.pos += 1
                d = self.skip_ws()
                if d == 0x7D:
                    raise self.peek_error("trailing comma")
                if d < 0:
                    raise self.eof_error("EOF while parsing a value")
                if d != 0x22:
                    raise self.peek_error("key must be a string")
            else:
                raise self.peek_error("expected `,` or `}`")
            self.pos += 1  # the key's opening quote
            key = self.parse_string()
            colon = self.skip_ws()
            if colon < 0:
                raise self.eof_error("EOF while parsing an object")
            if colon != 0x3A:
                raise self.peek_error("expected `:`")
            self.pos += 1
            if top_level:
                self.skip_ws()
                start = self.pos
                text = self.parse_string() if self.peek_quote() else None
                if text is None:
                    self.parse_value()
                raw = self.buf[start : self.pos]
                members.append(Member(key, raw.decode("utf-8"), text, raw))
            else:
                self.parse_value()
        self._leave()
        return members

    def peek_quote(self):
        if self.pos < self.len and self.buf[self.pos] == 0x22:
            self.pos += 1
            return True
        return False

    # --- strings -----------------------------------------------------------

    def parse_string(self):
        """A string whose opening quote was just read; returns it decoded."""
        buf = self.buf
        start = self.pos
        scratch = None
        while True:
            pos = _PLAIN_B.match(buf, self.pos).end()
            self.pos = pos
            if pos == self.len:
                raise self.eof_error("EOF while parsing a string")
            c = buf[pos]
            if c == 0x22:  # "
                if scratch is None:
                    content = buf[start:pos]
                else:
                    scratch += buf[start:pos]
                    content = bytes(scratch)
                self.pos = pos + 1
                return self._as_str(content)
            if c == 0x5C:  # \
                if scratch is None:
                    scratch = bytearray()
                scratch += buf[start:pos]
                self.pos = pos + 1
                self.parse_escape(scratch)
                start = self.pos
            else:
                self.pos = pos + 1
                raise self.error("control character (\\u0000-\\u001F) found while parsing a string")

    def _as_str(self, content):
        """serde_json `as_str`: the UTF-8 check of a string at its closing quote."""
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as e:
            valid_up_to = e.start
        pos = self.pos
        start = self._line_start(pos)
        column = max(0, pos - start - (len(content) - valid_up_to))
        offset = min(start if column == 0 else start + column - 1, self.len)
        line = self.buf.count(b"\n", 0, pos) + 1
        raise JsonFault(offset, f"invalid unicode code point at line {line} column {column}")

    def parse_escape(self, scratch):
        if self.pos >= self.len:
            raise self.eof_error("EOF while parsing a string")
        c = self.buf[self.pos]
        self.pos += 1
        byte = _ESCAPES.get(c)
        if byte is not None:
            scratch.append(byte)
        elif c == 0x75:  # u
            self.parse_unicode_escape(scratch)
        else:
            raise self.error("invalid escape")

    def decode_hex_escape(self):
        pos = self.pos
        if pos + 4 > self.len:
            self.pos = self.len
            raise self.eof_error("EOF while parsing a string")
        digits = [_HEX.get(c, -1) for c in self.buf[pos : pos + 4]]
        self.pos = pos + 4
        if min(digits) < 0:
            raise self.error("invalid escape")
        a, b, c, d = digits
        return (a << 12) | (b << 8) | (c << 4) | d

    def parse_unicode_escape(self, scratch):
        n1 = self.decode_hex_escape()
        if 0xDC00 <= n1 <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        if not 0xD800 <= n1 <= 0xDBFF:
            scratch += chr(n1).encode("utf-8")
            return
        for expected in (0x5C, 0x75):  # \ u
            if self.pos >= self.len:
                raise self.eof_error("EOF while parsing a string")
            c = self.buf[self.pos]
            self.pos += 1
            if c != expected:
                raise self.error("unexpected end of hex escape")
        n2 = self.decode_hex_escape()
        if not 0xDC00 <= n2 <= 0xDFFF:
            raise self.error("lone leading surrogate in hex escape")
        scratch += chr((((n1 - 0xD800) << 10) | (n2 - 0xDC00)) + 0x10000).encode("utf-8")

    # --- numbers -----------------------------------------------------------

    def _peek(self):
        return self.buf[self.pos] if self.pos < self.len else 0

    def _digits(self):
        """Skips a run of digits; returns its text."""
        start = self.pos
        self.pos = _DIGITS_B.match(self.buf, start).end()
        return self.buf[start : self.pos]

    def parse_integer(self):
        """serde_json `parse_integer`, after an optional `-`."""
        if self.pos >= self.len:
            raise self.eof_error("EOF while parsing a value")
        c = self.buf[self.pos]
        self.pos += 1
        if c == 0x30:
            if 0x30 <= self._peek() <= 0x39:
                raise self.peek_error("invalid number")
            zero = True
            beyond_u64 = False
        elif 0x31 <= c <= 0x39:
            digits = bytes((c,)) + self._digits()
            zero = False
            beyond_u64 = len(digits) > 20 or (len(digits) == 20 and int(digits) > _U64_MAX)
        else:
            raise self.error("invalid number")
        c = self._peek()
        if c == 0x2E:  # .
            self.parse_decimal(zero)
        elif c in (0x65, 0x45):  # e E
            self.parse_exponent(zero)
        elif beyond_u64:
            self.f64_from_parts()  # an integer beyond u64 is a float

    def parse_decimal(self, zero):
        self.pos += 1  # .
        digits = self._digits()
        if not digits:
            if self.pos < self.len:
                raise self.peek_error("invalid number")
            raise self.eof_error("EOF while parsing a value")
        zero = zero and not digits.strip(b"0")
        if self._peek() in (0x65, 0x45):
            self.parse_exponent(zero)
        else:
            self.f64_from_parts()

    def parse_exponent(self, zero):
        """The exponent of a number whose significand is `zero` or not."""
        self.pos += 1  # e or E
        positive_exp = True
        sign = self._peek()
        if sign == 0x2B:
            self.pos += 1
        elif sign == 0x2D:
            self.pos += 1
            positive_exp = False
        if self.pos >= self.len:
            raise self.eof_error("EOF while parsing a value")
        first = self.buf[self.pos]
        self.pos += 1
        if not 0x30 <= first <= 0x39:
            raise self.error("invalid number")
        exp = first - 0x30
        while True:
            c = self._peek()
            if not 0x30 <= c <= 0x39:
                break
            self.pos += 1
            digit = c - 0x30
            if exp >= 214748364 and (exp > 214748364 or digit > 7):
                # serde_json `parse_exponent_overflow`
                if not zero and positive_exp:
                    raise self.error("number out of range")
                self._digits()
                return
            exp = exp * 10 + digit
        self.f64_from_parts()

    def f64_from_parts(self):
        """The number scanned so far must be a finite double."""
        value = float(self.buf[self.number_start : self.pos])
        if value - value != 0.0:
            raise self.error("number out of range")
