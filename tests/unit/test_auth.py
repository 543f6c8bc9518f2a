"""Authentication: our verifier against signers we did not write, and the nonce store's rules.

Signers: eth-account (Ethereum personal_sign, v=27/28 and rewritten to 0/1), coincurve (DER,
and compact r||s built from it with cryptography's DER decoder), python-ecdsa (deterministic
64-byte and DER, including high-S twins, which we accept after normalising).
"""

from __future__ import annotations

import hashlib
import secrets

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from ecdsa import SECP256k1, SigningKey
from ecdsa.util import sigdecode_string, sigencode_der, sigencode_string
from eth_account import Account
from eth_account.messages import encode_defunct
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.signatures import AuthenticationFailed, eth_personal_digest, signature_matches
from circles.server.access.nonces import NONCE_BYTES, NonceStore, TooManyNonces

N = SECP256k1.order
P = 2**256 - 2**32 - 977  # the field prime
TTL = 300.0


# --- signers --------------------------------------------------------------------------------


class Key:
    """One secp256k1 key, with the signers we use on it."""

    def __init__(self) -> None:
        self.private = coincurve.PrivateKey()
        self.compressed = self.private.public_key.format(compressed=True).hex()
        self.uncompressed = self.private.public_key.format(compressed=False).hex()

    # eth-account: what MetaMask/ethers produce
    def eth(self, nonce: str) -> bytes:
        signed = Account.sign_message(encode_defunct(text=nonce), private_key=self.private.secret)
        return bytes(signed.signature)

    # coincurve: DER over sha256, low-S
    def der(self, nonce: str) -> bytes:
        return self.private.sign(nonce.encode("utf-8"))

    def compact(self, nonce: str) -> bytes:
        r, s = decode_dss_signature(self.der(nonce))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    # python-ecdsa
    def ecdsa_key(self) -> SigningKey:
        return SigningKey.from_string(self.private.secret, curve=SECP256k1, hashfunc=hashlib.sha256)


def hexed(raw: bytes, prefix: str = "0x") -> str:
    return prefix + raw.hex()


def high_s_compact(compact: bytes) -> bytes:
    r = int.from_bytes(compact[:32], "big")
    s = int.from_bytes(compact[32:], "big")
    s = s if s > N // 2 else N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def der_of(compact: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(compact[:32], "big"), int.from_bytes(compact[32:], "big"))


@pytest.fixture
def key() -> Key:
    return Key()


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def store(clock) -> NonceStore:
    return NonceStore(clock, TTL, 16)


def settled(d):
    """The result of a Deferred that has fired (the memory store's), its failure raised."""
    results = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def redeem_ok(store: NonceStore, key: Key, signature: str, claimed: str = None) -> None:
    assert store.redeem(normalize_pubkey(claimed or key.compressed), signature) == key.compressed


# --- Ethereum personal_sign (65 bytes) --------------------------------------------------------


def test_eth_account_signature_v27_28(store, key):
    nonce = store.issue_now(key.compressed).value
    raw = key.eth(nonce)
    assert len(raw) == 65 and raw[64] in (27, 28)
    redeem_ok(store, key, hexed(raw))


def test_eth_account_signature_rewritten_to_v0_1(store, key):
    nonce = store.issue_now(key.compressed).value
    raw = key.eth(nonce)
    raw = raw[:64] + bytes([raw[64] - 27])
    redeem_ok(store, key, hexed(raw, ""))


def test_eth_account_signature_flipped_v_is_refused(store, key):
    nonce = store.issue_now(key.compressed).value
    raw = key.eth(nonce)
    flipped = raw[:64] + bytes([55 - raw[64]])  # 27 <-> 28: recovers some other key
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(flipped))
    redeem_ok(store, key, hexed(raw))  # the failed attempt consumed nothing


def test_eth_digest_matches_eth_account(key):
    message = "circles nonce \u00e9"
    signable = encode_defunct(text=message)
    expected = Account.sign_message(signable, private_key=key.private.secret).message_hash
    assert eth_personal_digest(message.encode("utf-8")) == bytes(expected)


def test_eth_signature_recovers_without_claimed_key(key):
    raw = key.eth("hello")
    assert signature_matches(b"hello", hexed(raw), None) == key.compressed
    assert signature_matches(b"hellO", hexed(raw), None) != key.compressed


@pytest.mark.parametrize("v", [2, 3, 26, 29, 35, 36, 37, 38, 255])
def test_eip155_and_other_recovery_ids_refused_not_crash(store, key, v):
    nonce = store.issue_now(key.compressed).value
    raw = key.eth(nonce)[:64] + bytes([v])
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(raw))


