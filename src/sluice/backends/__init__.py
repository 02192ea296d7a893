"""Upstream backends: the servers besides the engine, routing, retries and breakers."""
