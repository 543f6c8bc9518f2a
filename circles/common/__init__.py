"""Shared by every process (server, worker, client, try-out): JSON-RPC framing, keys,
signatures, logs, process children, TLS for clients. Imports nothing else of circles."""