@pytest.mark.parametrize("rs", [bytes(64), b"\xff" * 64, N.to_bytes(32, "big") * 2])
def test_eth_signature_that_recovers_nothing_refused(store, key, rs):
    store.issue_now(key.compressed)
    for v in (0, 1, 27, 28):
        with pytest.raises(AuthenticationFailed):
            store.redeem(key.compressed, hexed(rs + bytes([v])))


# --- ECDSA over SHA-256: coincurve ------------------------------------------------------------


def test_coincurve_der(store, key):
    nonce = store.issue_now(key.compressed).value
    redeem_ok(store, key, hexed(key.der(nonce)))


def test_coincurve_compact_from_der(store, key):
    nonce = store.issue_now(key.compressed).value
    compact = key.compact(nonce)
    assert len(compact) == 64
    redeem_ok(store, key, hexed(compact, ""))


def test_coincurve_recoverable_is_not_our_form(store, key):
    # sign_recoverable is r||s||recid over SHA-256: 65 bytes, so it is read as personal_sign
    # (keccak/EIP-191) and recovers some other key. It must be refused, not mistaken.
    nonce = store.issue_now(key.compressed).value
    raw = key.private.sign_recoverable(nonce.encode("utf-8"))
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(raw))


# --- ECDSA over SHA-256: python-ecdsa, with high-S ------------------------------------------------


def test_python_ecdsa_generated_key_compact_and_der(clock):
    store = NonceStore(clock, TTL, 16)
    sk = SigningKey.generate(curve=SECP256k1, hashfunc=hashlib.sha256)
    pubkey = sk.get_verifying_key().to_string("compressed").hex()
    for encode in (sigencode_string, sigencode_der):
        nonce = store.issue_now(pubkey).value
        signature = sk.sign_deterministic(nonce.encode("utf-8"), sigencode=encode)
        assert store.redeem(pubkey, signature.hex()) == pubkey


def test_python_ecdsa_high_and_low_s(store, key):
    sk = key.ecdsa_key()
    for _ in range(4):
        nonce = store.issue_now(key.compressed).value
        compact = sk.sign_deterministic(nonce.encode("utf-8"), sigencode=sigencode_string)
        high = high_s_compact(compact)
        low = high[:32] + (N - int.from_bytes(high[32:], "big")).to_bytes(32, "big")
        assert int.from_bytes(high[32:], "big") > N // 2
        for form in (high, low, der_of(high), der_of(low)):
            assert signature_matches(nonce.encode("utf-8"), hexed(form), key.compressed) == key.compressed
        # and through the store, high-S DER as python-ecdsa would encode it:
        r, s = sigdecode_string(high, N)
        assert store.redeem(key.compressed, sigencode_der(r, s, N).hex()) == key.compressed


def test_python_ecdsa_raw_high_s_output(store):
    # Find a python-ecdsa signature that is high-S as produced (no rewriting at all).
    sk = SigningKey.generate(curve=SECP256k1, hashfunc=hashlib.sha256)
    pubkey = sk.get_verifying_key().to_string("uncompressed").hex()
    compressed = normalize_pubkey(pubkey)
    for _ in range(64):
        nonce = store.issue_now(compressed).value
        sig = sk.sign_deterministic(nonce.encode("utf-8"), sigencode=sigencode_string)
        if int.from_bytes(sig[32:], "big") > N // 2:
            break
        store.redeem(compressed, sig.hex())  # low-S ones on the way must pass too
    else:
        pytest.fail("no high-S signature in 64 tries")
    assert store.redeem(normalize_pubkey(pubkey), sig.hex()) == compressed


def test_ecdsa_over_keccak_is_refused(store, key):
    # A 64-byte signature over the Ethereum digest is not the SHA-256 form.
    nonce = store.issue_now(key.compressed).value
    digest = eth_personal_digest(nonce.encode("utf-8"))
    der = key.private.sign(digest, hasher=None)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(der))


# --- public key forms -------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["compressed", "uncompressed", "0x-compressed", "0X-uncompressed",
                                  "upper-compressed", "0x-upper-uncompressed"])
def test_pubkey_forms_accepted(store, key, form):
    text = key.uncompressed if "uncompressed" in form else key.compressed
    if "upper" in form:
        text = text.upper()
    if form.startswith("0x"):
        text = "0x" + text
    if form.startswith("0X"):
        text = "0X" + text
    assert normalize_pubkey(text) == key.compressed
    nonce = store.issue_now(normalize_pubkey(text)).value
    redeem_ok(store, key, hexed(key.eth(nonce)), claimed=text)
    nonce = store.issue_now(normalize_pubkey(text)).value
    redeem_ok(store, key, hexed(key.der(nonce)), claimed=text)


