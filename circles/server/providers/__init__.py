"""Webhook providers (Stripe, iDenfy): signatures, secrets, events to scripts."""
