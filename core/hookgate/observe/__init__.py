"""Metrics, tracing, log setup and the redaction applied to everything shown."""
