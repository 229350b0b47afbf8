"""The management API under /api/v1: one module per resource, and the endpoint catalog it edits."""
