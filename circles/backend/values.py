"""Values as txredisapi hands them back, read as text."""

from __future__ import annotations


def text(value) -> str:
    """A value read from Redis as text (txredisapi leaves undecodable bytes as bytes)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
