"""Keys written as a prefix and base64, as providers issue them (`whsec_...`, `whpk_...`)."""

from __future__ import annotations

import base64
import binascii


def decode_prefixed_base64(value: str, prefix: str, name: str) -> bytes:
    """The bytes of `prefix` + base64 (the prefix and the base64 padding may be left out).

    Unpadded base64 is accepted, as the Standard Webhooks and Svix libraries accept it. Raises
    ValueError naming the option (`name`) for anything else; the message never holds the value.
    """
    encoded = value.removeprefix(prefix)
    encoded += "=" * (-len(encoded) % 4)
    try:
        return base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"{name} must be {prefix!r} followed by base64") from None
