"""The ksm smart-module logic in Python: a port of the Rust reference guest
(guest/src/), by way of the JavaScript guest (examples/guest-js/guest.js).

Nothing here knows the WIT bindings: the modules take and return plain
Python values and raise `GuestError`; app.py maps them to the WIT types.
"""