def _not_on_curve_x() -> int:
    x = 5
    while pow((x**3 + 7) % P, (P - 1) // 2, P) == 1:  # a square: on the curve
        x += 1
    return x


@pytest.mark.parametrize("text", [
    "",
    "0x",
    "zz" * 33,
    "02" + "g" * 64,
    "02" + "ab" * 31 + "a",  # odd length
    "02" + "ab" * 31,  # 32 bytes
    "02" + "ab" * 33,  # 34 bytes
    "04" + "ab" * 63,  # 64 bytes
    "05" + "11" * 32,  # bad prefix
    "00" * 33,
    "02" + "00" * 32,  # x = 0 is not on the curve
    "02" + "ff" * 32,  # x >= p
    "02" + format(_not_on_curve_x(), "064x"),
    "03" + format(_not_on_curve_x(), "064x"),
    "04" + "11" * 64,  # random uncompressed point
    "\u0660" * 66,  # Arabic-Indic digits are not hex
])
def test_invalid_pubkeys(text):
    with pytest.raises(InvalidKey):
        normalize_pubkey(text)


@pytest.mark.parametrize("value", [None, 2, b"02" * 33, ["02"]])
def test_pubkey_must_be_a_string(value):
    with pytest.raises(InvalidKey):
        normalize_pubkey(value)


def test_hybrid_pubkeys_refused(key):
    # 06/07 + x + y: libsecp256k1 parses SEC 1's hybrid form; one key must name one circle.
    raw = bytes.fromhex(key.uncompressed)
    hybrid = bytes([6 | (raw[-1] & 1)]) + raw[1:]
    with pytest.raises(InvalidKey, match="must start with 02 or 03"):
        normalize_pubkey(hybrid.hex())
    with pytest.raises(InvalidKey, match="must start with 02 or 03"):
        normalize_pubkey("04" + key.compressed[2:])  # a compressed key's length with 04


def test_uncompressed_with_wrong_y_refused(key):
    raw = bytes.fromhex(key.uncompressed)
    y = int.from_bytes(raw[33:], "big")
    bad = raw[:33] + ((y + 1) % P).to_bytes(32, "big")
    with pytest.raises(InvalidKey):
        normalize_pubkey(bad.hex())


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signature", [
    "", "0x", "zz", "0xzz" + "00" * 64, "abc", "0x" + "0" * 129, "g" * 130,
    "00" * 63, "00" * 66, "00" * 64, "00" * 8, "30" + "00" * 70, "ff" * 72,
])
def test_malformed_or_wrong_length_signatures_refused(store, key, signature):
    store.issue_now(key.compressed)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, signature)


@pytest.mark.parametrize("signature", [None, 5, b"00" * 65, ["00"]])
def test_signature_must_be_a_string(store, key, signature):
    store.issue_now(key.compressed)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, signature)


def test_der_with_trailing_garbage_refused(store, key):
    nonce = store.issue_now(key.compressed).value
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(key.der(nonce) + b"\x00"))
    redeem_ok(store, key, hexed(key.der(nonce)))


@pytest.mark.parametrize("signer", ["eth", "der", "compact"])
def test_signature_by_another_key_refused(store, key, signer):
    other = Key()
    nonce = store.issue_now(key.compressed).value
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(getattr(other, signer)(nonce)))
    # and the other key claiming itself has no nonce here
    with pytest.raises(AuthenticationFailed):
        store.redeem(other.compressed, hexed(getattr(other, signer)(nonce)))


@pytest.mark.parametrize("signer", ["eth", "der"])
def test_nonce_never_issued_refused(store, key, signer):
    made_up = secrets.token_hex(NONCE_BYTES)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(getattr(key, signer)(made_up)))
    store.issue_now(key.compressed)  # a live nonce exists, but not the one signed
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(getattr(key, signer)(made_up)))
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(made_up, key.compressed, hexed(getattr(key, signer)(made_up))))


@pytest.mark.parametrize("signer", ["eth", "der", "compact"])
def test_nonce_used_twice_refused(store, key, signer):
    nonce = store.issue_now(key.compressed).value
    signature = hexed(getattr(key, signer)(nonce))
    redeem_ok(store, key, signature)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, signature)


def test_nonce_issued_for_another_pubkey_refused(store, key):
    other = Key()
    nonce = store.issue_now(other.compressed).value
    for signer in ("eth", "der"):
        with pytest.raises(AuthenticationFailed):
            store.redeem(key.compressed, hexed(getattr(key, signer)(nonce)))
    # redeem_value names the nonce: refused, and the nonce is gone
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(nonce, key.compressed, hexed(key.eth(nonce))))
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(nonce, other.compressed, hexed(other.eth(nonce))))


