"""Delivery to endpoints: the dispatcher and its endpoint workers, retries, flow control, and the
SSRF guard."""
