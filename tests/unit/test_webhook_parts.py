"""The webhook building blocks on their own: signatures, secrets, payload models.

The options as twistd parses them, with a real redis-server: tests/integration/test_webhook_parts.py.
"""

from __future__ import annotations

import json

import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from circles.server.providers.events import BadEvent, IdenfyCallback, StripeEvent
from circles.server.providers.secrets import SecretsError, load, parse_file_text
from circles.server.providers.signatures import BadSignature, verify_idenfy, verify_stripe
from devtools.webhook_support import STRIPE_SECRET, encode, idenfy_callback, stripe_event

from ..play_client import new_key, pk

CIRCLE = pk(new_key())
NOW = 1_750_000_000


def stripe_header(body: bytes, secret: str = STRIPE_SECRET, timestamp: int = NOW) -> bytes:
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=timestamp).encode()


def test_stripe_signature_agrees_with_stripes_own_verifier():
    body = encode(stripe_event())
    header = stripe_header(body)
    assert verify_stripe(header, body, [STRIPE_SECRET.encode()], now=NOW, tolerance=300) == NOW
    # Stripe's verifier accepts what we accept (no tolerance: its clock is the real one).
    assert stripe.WebhookSignature.verify_header(body, header.decode(), STRIPE_SECRET, tolerance=None)
    with pytest.raises(BadSignature):
        verify_stripe(header, body + b"\n", [STRIPE_SECRET.encode()], now=NOW, tolerance=300)


@settings(max_examples=300)
@given(header=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_stripe_header_is_refused_cleanly(header):
    with pytest.raises(BadSignature):
        verify_stripe(header, b"{}", [b"secret"], now=NOW, tolerance=300)


@settings(max_examples=200)
@given(header=st.binary(max_size=100))
def test_any_idenfy_header_is_refused_cleanly(header):
    with pytest.raises(BadSignature):
        verify_idenfy(header, b"{}", [b"secret"])


def test_uppercase_hex_signatures_are_accepted():
    body = b'{"a":1}'
    header = stripe_header(body)
    t, v1 = header.split(b",")
    assert verify_stripe(t + b"," + v1.upper().replace(b"V1=", b"v1="), body, [STRIPE_SECRET.encode()],
                         now=NOW, tolerance=300)


def test_secret_file_format(tmp_path):
    other = pk(new_key())
    path = tmp_path / "secrets"
    path.write_text(f"# comment\n\n  whsec_shared  \nwhsec_shared_2\n{CIRCLE} whsec_mine\n{CIRCLE} whsec_mine_2\n")
    secrets = load("whsec_env_1, whsec_env_2,", str(path))
    assert secrets.for_circle(CIRCLE) == (b"whsec_mine", b"whsec_mine_2")
    assert secrets.for_circle(other) == (b"whsec_env_1", b"whsec_env_2", b"whsec_shared", b"whsec_shared_2")
    assert "whsec" not in repr(secrets) and "whsec" not in str(secrets)
    assert not load(None, None) and not load("", None) and not load(" , ", None)


@pytest.mark.parametrize("text", ["a whsec_zzz ccc\n", "nothex whsec_zzz\n"])
def test_bad_secret_files_say_where_not_what(text):
    with pytest.raises(SecretsError) as e:
        parse_file_text(text, "f")
    assert "line 1" in str(e.value) and "zzz" not in str(e.value) and "ccc" not in str(e.value)


def test_stripe_event_model_keeps_unknown_fields():
    event = StripeEvent.parse(encode(stripe_event("evt_1", account="acct_9")))
    assert (event.id, event.type, event.created, event.livemode) == ("evt_1", "payment_intent.succeeded",
                                                                     1_700_000_000, False)
    assert event.api_version == "2024-06-20" and event.object["id"] == "pi_123"
    assert event.extra["account"] == "acct_9" and event.extra["object"] == "event"
    assert StripeEvent.parse(encode(stripe_event(api_version=None))).api_version is None


def test_idenfy_model():
    callback = IdenfyCallback.parse(encode(idenfy_callback("scan-1", "SUSPECTED", AML=[{"status": "x"}])))
    assert (callback.scan_ref, callback.client_id, callback.final) == ("scan-1", "circle-user-1", True)
    assert callback.status.overall == "SUSPECTED" and callback.status.auto_face == "FACE_MATCH"
    assert callback.status.extra["fraudTags"] == [] and callback.data["docFirstName"] == "JOHN"
    assert callback.extra["AML"] == [{"status": "x"}] and callback.extra["platform"] == "PC"
    for overall in ("APPROVED", "DENIED", "SUSPECTED", "EXPIRED", "REVIEWING"):
        IdenfyCallback.parse(encode(idenfy_callback(overall=overall)))
    with pytest.raises(BadEvent):
        IdenfyCallback.parse(encode(idenfy_callback(overall="approved")))


def test_dedupe_names():
    a = IdenfyCallback.parse(encode(idenfy_callback("s", "REVIEWING", final=False)))
    b = IdenfyCallback.parse(encode(idenfy_callback("s", "APPROVED")))
    c = IdenfyCallback.parse(encode(idenfy_callback("s", "APPROVED", clientId="other")))
    assert a.dedupe_name(CIRCLE) != b.dedupe_name(CIRCLE) == c.dedupe_name(CIRCLE)
    assert b.dedupe_name(CIRCLE) != b.dedupe_name(pk(new_key()))  # per circle
    event = StripeEvent.parse(encode(stripe_event("evt_" + "x" * 5000)))
    assert len(event.dedupe_name(CIRCLE)) < 200  # bounded key, whatever the id


def test_event_json_text_is_stored_not_reencoded():
    body = b'{"id":"evt_1","type":"t","created":1,"livemode":true,"data":{"object":{"n":1.10,"big":123456789012345678901234567890}}}'
    event = StripeEvent.parse(body)
    assert event.object["big"] == 123456789012345678901234567890
    assert json.loads(body) == {**event.extra, "id": "evt_1", "type": "t", "created": 1, "livemode": True,
                                "data": {"object": event.object}}


def test_worker_protocol_doc_has_the_lua_steps_as_run():
    import re

    from circles.backend import tasks

    from ..support import ROOT
    blocks = [b.strip() for b in re.findall(r"```lua\n(.*?)```", (ROOT / "docs/worker-protocol.md").read_text(), re.S)]
    for name in ("ENQUEUE", "ENQUEUE_ONCE", "HEARTBEAT", "DEREGISTER", "CLAIM", "GIVE_BACK", "FINISH", "EXPIRE",
                 "TAKE_RESULT", "DEAD_WORKERS", "REAP", "REQUEUE", "STATS", "TAKE", "FINISH_MANY"):
        assert getattr(tasks, name).strip() in blocks, name
