"""A deployment of the Rust circles server switches over unchanged: its variable names
(``STRIPE_WEBHOOK_SECRET``, ``IDENFY_WEBHOOK_SECRET``, ``REDIS_URL``) and its clients' habit of
writing keys uncompressed (130 hex digits) in the path.

Here the names as the options and the environment read them, in this process; end to end
through real ``twistd`` processes and a real redis-server in tests/integration/test_original_names.py.
"""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.python import usage

from circles.backend.redis_options import ORIGINAL_REDIS_URL_ENV, REDIS_URL_ENV, choose_redis
from circles.common.options import DotenvError, from_environment, parse_dotenv, read_dotenv
from circles.protocol import circle_from_path
from circles.server.http.upgrade import is_circle_upgrade
from circles.server.providers.secrets import IDENFY_ENV, IDENFY_ENVS, STRIPE_ENV, STRIPE_ENVS

from ..support import Key

ALL_NAMES = (*STRIPE_ENVS, *IDENFY_ENVS, REDIS_URL_ENV, ORIGINAL_REDIS_URL_ENV)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only what a test sets: none of the names may leak in from the machine running the tests."""
    for name in ALL_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_from_environment_order_and_empty_values():
    names = (STRIPE_ENV, "STRIPE_WEBHOOK_SECRET")
    assert from_environment(names, {}) == (None, None, ())
    assert from_environment(names, {"STRIPE_WEBHOOK_SECRET": "b"}) == ("b", "$STRIPE_WEBHOOK_SECRET", ())
    assert from_environment(names, {STRIPE_ENV: "a", "STRIPE_WEBHOOK_SECRET": "b"}) == \
        ("a", f"${STRIPE_ENV}", ("$STRIPE_WEBHOOK_SECRET",))
    # An empty value is not set: it neither wins nor is reported as ignored.
    assert from_environment(names, {STRIPE_ENV: "", "STRIPE_WEBHOOK_SECRET": "b"}) == ("b", "$STRIPE_WEBHOOK_SECRET", ())
    assert IDENFY_ENVS == (IDENFY_ENV, "IDENFY_WEBHOOK_SECRET")
    # A .env is looked at only when the environment has none of the names, whichever they are.
    dotenv = ("/srv/{x}/.env", {STRIPE_ENV: "ours-in-file", "STRIPE_WEBHOOK_SECRET": "theirs-in-file"})
    assert from_environment(names, {"STRIPE_WEBHOOK_SECRET": "b"}, dotenv) == ("b", "$STRIPE_WEBHOOK_SECRET", ())
    assert from_environment(names, {}, dotenv) == \
        ("ours-in-file", f"{STRIPE_ENV} in /srv/{{x}}/.env", ("STRIPE_WEBHOOK_SECRET in /srv/{x}/.env",))


def test_redis_url_sources(tmp_path, monkeypatch):
    options = {"redis-url": None, "state-dir": str(tmp_path)}
    assert choose_redis(options, reactor).private
    monkeypatch.setenv("REDIS_URL", "redis://theirs:6379/0")
    choice = choose_redis(options, reactor)
    assert (choice.url, choice.source, choice.ignored) == ("redis://theirs:6379/0", "$REDIS_URL", ())
    monkeypatch.setenv(REDIS_URL_ENV, "redis://ours:6379/0")
    choice = choose_redis(options, reactor)
    assert (choice.url, choice.source, choice.ignored) == ("redis://ours:6379/0", "$CIRCLES_REDIS_URL", ("$REDIS_URL",))
    choice = choose_redis({**options, "redis-url": "redis://argv:6379/0"}, reactor)
    assert (choice.url, choice.source) == ("redis://argv:6379/0", "--redis-url")
    assert choice.log_line() == "Redis URL from --redis-url ($CIRCLES_REDIS_URL, $REDIS_URL also set: ignored)"
    monkeypatch.delenv(REDIS_URL_ENV)
    monkeypatch.setenv("REDIS_URL", "nonsense://x")
    with pytest.raises(usage.UsageError, match=r"\(from \$REDIS_URL\)"):
        choose_redis(options, reactor)
    monkeypatch.delenv("REDIS_URL")
    choice = choose_redis(options, reactor, ("/d/.env", {"REDIS_URL": "redis://file:6379/0"}))
    assert (choice.url, choice.source) == ("redis://file:6379/0", "REDIS_URL in /d/.env")


def test_dotenv_parser_is_strict_and_never_quotes_a_value():
    text = ("# deployment\n\nexport REDIS_URL=redis://:pw@host:6379/0\nSTRIPE_WEBHOOK_SECRET='whsec_$x y\"z'\n"
            'IDENFY_WEBHOOK_SECRET="plain words"\n  EMPTY=\n')
    assert parse_dotenv(text) == {"REDIS_URL": "redis://:pw@host:6379/0", "STRIPE_WEBHOOK_SECRET": 'whsec_$x y"z',
                                  "IDENFY_WEBHOOK_SECRET": "plain words", "EMPTY": ""}
    for line in ("REDIS_URL = Zq9", "NOT A LINE Zq9", "1X=Zq9", "X=a Zq9", "X=$Zq9", 'X="${Zq9}"', 'X="a\\"Zq9"',
                 "X=a#Zq9", "X='Zq9", "X=`Zq9`", "X='a'Zq9'", "X=Zq9\\"):
        with pytest.raises(DotenvError, match=r"\.env, line 2:") as refused:
            parse_dotenv(f"OK=1\n{line}\n")
        assert "Zq9" not in str(refused.value)


def test_dotenv_only_in_the_working_directory(tmp_path):
    (tmp_path / ".env").write_text("REDIS_URL=redis://parent:6379/0\n")
    (tmp_path / "sub").mkdir()
    assert read_dotenv(str(tmp_path / "sub")) == (str(tmp_path / "sub" / ".env"), {})
    assert read_dotenv(str(tmp_path)) == (str(tmp_path / ".env"), {"REDIS_URL": "redis://parent:6379/0"})


@pytest.mark.parametrize("length, circle", [(66, True), (130, True), (64, False), (65, False), (67, False),
                                            (128, False), (129, False), (131, False), (132, False)])
def test_circle_paths_by_length(length, circle):
    key = Key()
    text = {66: key.pubkey, 130: key.uncompressed}.get(length, (key.uncompressed + "00")[:length])
    head = f"GET /{text}?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n".encode()
    assert is_circle_upgrade(head) is circle
    assert circle_from_path(f"/{text}") == (key.pubkey if circle else None)
