"""Helpers for plugin authors (and the core): durations and sizes, signed-content templates,
secret and key decoding, constant-time comparison."""
