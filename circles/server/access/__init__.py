"""Who may come in and how often: connection and rate limits, origins, nonces."""
