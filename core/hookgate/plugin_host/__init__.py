"""Loading plugins and calling hooks through pluggy; the core's own components."""
