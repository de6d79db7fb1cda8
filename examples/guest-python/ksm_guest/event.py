"""Device and home events: payload checks and the MODE Event JSON (event.rs).

Order of checks, so that a malformed event is an error whatever the
subscription, while an unsubscribed event costs nothing more:
1. the payload is JSON (else `invalid-event-json`) and an object (else
   `invalid-event-json` at the offset of its first byte);
2. `eventType` is a non-empty string (else `invalid-field`);
3. the subscription: not subscribed -> no record;
4. `eventData` is an object and the home ID is known (else `invalid-field`);
   `timestamp` never fails: an invalid one is replaced by `received-at`.

`eventData` goes into the record as its bytes were sent, only the whitespace
between its tokens removed (numbers, escapes, key order and duplicate keys as
the device wrote them). A member given twice at the top level counts once,
with its last value.
"""

import json
import re

from .errors import invalid_event_json, invalid_field
from .jsonscan import KIND_NAMES, OBJECT, STRING, JsonFault, compact, kind_of, scan

_U64_MAX = (1 << 64) - 1
_WANTED = frozenset(("eventType", "eventData", "timestamp", "homeId"))
_DIGITS = re.compile(r"[0-9]+")
_quote = json.encoder.encode_basestring  # serde_json's escaping: `"`, `\`, U+0000..U+001F


class Payload:
    """A validated event payload whose subscription is still to be checked."""

    __slots__ = ("event_type", "event_data", "timestamp", "home_id", "payload", "ascii")

    def __init__(self, payload):
        try:
            kind, members = scan(payload)
        except JsonFault as fault:
            raise invalid_event_json(fault.offset, fault.detail) from None
        if kind != OBJECT:
            first = 0
            for i, c in enumerate(payload):
                if c not in b" \t\n\r":
                    first = i
                    break
            raise invalid_event_json(first, f"expected a JSON object, found {KIND_NAMES[kind]}")
        found = {}
        for member in members:
            if member.key in _WANTED:
                found[member.key] = member  # the last one counts
        event_type = found.get("eventType")
        if event_type is None:
            raise invalid_field("eventType", "missing")
        if event_type.text is None:
            raise invalid_field(
                "eventType", f"must be a string, found {KIND_NAMES[kind_of(event_type.raw)]}"
            )
        if event_type.text == "":
            raise invalid_field("eventType", "must not be empty")
        self.event_type = event_type.text
        self.event_data = found.get("eventData")
        self.timestamp = found.get("timestamp")
        self.home_id = found.get("homeId")
        self.payload = payload

    def mode_event(self, device, context):
        """Step 4 and the MODE Event JSON, compact, with its keys in this order:
        `eventType`, `eventData`, `timestamp`, `homeId`, then `originDeviceId`,
        `originDeviceClass`, `originDeviceIp` (device events) or
        `originProjectKeyId`, `originProjectKeyName` (home events), each when
        known. Other payload fields are dropped."""
        data = self.event_data
        if data is None:
            raise invalid_field("eventData", "missing")
        kind = kind_of(data.raw)
        if kind != OBJECT:
            raise invalid_field("eventData", f"must be an object, found {KIND_NAMES[kind]}")
        if not device or context.home_id is not None:
            home_id = context.home_id
        elif self.home_id is not None:
            raw = self.home_id.raw
            if _DIGITS.fullmatch(raw) is None or int(raw) > _U64_MAX:
                raise invalid_field("homeId", f"must be a non-negative integer, found {raw}")
            home_id = int(raw)
        else:
            raise invalid_field(
                "homeId",
                f"device {context.device_id} is not in the device registry "
                "and the event carries no homeId",
            )
        sent = self.timestamp
        if sent is not None and sent.text is not None and is_rfc3339(sent.text):
            timestamp = sent.text
        else:
            timestamp = context.received_at

        head = ['{"eventType":', _quote(self.event_type), ',"eventData":']
        tail = [',"timestamp":', _quote(timestamp), ',"homeId":', str(home_id)]
        if device:
            tail.append(f',"originDeviceId":{context.device_id}')
            if context.device_class is not None:
                tail += (',"originDeviceClass":', _quote(context.device_class))
            if context.device_ip is not None:
                tail += (',"originDeviceIp":', _quote(context.device_ip))
        else:
            if context.project_key_id is not None:
                tail += (',"originProjectKeyId":', _quote(context.project_key_id))
            if context.project_key_name is not None:
                tail += (',"originProjectKeyName":', _quote(context.project_key_name))
        tail.append("}")
        return b"".join(
            ("".join(head).encode(), compact(data.raw_bytes()), "".join(tail).encode())
        )


# ---------------------------------------------------------------------------
# RFC 3339 timestamps (timestamp.rs)

_DATE_TIME = re.compile(
    rb"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    rb"(?:\.[0-9]+)?(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)
_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_rfc3339(s):
    """`YYYY-MM-DDThh:mm:ss[.fraction](Z|+hh:mm|-hh:mm)`, `T`/`t`, `Z`/`z`,
    every field in range: month 1-12, the day valid for the month (29
    February only in leap years), hour < 24, minute < 60, second <= 60 (leap
    second), offset hour < 24 and offset minute < 60."""
    m = _DATE_TIME.fullmatch(s.encode())
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not 1 <= month <= 12 or day == 0 or hour > 23 or minute > 59 or second > 60:
        return False
    if month == 2 and (year % 4 == 0 and year % 100 != 0 or year % 400 == 0):
        days = 29
    else:
        days = _DAYS[month]
    if day > days:
        return False
    if m.group(7) is not None and (int(m.group(7)) > 23 or int(m.group(8)) > 59):
        return False
    return True
