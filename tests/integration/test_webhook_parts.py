"""The webhook options as twistd parses them, with a real redis-server behind --redis-url.

The building blocks on their own (signatures, secrets, payload models): tests/unit/test_webhook_parts.py.
"""

from __future__ import annotations

import pytest

from circles import server_tap
from circles.server.providers.secrets import IDENFY_ENV, STRIPE_ENV, WebhookSecrets

from ..unit.test_webhook_parts import CIRCLE


def test_options_read_secrets_from_env_and_files(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv(STRIPE_ENV, "whsec_a,whsec_b")
    monkeypatch.delenv(IDENFY_ENV, raising=False)
    (tmp_path / "idenfy").write_text(f"{CIRCLE} s3cret\n")
    (tmp_path / "script.rhai").write_text("handle(CIRCLES_DATA)\n")
    options = server_tap.Options()
    options.parseOptions(["--redis-url", redis_server.url, "--idenfy-secret-file", str(tmp_path / "idenfy"),
                          "--stripe-script", str(tmp_path / "script.rhai"), "--webhook-tolerance", "60",
                          "--max-request-body", "5000"])
    config = options.config
    assert config.stripe_secrets == WebhookSecrets.of("whsec_a", "whsec_b")
    assert config.idenfy_secrets.for_circle(CIRCLE) == (b"s3cret",) and config.idenfy_secrets.for_circle("x") == ()
    assert config.stripe_script == "handle(CIRCLES_DATA)\n" and config.idenfy_script is None
    assert (config.webhook_tolerance, config.max_request_body) == (60, 5000)
    assert "whsec_a" not in repr(config) and "s3cret" not in repr(config)


@pytest.mark.parametrize("args, message", [
    (["--stripe-secret-file", "/nonexistent/secrets"], "cannot read /nonexistent/secrets"),
    (["--idenfy-script", "/nonexistent/script"], "--idenfy-script: cannot read"),
])
def test_options_refuse_unreadable_files(args, message, redis_server, monkeypatch):
    options = server_tap.Options()
    with pytest.raises(SystemExit) as e:
        options.parseOptions(["--redis-url", redis_server.url, *args])
    assert message in str(e.value)