def test_nonce_issued_without_pubkey_serves_any_key(store, key):
    nonce = store.issue_now(None).value
    redeem_ok(store, key, hexed(key.compact(nonce)))


@pytest.mark.parametrize("signer", ["eth", "der"])
def test_expired_nonce_refused(clock, store, key, signer):
    nonce = store.issue_now(key.compressed)
    assert nonce.expires_at == clock.seconds() + TTL
    signature = hexed(getattr(key, signer)(nonce.value))
    clock.advance(TTL)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, signature)


def test_nonce_valid_until_just_before_expiry(clock, store, key):
    nonce = store.issue_now(key.compressed).value
    clock.advance(TTL - 0.001)
    redeem_ok(store, key, hexed(key.eth(nonce)))


def test_redeem_value_consumes_whatever_the_outcome(clock, store, key):
    nonce = store.issue_now(key.compressed).value
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(nonce, key.compressed, hexed(Key().eth(nonce))))
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(nonce, key.compressed, hexed(key.eth(nonce))))
    nonce = store.issue_now(key.compressed).value
    assert settled(store.redeem_value(nonce, key.compressed, hexed(key.der(nonce)))) == key.compressed
    nonce = store.issue_now(key.compressed).value
    clock.advance(TTL)
    with pytest.raises(AuthenticationFailed):
        settled(store.redeem_value(nonce, key.compressed, hexed(key.der(nonce))))


# --- the store --------------------------------------------------------------------------------


def test_cap_refuses_when_full_of_live_nonces(clock):
    store = NonceStore(clock, TTL, 3)
    issued = [store.issue_now() for _ in range(3)]
    with pytest.raises(TooManyNonces):
        store.issue_now()
    assert len(store) == 3
    clock.advance(TTL / 2)
    with pytest.raises(TooManyNonces):
        store.issue_now()
    clock.advance(TTL / 2)
    assert len(store) == 0  # all expired and swept
    store.issue_now()
    assert len(store) == 1
    assert all(store.take(n.value) is None for n in issued)


def test_sweep_drops_only_expired(clock, key):
    store = NonceStore(clock, TTL, 10)
    first = store.issue_now(key.compressed)
    clock.advance(100)
    second = store.issue_now(key.compressed)
    assert len(store) == 2
    clock.advance(TTL - 100)
    assert len(store) == 1
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(key.eth(first.value)))
    redeem_ok(store, key, hexed(key.eth(second.value)))
    assert len(store) == 0


def test_redeeming_frees_a_slot(clock, key):
    store = NonceStore(clock, TTL, 1)
    nonce = store.issue_now(key.compressed).value
    with pytest.raises(TooManyNonces):
        store.issue_now(key.compressed)
    redeem_ok(store, key, hexed(key.eth(nonce)))
    store.issue_now(key.compressed)


def test_nonces_are_at_least_128_bits_and_unique(clock):
    store = NonceStore(clock, TTL, 5000)
    values = [store.issue_now().value for _ in range(5000)]
    assert len(set(values)) == len(values)
    for v in values[:50]:
        assert len(v) * 4 >= 128
        int(v, 16)  # hex
    assert NONCE_BYTES * 8 >= 128
    # not a counter: high bits vary
    assert len({v[:4] for v in values}) > 1000


@pytest.mark.parametrize("where", ["pubkey", "signature"])
@pytest.mark.parametrize("mangle", [
    lambda h: " " + h,
    lambda h: h + "\n",
    lambda h: h[:10] + " " + h[10:],
    lambda h: "0x " + h,
    lambda h: h[:2] + "\t" + h[2:],
], ids=["leading-space", "trailing-newline", "inner-space", "space-after-0x", "tab"])
def test_hex_with_whitespace_is_malformed(store, key, where, mangle):
    nonce = store.issue_now(key.compressed).value
    signature = key.eth(nonce).hex()
    if where == "pubkey":
        with pytest.raises(InvalidKey):
            normalize_pubkey(mangle(key.compressed))
    else:
        with pytest.raises(AuthenticationFailed):
            store.redeem(key.compressed, mangle(signature))
        redeem_ok(store, key, signature)


# --- malleated personal_sign, and one signature check per authenticate ------------------


def _malleated(raw: bytes) -> bytes:
    """The same signature's twin: s replaced by n - s, v flipped; it recovers the same key."""
    s = int.from_bytes(raw[32:64], "big")
    return raw[:32] + (N - s).to_bytes(32, "big") + bytes([55 - raw[64]])


