"""circles.common.fast_json: orjson where it gives what ``json`` gives, ``json`` where not."""

from __future__ import annotations

import json
import re

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


# Digits and what borders them: runs of every length around 19, other ASCII, and UTF-8 (whose
# bytes are never ASCII digits, though a character may be a digit elsewhere: U+0660, U+FF10).
_digit_texts = st.lists(
    st.integers(0, 25).map(lambda n: b"7" * n) | st.sampled_from([b"0", b"9", b"x", b" ", b"-", b".", b"e", b"/", b":"])
    | st.text(max_size=3).map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=3),
    max_size=8).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(_digit_texts)
def test_long_digits_is_a_run_of_19_ascii_digits(data):
    assert fast_json.long_digits(data) == (re.search(rb"[0-9]{19}", data) is not None)
    assert fast_json.long_digits(bytearray(data)) == fast_json.long_digits(data)


def test_a_run_of_exactly_19_digits_anywhere_is_long_and_18_is_not():
    for at in (b"", b'{"n":', b"x" * 1000):
        assert fast_json.long_digits(at + b"1234567890123456789")
        assert fast_json.long_digits(at + b"1234567890123456789" + b"}")
        assert not fast_json.long_digits(at + b"123456789012345678" + b"}")
        assert not fast_json.long_digits(at + b"123456789012345678.123456789012345678")
    assert not fast_json.long_digits("٠١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩".encode())  # Arabic-Indic digits: not JSON's


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
