"""Which NATS subjects a subject endpoint may publish to."""

from __future__ import annotations

from hookgate.config.problems import show


def subject_refusal(subject: str, prefix: str | None, allow: list[str]) -> str | None:
    """Why a subject endpoint may not publish to `subject`, or None if it may.

    Refused: subjects under the gateway's own prefix (they would loop, or write into its streams),
    `$` subjects that name its own streams or buckets (`$KV.HOOKGATE_ENDPOINTS.x`), and, unless a
    pattern in `allow` (egress.allow_subjects) matches, every other `$` subject (the JetStream API,
    KV and object stores, system events) and `_INBOX` subjects (replies to other clients).
    """
    if prefix is not None:
        if subject == prefix or subject.startswith(prefix + "."):
            return f"subjects under {show(prefix)} are hookgate's own: it would loop"
        own = prefix.upper().replace("-", "_").replace(".", "_") + "_"  # its streams and buckets
        if subject.startswith("$") and any(token.startswith(own) for token in subject.split(".")):
            return f"this subject reaches hookgate's own streams or buckets ({own}*)"
    if any(subject_matches(pattern, subject) for pattern in allow):
        return None
    if subject.startswith("$"):
        return (
            "subjects starting with $ belong to NATS itself (the JetStream API, KV buckets, system "
            "events); list a pattern for it in egress.allow_subjects if it is meant"
        )
    if subject.startswith("_INBOX"):
        return (
            "_INBOX subjects carry replies to other clients' requests; list a pattern for it in "
            "egress.allow_subjects if it is meant"
        )
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (`*`: one token, `>`: one or more trailing tokens) matches."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def is_subject_pattern(pattern: str) -> bool:
    tokens = pattern.split(".")
    return (
        all(
            token
            and not any(c.isspace() for c in token)
            and (token in ("*", ">") or not {"*", ">"} & set(token))
            for token in tokens
        )
        and ">" not in tokens[:-1]
    )
