"""Helpers for plugin authors (and the core): durations and sizes, signed-content templates,
secret and key decoding, constant-time comparison.

Plugins import these names from `hookgate.plugin_kit` (plus `hookgate.types` and
`hookgate.hookspecs`), nothing else of hookgate: this surface stays stable for them.
"""

from hookgate.plugin_kit.compare import constant_time_equal, matches_any
from hookgate.plugin_kit.keys import decode_prefixed_base64
from hookgate.plugin_kit.secrets import check_secrets, secret_keys
from hookgate.plugin_kit.templates import HEADER_NAME, Part, parse_template, wire_bytes
from hookgate.plugin_kit.units import Duration, Size, seconds, size_bytes

__all__ = [
    "HEADER_NAME",
    "Duration",
    "Part",
    "Size",
    "check_secrets",
    "constant_time_equal",
    "decode_prefixed_base64",
    "matches_any",
    "parse_template",
    "seconds",
    "secret_keys",
    "size_bytes",
    "wire_bytes",
]
