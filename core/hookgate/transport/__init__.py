"""Outbound HTTP/1.1: URL and proxy parsing, header fields, the connection pool, and the httpx adapter."""
