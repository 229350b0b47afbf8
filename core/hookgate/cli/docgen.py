"""The configuration reference in Markdown, generated from the config's JSON Schema.

`hookgate schema --builtin-only --markdown -o docs/reference/configuration.md` writes the page that
the docs site publishes, and a test fails when the committed page differs from what this module
generates, so the reference cannot drift from the code.

The schema is walked from its root (`Config`): a section per top-level key (`server`,
`sources.<name>`, `routes[]`, ...) and per object nested in one, then a section per component kind
(verifiers, access rules, ...) with one sub-section per registered component. Each object gets a
table of its keys with their type, default and description, all read from the schema. The output
depends on the schema alone, in the schema's own order.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from typing import Any, get_args

from hookgate.plugin_kit.units import Duration, Size

__all__ = ["markdown"]

# Strings with these patterns are the config's units: named in the type column, described once.
_UNITS: dict[str, tuple[str, str]] = {
    meta.pattern: (name, meta.description)
    for name, meta in (("duration", get_args(Duration)[1]), ("size", get_args(Size)[1]))
}

# Keys that pick a component, by path: what the components are called, and what one is called.
_KINDS = {
    "sources.<name>.verify": ("Verifiers", "Verifier"),
    "sources.<name>.auth[]": ("Access rules", "Access rule"),
    "sources.<name>.handshake": ("Handshakes", "Handshake"),
    "endpoints.<name>.signing": ("Signers", "Signer"),
    "endpoints.<name>.auth": ("Endpoint auth", "Endpoint auth"),
    "routes[].transform": ("Transforms", "Transform"),
}

_HEADER = """\
# Configuration reference

