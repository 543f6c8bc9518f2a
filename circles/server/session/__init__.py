"""A WebSocket session's methods, its API contracts and what it may leave unsent."""
