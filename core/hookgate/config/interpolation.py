"""`${VAR}` references in config values, expanded from the environment as docker compose does."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from hookgate.config.problems import show

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\}|:-)")


def interpolate(text: str, env: Mapping[str, str], unresolved: Callable[[str], None]) -> str:
    """`text` with its `${NAME}` and `${NAME:-default}` references replaced from `env`.

    A reference that cannot be resolved is reported to `unresolved`, with why.
    """
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        following = text[j + 1 : j + 2]
        if following == "$":  # `$$` is a literal `$`
            out.append("$")
            i = j + 2
            continue
        if following != "{":  # a lone `$` (as in a regex) is kept as it is
            out.append("$")
            i = j + 1
            continue
        match = _REFERENCE.match(text, j)
        end = _default_end(text, match.end()) if match and match.group(2) == ":-" else None
        if match is None or (match.group(2) == ":-" and end is None):
            unresolved(
                f"invalid variable reference in {show(text)}: write ${{NAME}} or ${{NAME:-default}}, "
                "and $$ for a literal $",
            )
            return text
        name = match.group(1)
        value = env.get(name)
        if end is not None:
            # `:-` as in the shell: the default applies when the variable is unset or empty.
            if not value:
                value = interpolate(text[match.end() : end], env, unresolved)
            i = end + 1
        else:
            if value is None:
                unresolved(f"environment variable {name} is not set")
                value = ""
            i = match.end()
        out.append(value)
    out.append(text[i:])
    return "".join(out)


def _default_end(text: str, start: int) -> int | None:
    """The index of the `}` closing a default, which may itself hold `${...}` references."""
    depth = 0
    k = start
    while k < len(text):
        if text.startswith("$$", k):
            k += 2
            continue
        if text.startswith("${", k):
            depth += 1
            k += 2
            continue
        if text[k] == "}":
            if depth == 0:
                return k
            depth -= 1
        k += 1
    return None