<!-- Generated from the config's JSON Schema: do not edit. Change the config's Structs (or a
     plugin's), then run
     hookgate schema --builtin-only --markdown -o docs/reference/configuration.md -->

Every key of the config file, generated from its JSON Schema (`hookgate schema`), with the
components of the plugins shipped with hookgate. The [configuration guide](../configuration.md)
explains the file itself: environment variables, errors, and an annotated example.

- **duration**: {duration}.
- **size**: {size}.
- A default of `null` means that the setting is off, or unset, unless you give it.
- Unknown keys are errors, in every object below.
"""


def markdown(schema: dict[str, Any]) -> str:
    """The reference page for a config JSON Schema, as `hookgate.config.json_schema` builds it."""
    root = _ref_name(schema)
    if root is None:
        raise ValueError("expected a schema whose root is a $ref to its Config definition")
    defs: dict[str, Any] = schema["$defs"]
    sections = _Planner(defs).plan(root)
    anchors: dict[str, str] = {}
    for section in sections:
        anchor = _slug(section.title)
        if anchor in anchors.values():
            raise ValueError(f"two sections would have the anchor #{anchor}")
        if section.name is not None:
            anchors.setdefault(section.name, anchor)
        else:
            anchors[f"kind:{section.path}"] = anchor
    units = {name: description for name, description in _UNITS.values()}
    page = _HEADER.format(duration=_text(units["duration"]), size=_text(units["size"]))
    return page + "".join("\n" + _render(section, defs, anchors) for section in sections)


@dataclass
class _Section:
    level: int
    title: str
    name: str | None  # the definition it documents; None for a component kind's heading
    path: str  # the key path of the object (or of the key that picks a component kind)
    note: str = ""  # Markdown after the description


class _Planner:
    """Which sections the page has, in order."""

    def __init__(self, defs: dict[str, Any]):
        self.defs = defs
        self.sections: list[_Section] = []
        self.seen: set[str] = set()
        self.kinds: dict[str, list[str]] = {}  # kind path -> its components' definitions

    def plan(self, root: str) -> list[_Section]:
        self._object(2, "Top level", root, "")
        for kind_path, variants in self.kinds.items():
            singular = _kind_titles(kind_path)[1]
            key = _const_key(self.defs[variants[0]]) or "type"
            note = (
                f"Each one is picked with `{key}:`, and its other keys are its options. "
                "`hookgate plugins` lists the ones installed."
            )
            self.sections.append(_Section(2, _kind_title(kind_path), None, kind_path, note))
            for name in variants:
                definition = self.defs[name]
                const = definition["properties"][_const_key(definition) or key]["const"]
                title = f"{singular} `{const}`"
                self._object(3, title, name, kind_path, note=f"`{key}: {const}`", suffix=f" ({const})")
        return self.sections

    def _object(self, level: int, title: str, name: str, path: str, note: str = "", suffix: str = "") -> None:
        self.seen.add(name)
        self.sections.append(_Section(level, title, name, path, note))
        for key, prop in self.defs[name].get("properties", {}).items():
            child = _join(path, key)
            if (kind := _kind_of(self.defs, child, prop)) is not None:
                self.kinds.setdefault(kind, [v for v in _variants(prop) if v not in self.seen])
                continue
            for at, sub in _structs(child, prop):
                if sub in self.seen:
                    continue  # described once, where it first appears
                names = _names(prop) if at.endswith(".<name>") else ""
                self._object(min(level + 1, 4) if path else 2, f"`{at}`{suffix}", sub, at, names, suffix)


def _render(section: _Section, defs: dict[str, Any], anchors: dict[str, str]) -> str:
    lines = [f"{'#' * section.level} {section.title}", ""]
    definition = defs[section.name] if section.name is not None else {}
    if definition.get("description"):
        lines += [_text(definition["description"]), ""]
    if section.note:
        lines += [section.note, ""]
    required = set(definition.get("required", []))
    rows = [(k, p) for k, p in definition.get("properties", {}).items() if "const" not in p]
    if rows:
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, prop in rows:
            kind = _kind_of(defs, _join(section.path, key), prop)
            if kind is not None:
                many = "list of " if kind.endswith("[]") else ""
                type_ = f"{many}[{_kind_titles(kind)[0].lower()}](#{anchors['kind:' + kind]})"
            else:
                type_ = _type(prop, anchors)
            default = "required" if key in required else _default(prop)
            description = _description(prop) or _summary(defs, prop)
            lines.append(f"| `{key}` | {type_} | {default} | {_cell(description)} |")
        lines.append("")
    return "\n".join(lines)


def _type(node: dict[str, Any], anchors: dict[str, str]) -> str:
    name = _ref_name(node)
    if name is not None:
        return f"[object](#{anchors[name]})"
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        return " or ".join(_type(v, anchors) for v in variants) or "null"
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        items = node.get("items")
        text = f"list of {_type(items, anchors)}" if isinstance(items, dict) else "list"
        return _bounded(text, node, "minItems", "maxItems", "items")
    if kind == "object":
        values = node.get("additionalProperties")
        return f"map of {_type(values, anchors)}" if isinstance(values, dict) else "object"
    if kind == "string":
        pattern = node.get("pattern")
        if pattern in _UNITS:
            return _UNITS[pattern][0]
        text = "string" + (f" ({node['format']})" if node.get("format") else "")
        if pattern:
            text += f" matching `{pattern}`"
        return _bounded(text, node, "minLength", "maxLength", "characters")
    if kind in ("integer", "number"):
        return str(kind) + _range(node)
    if kind == "boolean":
        return "boolean"
    return "any"


# --- reading the schema ----------------------------------------------------------------------


def _ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _structs(path: str, prop: dict[str, Any]) -> list[tuple[str, str]]:
    """The objects a key may hold, each with the key path it is documented at."""
    out: list[tuple[str, str]] = []

    def visit(node: dict[str, Any], at: str) -> None:
        if (name := _ref_name(node)) is not None:
            out.append((at, name))
        for variant in node.get("anyOf", []):
            visit(variant, at)
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            visit(node["items"], at + "[]")
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], at + ".<name>")

    visit(prop, path)
    return out


def _variants(prop: dict[str, Any]) -> list[str]:
    node = prop.get("items", {}) if prop.get("type") == "array" else prop
    return [name for v in node.get("anyOf", []) if (name := _ref_name(v)) is not None]


def _const_key(definition: dict[str, Any]) -> str | None:
    """The key whose constant value names a component (`type: github`), if this is one."""
    return next((k for k, p in definition.get("properties", {}).items() if "const" in p), None)


def _kind_of(defs: dict[str, Any], path: str, prop: dict[str, Any]) -> str | None:
    """The component kind's path when this key picks a component (`verify:`), else None."""
    variants = _variants(prop)
    if not variants or any(_const_key(defs[v]) is None for v in variants):
        return None
    return path + "[]" if prop.get("type") == "array" else path


def _kind_titles(kind_path: str) -> tuple[str, str]:
    return _KINDS.get(kind_path, (kind_path, kind_path))


def _kind_title(kind_path: str) -> str:
    plural, _ = _kind_titles(kind_path)
    return f"{plural}: `{kind_path}`" if plural != kind_path else f"`{kind_path}`"


def _names(prop: dict[str, Any]) -> str:
    """What a map's keys may be (source and endpoint names)."""
    names = prop.get("propertyNames", {})
    rules = []
    if names.get("description"):
        rules.append(_text(names["description"]))
    if "pattern" in names:
        rules.append(f"the pattern `{names['pattern']}`")
    if "const" in names.get("not", {}):
        rules.append(f"not `{names['not']['const']}`")
    return f"Names: {'; '.join(rules)}." if rules else ""


def _description(prop: dict[str, Any]) -> str:
    """The key's description, or else the first of its variants' (`secret: str | list[str]`)."""
    description = prop.get("description")
    unit = _UNITS.get(prop.get("pattern", ""))
    if description and (unit is None or description != unit[1]):  # not just the unit's own words
        return str(description)
    for variant in [*prop.get("anyOf", []), prop.get("items")]:
        if (
            isinstance(variant, dict)
            and variant.get("pattern") not in _UNITS
            and (found := _description(variant))
        ):
            return found
    return ""


def _summary(defs: dict[str, Any], prop: dict[str, Any]) -> str:
    """For a key that holds one kind of object: the first paragraph of that object's description."""
    names = {name for _, name in _structs("", prop)}
    if len(names) != 1:
        return ""
    description = str(defs[names.pop()].get("description", ""))
    return description.strip().split("\n\n")[0]


def _default(prop: dict[str, Any]) -> str:
    return f"`{json.dumps(prop['default'], ensure_ascii=False)}`" if "default" in prop else ""


def _range(node: dict[str, Any]) -> str:
    signs = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
    parts = [f"{sign} {node[key]}" for key, sign in signs if key in node]
    return f" ({', '.join(parts)})" if parts else ""


def _bounded(text: str, node: dict[str, Any], low: str, high: str, unit: str) -> str:
    """A list's or string's type with its length limits: `non-empty list of string`."""
    if node.get(low) == 1 and high not in node:
        return f"non-empty {text}"
    parts = [f"{word} {node[key]}" for key, word in ((low, "at least"), (high, "at most")) if key in node]
    return f"{text} ({' and '.join(parts)} {unit})" if parts else text


# --- Markdown --------------------------------------------------------------------------------


def _slug(title: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading: lower case, punctuation dropped, spaces to `-`."""
    text = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _text(text: str) -> str:
    """Schema text as Markdown: `<`, `>` and `&` escaped outside code spans, so `<name>` stays text.

    Docstrings are dedented first: some msgspec versions keep their indentation, which Markdown
    would read as code blocks.
    """
    parts = inspect.cleandoc(text).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for a table cell: one line, with `|` escaped."""
    return " ".join(_text(text).split()).replace("|", "\\|")
