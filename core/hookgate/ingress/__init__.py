"""The HTTP edge: the listener, admission control, ASGI helpers, and the webhook handler."""
