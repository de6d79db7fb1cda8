"""Errors as the WIT `error` variant names them."""


class GuestError(Exception):
    """The `err` side of a handler's result: a WIT `error` case and its fields.

    `kind` is the case name (`invalid-field`, `malformed-payload`, ...);
    `fields` its payload: a dict of the record's fields, a string
    (`unsupported-version`, `other`) or None (`not-configured`).
    """

    def __init__(self, kind, fields=None):
        super().__init__(kind, fields)
        self.kind = kind
        self.fields = fields


def invalid_field(field, detail):
    return GuestError("invalid-field", {"field": field, "detail": detail})


def invalid_settings(field, detail):
    return GuestError("invalid-settings", {"field": field, "detail": detail})


def invalid_event_json(offset, detail):
    return GuestError("invalid-event-json", {"offset": offset, "detail": detail})


def malformed(offset, detail):
    return GuestError("malformed-payload", {"offset": offset, "detail": detail})


def record_too_large(index, size, limit):
    return GuestError("record-too-large", {"index": index, "size": size, "limit": limit})