def test_eth_high_s_twin_is_refused(store, key):
    """Ethereum's rule since Homestead (EIP-2). The twin recovers the very same key, so without
    the rule it would be accepted; eth-account and coincurve only ever make low-S signatures."""
    nonce = store.issue_now(key.compressed).value
    raw = key.eth(nonce)
    twin = _malleated(raw)
    recovered = coincurve.PublicKey.from_signature_and_message(
        twin[:64] + bytes([twin[64] - 27]), eth_personal_digest(nonce.encode("utf-8")), hasher=None)
    assert recovered.format(compressed=True).hex() == key.compressed  # a genuine twin
    with pytest.raises(AuthenticationFailed, match="EIP-2"):
        store.redeem(key.compressed, hexed(twin))
    with pytest.raises(AuthenticationFailed, match="EIP-2"):
        signature_matches(nonce.encode("utf-8"), hexed(twin), None)
    redeem_ok(store, key, hexed(raw))


class _Counted:
    def __init__(self, monkeypatch) -> None:
        import circles.common.signatures

        self.calls = 0
        for name in ("recover_eth_signer", "verify_ecdsa"):
            original = getattr(circles.common.signatures, name)
            monkeypatch.setattr(circles.common.signatures, name, self._counting(original))

    def _counting(self, original):
        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        return counted


@pytest.mark.parametrize("signer", ["eth", "der"])
@pytest.mark.parametrize("named", [False, True])
def test_a_failed_redeem_checks_one_signature_whatever_the_live_nonces(clock, key, monkeypatch, signer, named):
    store = NonceStore(clock, TTL, 16)
    nonces = [store.issue_now(key.compressed).value for _ in range(8)] + [store.issue_now().value for _ in range(8)]
    other = Key()
    counted = _Counted(monkeypatch)
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(getattr(other, signer)(nonces[3])), nonces[3] if named else None)
    assert counted.calls == 1
    assert len(store) == 16  # consumed nothing


def test_redeem_checks_the_newest_nonce_unless_one_is_named(store, key):
    older, newer = store.issue_now(key.compressed).value, store.issue_now(key.compressed).value
    with pytest.raises(AuthenticationFailed):
        store.redeem(key.compressed, hexed(key.eth(older)))  # not the newest: name it
    assert store.redeem(key.compressed, hexed(key.eth(older)), older) == key.compressed
    assert store.redeem(key.compressed, hexed(key.eth(newer))) == key.compressed
    with pytest.raises(AuthenticationFailed, match="unknown, used or expired"):
        store.redeem(key.compressed, hexed(key.eth(older)), older)


def test_a_named_nonce_of_another_key_is_refused(store, key):
    other = Key()
    nonce = store.issue_now(other.compressed).value
    with pytest.raises(AuthenticationFailed, match="another public key"):
        store.redeem(key.compressed, hexed(key.eth(nonce)), nonce)
    # with pubkey left out, the named nonce's key is the one the signature must recover to
    with pytest.raises(AuthenticationFailed):
        store.redeem(None, hexed(key.eth(nonce)), nonce)
    assert store.redeem(None, hexed(other.eth(nonce)), nonce) == other.compressed


def test_unnamed_redeem_prefers_the_newest_nonce_for_the_key_over_unbound_ones(store, key):
    keyed = store.issue_now(key.compressed).value
    unbound = store.issue_now().value
    assert store.redeem(key.compressed, hexed(key.eth(keyed))) == key.compressed
    assert store.redeem(key.compressed, hexed(key.eth(unbound))) == key.compressed  # none for the key left


def test_per_owner_share_is_freed_by_use_and_expiry(clock, key):
    store = NonceStore(clock, TTL, 10, per_owner=2)
    first = store.issue_now(key.compressed, owner="a")
    store.issue_now(owner="a")
    with pytest.raises(TooManyNonces, match="from this client"):
        store.issue_now(owner="a")
    store.issue_now(owner="b")  # another owner has its own share
    store.issue_now()  # and nonces without an owner count only in the total
    assert store.owned_by("a") == 2 and store.owned_by("b") == 1
    redeem_ok(store, key, hexed(key.eth(first.value)))  # spending one frees a place
    assert store.owned_by("a") == 1
    taken = store.issue_now(owner="a")
    assert store.take(taken.value) == taken and store.owned_by("a") == 1
    clock.advance(TTL)  # expiry frees the rest
    assert store.owned_by("a") == 0 and store.owned_by("b") == 0 and len(store) == 0
    assert store.issue_now(owner="a").owner == "a"
