"""Reading YAML into plain values, recording the line of every key path and expanding `${VAR}`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from hookgate.config.interpolation import interpolate
from hookgate.config.paths import child, line_of, parent
from hookgate.config.problems import ConfigError, Problem, show

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Aliases can expand a small file exponentially ("billion laughs"); a config never needs this many.
_MAX_NODES = 200_000


class _TooLarge(Exception):
    pass


class Loader:
    """Turns composed YAML nodes into plain values, recording the line of every key path."""

    def __init__(self, file: str, env: dict[str, str]):
        self.file = file
        self.env = env
        self.lines: dict[str, int] = {}
        self.problems: list[Problem] = []
        # Paths whose value lacks an environment variable: problems reported at or below them
        # would only repeat that one (an empty value is not a duration, not a URL, ...).
        self.unresolved: set[str] = set()
        self._constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()
        self._nodes = 0

    def value(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self._nodes += 1
        if self._nodes > _MAX_NODES:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._open:
            self._unresolved(path, "an alias refers to a node that contains it")
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            out: dict[str, Any] = {}
            self._mapping(node, path, out, merged=False)
            return out
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.Node, path: str, out: dict[str, Any], *, merged: bool) -> None:
        merges: list[yaml.Node] = []
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(path, "keys must be plain strings", line)
                continue
            # Keys are taken as written: `on:` or `1:` name a source "on" or "1", not True or 1.
            key = key_node.value
            key_path = child(path, key)
            if key in seen:
                self.problem(key_path, "duplicate key", line)
            seen.add(key)
            if merged:
                if key in out:
                    continue  # keys written in the mapping itself win over `<<:` merged ones
                self.lines.setdefault(key_path, line)
            else:
                self.lines[key_path] = line
            out[key] = self.value(value_node, key_path)
        # `<<: *defaults` or `<<: [*a, *b]`: earlier mappings win, as in the YAML merge key spec.
        for merge in merges:
            for source in merge.value if isinstance(merge, yaml.SequenceNode) else [merge]:
                if isinstance(source, yaml.MappingNode) and id(source) not in self._open:
                    self._open.add(id(source))
                    try:
                        self._mapping(source, path, out, merged=True)
                    finally:
                        self._open.discard(id(source))
                else:
                    self.problem(
                        path, "'<<' takes a mapping or a list of mappings", merge.start_mark.line + 1
                    )

    def _scalar(self, node: yaml.ScalarNode, path: str) -> Any:
        if node.tag == _STR_TAG and "$" in node.value:
            text = interpolate(node.value, self.env, lambda message: self._unresolved(path, message))
            # Values with references stay strings and are converted to the field's type, as
            # docker compose does: `replicas: ${R}` becomes an int and `token: ${T}` stays a string
            # even when T holds digits. A plain value that expands to nothing is YAML's empty
            # value, null, so `url: ${NATS_URL:-}` means "not set".
            resolved = path not in self.unresolved
            return None if text == "" and node.style is None and resolved else text
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:  # an unknown tag such as `!env`
            self.problem(path, f"invalid value: {exc.problem}")
        except ValueError as exc:  # a tag that does not fit, such as `!!int abc`
            self.problem(path, f"invalid value: {exc}")
        return None

    def _unresolved(self, path: str, message: str) -> None:
        """Report a value that cannot be known; problems that would follow from it are not."""
        self.problems.append(Problem(self.file, self.line_of(path), path, message))
        self.unresolved.add(path)

    def lacks_variable(self, path: str) -> bool:
        """Whether a value at or below `path` lacks a variable (a whole-value error may follow from it)."""
        return any(u == path or u.startswith((path + ".", path + "[")) for u in self.unresolved)

    def problem(
        self, path: str, message: str, line: int | None = None, *, missing: str | None = None
    ) -> None:
        """Record a problem, unless it is at or below a value that lacks a variable."""
        at: str | None = path
        while at is not None:
            if at in self.unresolved:
                return
            at = parent(at)
        self.problems.append(
            Problem(self.file, line if line is not None else self.line_of(path), path, message, missing)
        )

    def line_of(self, path: str) -> int | None:
        return line_of(self.lines, path)


def read(path: str | os.PathLike[str]) -> str:
    """The config file's text; a file that cannot be read raises ConfigError."""
    file = str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "$", f"cannot read config: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(file, None, "$", f"cannot read config: not UTF-8 ({exc.reason})")]
        ) from None


def parse(text: str, file: str, env: dict[str, str] | None) -> tuple[Loader, dict[str, Any]]:
    """The YAML as plain values with variables interpolated; syntax errors raise ConfigError."""
    loader = Loader(file, dict(os.environ) if env is None else env)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, file) from None
    try:
        raw: Any = loader.value(node, "$") if node is not None else None
    except _TooLarge:
        message = f"more than {_MAX_NODES:,} values once aliases are expanded"
        raise ConfigError([Problem(file, None, "$", message)]) from None
    if raw is None:  # an empty file, or only comments: every default
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(file, 1, "$", f"expected a mapping of sections, got {show(raw)}")])
    return loader, raw


def _syntax_error(exc: yaml.YAMLError, text: str, file: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    reason = problem or str(exc)
    if context and problem and problem.startswith("but "):  # "expected a single document ..."
        reason = f"{context} {problem}"
    reason += f" (column {mark.column + 1})" if mark is not None else ""
    lines = text.splitlines()
    if line is not None and 0 < line <= len(lines) and "${" in lines[line - 1]:
        # `{` is YAML syntax inside [...] and {...}: the commonest cause there.
        reason += '; inside [...] or {...}, quote values that use variables: "${VAR}"'
    return ConfigError([Problem(file, line, "$", f"invalid YAML: {reason}")])
