"""The server process's internals, below its two faces (circles.protocol, circles.webhooks)
and its composition root (circles.service)."""
