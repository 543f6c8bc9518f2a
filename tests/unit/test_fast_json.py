"""circles.common.fast_json: orjson where it gives what ``json`` gives, ``json`` where not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circles.common import fast_json

# What a reply or a frame may hold: text (lone surrogates included), integers of any size,
# finite floats, and objects and arrays of those.
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(values)
def test_what_it_writes_and_reads_are_the_values_json_writes_and_reads(value):
    written = fast_json.dumps(value)
    assert isinstance(written, bytes)
    assert json.loads(written.decode("utf-8")) == value  # valid JSON, UTF-8, the same value
    assert fast_json.loads(written) == value
    assert fast_json.loads(json.dumps(value)) == value  # what another writer (json) wrote, read back
    assert fast_json.loads(json.dumps(value).encode("utf-8")) == value


def test_the_cases_orjson_alone_would_get_wrong():
    big = 2 ** 70
    assert fast_json.loads(b'{"n": %d}' % big) == {"n": big}  # orjson alone: a float
    assert fast_json.dumps({"n": big}) == b'{"n":%d}' % big  # orjson alone: refused
    assert fast_json.loads(b'"\\ud800"') == "\ud800"  # valid JSON that orjson refuses
    assert fast_json.dumps("\ud800") == b'"\\ud800"'
    assert fast_json.dumps({"kind": "done"}) == b'{"kind":"done"}'


@pytest.mark.parametrize("text", [b"", b"{", b"nul", b'{"a": 1} x', b"\xff\xfe{}", "[1,]"])
def test_what_is_not_json_is_a_value_error(text):
    with pytest.raises(ValueError):
        fast_json.loads(text)


def test_text_nested_deeper_than_the_bound_is_refused_before_any_decoder():
    # A child or a reply can send anything: json's C decoder recurses once a level, and under a
    # raised recursion limit 100,000 levels would overflow the C stack instead of raising.
    deep = b"[" * (fast_json.MAX_DEPTH + 1) + b"]" * (fast_json.MAX_DEPTH + 1)
    with pytest.raises(ValueError, match="nested deeper"):
        fast_json.loads(deep)
    with pytest.raises(ValueError, match="nested deeper"):
        fast_json.loads(b"[" * 100_000)
    ok = b"[" * fast_json.MAX_DEPTH + b"]" * fast_json.MAX_DEPTH
    assert fast_json.loads(ok) is not None
    assert fast_json.loads(bytearray(b'{"kind":"done"}')) == {"kind": "done"}
