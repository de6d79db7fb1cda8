"""Bulk data (bulk.rs): a MessagePack payload, the string "1.0" then zero or
more byte arrays (bin 8/16/32) back to back, unpacked into the spans of its
byte arrays without copying a byte.

A truncated value or the byte 0xc1 makes the payload `malformed-payload`; a
complete value that is not a byte array makes it `not-byte-array`; either
refuses the whole payload. Nested values (arrays, maps) are walked without
recursion, so any depth is safe.
"""

from .errors import GuestError, malformed

NIL, BOOL, INT, FLOAT, STR, BIN, ARRAY, MAP, EXT = range(9)
KIND_NAMES = ("nil", "bool", "int", "float", "str", "bin", "array", "map", "ext")

# The header of each marker byte that is not a fixed-size family: (kind,
# header bytes, content bytes, bytes of the length field, 1 if a type byte
# follows the length). The length field, when there is one, gives the
# content bytes (str, bin, ext) or the nested values (array, map).
_FIXED = {
    0xC0: (NIL, 1, 0),
    0xC2: (BOOL, 1, 0),
    0xC3: (BOOL, 1, 0),
    0xCA: (FLOAT, 1, 4),
    0xCB: (FLOAT, 1, 8),
    0xCC: (INT, 1, 1),
    0xD0: (INT, 1, 1),
    0xCD: (INT, 1, 2),
    0xD1: (INT, 1, 2),
    0xCE: (INT, 1, 4),
    0xD2: (INT, 1, 4),
    0xCF: (INT, 1, 8),
    0xD3: (INT, 1, 8),
}
_LENGTH = {
    0xC4: (BIN, 1, 0),
    0xC5: (BIN, 2, 0),
    0xC6: (BIN, 4, 0),
    0xC7: (EXT, 1, 1),
    0xC8: (EXT, 2, 1),
    0xC9: (EXT, 4, 1),
    0xD9: (STR, 1, 0),
    0xDA: (STR, 2, 0),
    0xDB: (STR, 4, 0),
    0xDC: (ARRAY, 2, 0),
    0xDD: (ARRAY, 4, 0),
    0xDE: (MAP, 2, 0),
    0xDF: (MAP, 4, 0),
}


class _Truncated(Exception):
    """A header runs past the payload's end."""

    def __init__(self, kind, header):
        super().__init__(kind, header)
        self.kind = kind
        self.header = header


def head(b, p):
    """The header of the value whose marker is `b[p]` (in bounds):
    (kind, header bytes, content bytes, nested values).

    Raises GuestError for 0xc1 and `_Truncated` for a header cut short."""
    m = b[p]
    if m <= 0x7F or m >= 0xE0:
        return INT, 1, 0, 0
    if m <= 0x8F:
        return MAP, 1, 0, 2 * (m & 0x0F)
    if m <= 0x9F:
        return ARRAY, 1, 0, m & 0x0F
    if m <= 0xBF:
        return STR, 1, m & 0x1F, 0
    fixed = _FIXED.get(m)
    if fixed is not None:
        return fixed[0], fixed[1], fixed[2], 0
    if m == 0xC1:
        raise malformed(p, "0xc1 is not a valid MessagePack marker")
    if 0xD4 <= m <= 0xD8:
        # fixext 1/2/4/8/16: marker, type byte, data.
        if len(b) - p < 2:
            raise _Truncated(EXT, 2)
        return EXT, 2, 1 << (m - 0xD4), 0
    kind, length_bytes, extra = _LENGTH[m]
    header = 1 + length_bytes + extra
    if len(b) - p < header:
        raise _Truncated(kind, header)
    n = int.from_bytes(b[p + 1 : p + 1 + length_bytes], "big")
    if kind == ARRAY:
        return kind, header, 0, n
    if kind == MAP:
        return kind, header, 0, 2 * n
    return kind, header, n, 0


def read_head(b, p, start):
    """`head`, a truncated header being a malformed payload at `start` (the top-level value)."""
    try:
        return head(b, p)
    except _Truncated as t:
        raise malformed(
            start,
            f"truncated {KIND_NAMES[t.kind]} header: {t.header} bytes needed, {len(b) - p} left",
        ) from None


def skip_value(b, start):
    """Walks over the whole value at `start`, nested values included:
    (kind, content start, end)."""
    n = len(b)
    kind, header, body, pending = read_head(b, start, start)
    content = start + header
    p = content + body
    if p > n:
        raise malformed(
            start,
            f"truncated {KIND_NAMES[kind]}: {body} content bytes announced, {n - content} left",
        )
    while pending > 0:
        if p >= n:
            raise malformed(
                start,
                f"truncated {KIND_NAMES[kind]}: the payload ends with {pending} "
                "nested value(s) missing",
            )
        nested, header, body, children = read_head(b, p, start)
        pending += children - 1
        end = p + header + body
        if end > n:
            raise malformed(
                start,
                f"truncated {KIND_NAMES[kind]}: a nested {KIND_NAMES[nested]} "
                f"at byte {p} runs past the end",
            )
        p = end
    return kind, content, p


def unpack(b):
    """The (offset, length) of each byte array of the bulk payload `b`, in order."""
    n = len(b)
    if n > 0xFFFFFFFF:
        raise GuestError("other", "bulk payload over 4 GiB")
    if n == 0:
        raise malformed(0, 'empty payload, expected the version string "1.0"')
    kind = read_head(b, 0, 0)[0]
    if kind != STR:
        raise malformed(0, f'expected the version string "1.0", found {KIND_NAMES[kind]}')
    _, content, p = skip_value(b, 0)
    if b[content:p] != b"1.0":
        raise GuestError("unsupported-version", b[content:p].decode("utf-8", "replace"))
    spans = []
    append = spans.append
    while p < n:
        m = b[p]
        # bin 8/16/32, the records: read here; anything else by skip_value.
        if m == 0xC4 and p + 2 <= n:
            content = p + 2
            end = content + b[p + 1]
        elif m == 0xC5 and p + 3 <= n:
            content = p + 3
            end = content + (b[p + 1] << 8 | b[p + 2])
        elif m == 0xC6 and p + 5 <= n:
            content = p + 5
            end = content + int.from_bytes(b[p + 1 : content], "big")
        else:
            end = -1
        if 0 <= end <= n:
            append((content, end - content))
            p = end
            continue
        kind, content, end = skip_value(b, p)
        if kind != BIN:
            raise GuestError(
                "not-byte-array", {"index": len(spans), "offset": p, "found": KIND_NAMES[kind]}
            )
        append((content, end - content))
        p = end
    return spans
