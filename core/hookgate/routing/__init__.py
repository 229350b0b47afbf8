"""The router: events in, one delivery per matching endpoint out."""
