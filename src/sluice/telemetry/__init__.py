"""Telemetry: Prometheus metrics, the per-request record and its JSON log line."""
