"""Webhook signing secrets: where they come from and which apply to a circle.

Secrets come from the environment (``CIRCLES_STRIPE_WEBHOOK_SECRET``,
``CIRCLES_IDENFY_WEBHOOK_SECRET``: comma-separated; else the Rust circles server's names,
``STRIPE_WEBHOOK_SECRET`` and ``IDENFY_WEBHOOK_SECRET``) or from a file, never from the command line
(argv is visible to every user of the machine). Several secrets may be live at once, so a
provider's secret can be rotated without refusing deliveries signed with the old one.

A secret file has one secret per line; blank lines and lines starting with ``#`` are skipped::

    whsec_for_every_circle
    02a1b2...<66 hex chars: a circle's key> whsec_for_that_circle_only

A line with one field applies to every circle; a line with two (circle key, secret) to that
circle only. A circle with secrets of its own accepts only those (a shared secret must not let
one circle's provider account post events to another circle); other circles use the shared ones.

Secrets are kept as bytes inside :class:`WebhookSecrets`, whose ``repr`` shows only counts, so
they cannot end up in a log line or an error by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.options import SecretFileError, read_secret_file

STRIPE_ENV = "CIRCLES_STRIPE_WEBHOOK_SECRET"
IDENFY_ENV = "CIRCLES_IDENFY_WEBHOOK_SECRET"
# Where each provider's secrets are looked for, first set wins: ours, then the original server's.
STRIPE_ENVS = (STRIPE_ENV, "STRIPE_WEBHOOK_SECRET")
IDENFY_ENVS = (IDENFY_ENV, "IDENFY_WEBHOOK_SECRET")


class SecretsError(ValueError):
    """A secret source is unreadable or malformed; the message never contains a secret."""


def _bytes_tuple(values: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(values)


def _freeze_map(mapping: Mapping[str, Iterable[bytes]]) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
    return tuple(sorted((circle, tuple(secrets)) for circle, secrets in dict(mapping).items()))


@attrs.frozen(repr=False)
class WebhookSecrets:
    """The secrets of one provider: ``shared`` for every circle, ``per_circle`` overriding them."""

    shared: tuple[bytes, ...] = attrs.field(default=(), converter=_bytes_tuple)
    per_circle: tuple[tuple[str, tuple[bytes, ...]], ...] = attrs.field(default=(), converter=_freeze_map)

    def for_circle(self, circle: str) -> tuple[bytes, ...]:
        """The secrets a delivery for ``circle`` (compressed hex) may be signed with; empty: off."""
        for name, secrets in self.per_circle:
            if name == circle:
                return secrets
        return self.shared

    def __bool__(self) -> bool:
        return bool(self.shared or self.per_circle)

    def __repr__(self) -> str:
        return f"<WebhookSecrets: {len(self.shared)} shared, {len(self.per_circle)} circle(s) with their own>"

    @classmethod
    def of(cls, *secrets: str, **per_circle: Iterable[str]) -> WebhookSecrets:
        """Build by hand (embedding, tests): ``WebhookSecrets.of("whsec_a", "whsec_b")``."""
        return cls(tuple(s.encode("utf-8") for s in secrets),
                   {normalize_pubkey(c): [s.encode("utf-8") for s in v] for c, v in per_circle.items()})


def parse_list(value: str | None) -> tuple[bytes, ...]:
    """Secrets from a comma-separated environment value (whitespace around each is dropped)."""
    if not value:
        return ()
    return tuple(item.strip().encode("utf-8") for item in value.split(",") if item.strip())


def parse_file_text(text: str, name: str = "secret file") -> tuple[tuple[bytes, ...], dict]:
    """``(shared, per_circle)`` from the text of a secret file (format in the module doc)."""
    shared: list[bytes] = []
    per_circle: dict[str, list[bytes]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) == 1:
            shared.append(fields[0].encode("utf-8"))
        elif len(fields) == 2:
            try:
                circle = normalize_pubkey(fields[0])
            except InvalidKey:
                raise SecretsError(f"{name}, line {number}: the first of two fields must be a circle key") from None
            per_circle.setdefault(circle, []).append(fields[1].encode("utf-8"))
        else:
            raise SecretsError(f"{name}, line {number}: expected 'SECRET' or 'CIRCLE_PK SECRET'")
    return tuple(shared), per_circle


def load(env_value: str | None, path: str | None) -> WebhookSecrets:
    """A provider's secrets: the environment value's and the file's, together."""
    shared = list(parse_list(env_value))
    per_circle: dict = {}
    if path is not None:
        try:
            text = read_secret_file(path)
        except SecretFileError as e:
            raise SecretsError(str(e)) from None
        file_shared, per_circle = parse_file_text(text, path)
        shared.extend(file_shared)
    return WebhookSecrets(tuple(shared), per_circle)


def providers_line(stripe: WebhookSecrets, idenfy: WebhookSecrets) -> tuple[str, dict]:
    """The start-up line saying which providers are on, and its fields:
    ``("webhooks: Stripe on (2 secrets), iDenfy off", {"stripe_secrets": 2, ...})``."""
    words, fields = [], {}
    for name, title, secrets in (("stripe", "Stripe", stripe), ("idenfy", "iDenfy", idenfy)):
        shared, circles = len(secrets.shared), len(secrets.per_circle)
        fields[f"{name}_secrets"], fields[f"{name}_circles"] = shared, circles
        if not secrets:
            words.append(f"{title} off")
            continue
        parts = [f"{shared} secret{'' if shared == 1 else 's'}"] if shared else []
        if circles:
            parts.append(f"own secrets for {circles} circle{'' if circles == 1 else 's'}")
        words.append(f"{title} on ({', '.join(parts)})")
    return "webhooks: " + ", ".join(words), fields
