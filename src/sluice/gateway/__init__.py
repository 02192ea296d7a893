"""The gateway: what stands between a client's request and the engine (guards, and later auth,
rate limits, budgets and admission)."""
