"""`transform: {type: shape, ...}` on a route: declarative reshaping of JSON events.

    routes:
      - name: invoices-to-ledger
        from: [internal]
        types: ["invoice.*"]
        transform:
          type: shape
          event_type: ledger.entry                # the event's new type
          rename: {"customer.id": customer_id}    # move a value to another path
          remove: [internal_notes, "customer.email"]
          set: {"meta.origin": hookgate}          # set a value, creating intermediate objects
          wrap: payload                           # the body becomes {"payload": <body>}
          pick: [payload.customer_id, payload.amount]   # keep only these paths
          template:                               # build a new body (whole-value placeholders)
            kind: "{{ type }}"
            amount: "{{ payload.amount }}"
            note: "invoice {{ id }} from {{ source }}"
        to: [ledger]

Every option is optional, but a `shape` needs at least one. They apply in the order above, each to
the result of the one before: `event_type`, `rename`, `remove`, `set`, `wrap`, `pick`, `template`.
The transform applies to this route's endpoints only; other routes and the stored event keep the
original.

Paths
    Dot paths into the JSON body: `data.object.id`. A numeric segment indexes a list
    (`items.0.sku`); any other segment meets only objects. Unlike route filters, a path never fans
    out across the elements of a list and never reaches into a string holding JSON. A key that
    contains a dot cannot be addressed. An empty path or segment (`a..b`) is a config error.

Options
    - `event_type`: the new type. For an internal event this is the `type` of the Standard
      Webhooks body `{"type", "timestamp", "data"}`; for an ingress event, the type recorded for
      its deliveries (the forwarded bytes carry no type of ours).
    - `rename: {from: to}`: moves each value, in the order listed; a missing `from` is skipped, an
      existing `to` is replaced, and intermediate objects of `to` are created.
    - `remove: [path, ...]`: deletes each path (a list element by index: later ones move up);
      missing paths are skipped.
    - `set: {path: value}`: sets any JSON value, replacing what is there; missing (or null)
      intermediates become objects, so `set: {"a.0": x}` on a body without `a` makes `{"a": {"0":
      x}}`. In an existing list a numeric segment replaces an element within the list's length.
    - `wrap: path`: the body becomes `{"<key>": <body>}`; a dot path nests (`wrap: a.b` gives
      `{"a": {"b": <body>}}`).
    - `pick: [path, ...]` (at least one): keeps only these paths, in their nesting, object keys in
      the order listed. Picked list elements keep their relative order and close up (`pick:
      [items.2]` gives `{"items": [<third item>]}`). Paths not found are left out; if none is found
      the body is `{}` (`[]` for a list body).
    - `template`: any JSON value that becomes the new body. A string that is exactly one
      placeholder, `"{{ path }}"`, is replaced by the value at that path with its JSON type
      (number, object, list, ...); null if the path is missing. Placeholders inside longer strings
      are interpolated as text: strings as they are, null and missing paths as nothing, other
      values as compact JSON. Mapping keys are literal. `{{` and `}}` outside a placeholder are a
      config error.

Reserved names in placeholders
    `{{ type }}` (the event type, after `event_type`), `{{ id }}` (the event id) and
    `{{ source }}` (the source name, `internal` for internal events) are the event's own fields;
    `{{ body }}` is the whole body and `{{ body.<path> }}` a path in it. Any other placeholder is a
    body path, so a body field named `type`, `id`, `source` or `body` is written
    `{{ body.type }}`. `{{ type.x }}` (and the like for `id` and `source`) is a config error.

Conflicts
    A value that cannot be placed because a segment meets a string, number, boolean or list (with
    a key that is not an index within it) is skipped: `set` leaves that path alone, and `rename`
    leaves the value where it was. Each such skip is logged at debug level, once per route and
    path.

Bodies that are not JSON (form posts, binary)
    Are left as they are: the body options are skipped for them, logged at debug level once per
    route; `event_type` still applies. Whether a body is JSON is decided by decoding it, whatever
    its content type says. A route whose sources post forms should not need a transform.

Output
    A changed body is encoded with msgspec (compact JSON). An ingress event whose body changed gets
    the content type `application/json`, in its `content-type` header too. The provider's other
    headers are forwarded as they are: a provider signature no longer matches a reshaped body (sign
    for the endpoint with `signing:` instead). An event that none of the options changes is passed
    on as the same object, byte for byte.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from hookgate.hookspecs import hookimpl
from hookgate.types import ComponentRegistry, Event

log = logging.getLogger("hookgate.plugins.transform")

NAME = "shape"
#: placeholder names that are the event's own fields, not body paths
EVENT_FIELDS = ("type", "id", "source")
#: the placeholder name of the body itself (`{{ body }}`, `{{ body.<path> }}`)
BODY = "body"
JSON_CONTENT_TYPE = "application/json"

_MISSING: Any = object()
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_encode = msgspec.json.Encoder().encode

Path = tuple[str, ...]
Fields = dict[str, str]
Render = Callable[[Fields, Any], Any]
PickTree = dict[str, "PickTree | None"]  # None: the whole value at this key


# --- config --------------------------------------------------------------------------------------


class ShapeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    event_type: Annotated[str | None, msgspec.Meta(description="the event's new type")] = None
    rename: Annotated[dict[str, str], msgspec.Meta(description="move values: {from.path: to.path}")] = {}
    remove: Annotated[list[str], msgspec.Meta(description="paths to delete")] = []
    set_: Annotated[
        dict[str, Any], msgspec.Meta(description="set JSON values at paths, creating intermediate objects")
    ] = msgspec.field(default_factory=dict, name="set")
    wrap: Annotated[str | None, msgspec.Meta(description='the body becomes {"<wrap>": <body>}')] = None
    pick: Annotated[
        Annotated[list[str], msgspec.Meta(min_length=1)] | None,
        msgspec.Meta(description="keep only these paths"),
    ] = None
    template: Annotated[
        Any, msgspec.Meta(description='the new body; "{{ path }}" strings take the value at that path')
    ] = None

    def __post_init__(self) -> None:
        _compile(self)


def _at(where: str, message: str) -> ValueError:
    """A ValueError the config loader reports at `<transform path><where>` (msgspec's own suffix)."""
    return ValueError(f"{message} - at `${where}`")


def _child(where: str, key: str) -> str:
    # The config loader's notation: plain keys as `.key`, any other (dots, spaces) as `["..."]`.
    return f"{where}.{key}" if _PLAIN_KEY.fullmatch(key) else f"{where}[{json.dumps(key)}]"


def _path(text: str, where: str, option: str, what: str = "the path") -> Path:
    if not text:
        raise _at(where, f'{option}: {what} is empty; expected a dot path like "data.object.id"')
    segments = tuple(text.split("."))
    if not all(segments):
        raise _at(where, f"{option}: {what} {json.dumps(text)} has an empty segment")
    return segments


def _check_json(value: Any, where: str, option: str) -> None:
    """Refuse what YAML can hold but JSON cannot (dates, binary, NaN)."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _at(where, f"{option}: {value} is not a JSON number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", option)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _at(where, f"{option}: mapping keys must be strings, got {key!r}")
            _check_json(item, _child(where, key), option)
        return
    kind = {"date": "a date", "datetime": "a date and time", "bytes": "binary data"}.get(
        type(value).__name__, f"a {type(value).__name__}"
    )
    raise _at(
        where,
        f"{option}: expected a JSON value (string, number, true/false, null, list or mapping), "
        f"got {kind}; quote it to keep it as a string",
    )


@dataclass(frozen=True)
class _Compiled:
    event_type: str | None
    rename: list[tuple[Path, Path]]
    remove: list[Path]
    set_: list[tuple[Path, bytes]]  # values kept encoded: each use decodes a fresh copy
    wrap: Path | None
    pick: PickTree | None
    template: Render | None

    @property
    def reshapes(self) -> bool:
        return bool(self.rename or self.remove or self.set_ or self.wrap or self.pick or self.template)


def _compile(config: ShapeConfig) -> _Compiled:
    """Check every option (ValueError naming the first bad one) and prepare it for use."""
    if config.event_type is not None and not config.event_type.strip():
        raise _at(".event_type", "event_type: expected a type name, got an empty string")
    rename = [
        (
            _path(src, _child(".rename", src), "rename"),
            _path(dst, _child(".rename", src), "rename", "the target path"),
        )
        for src, dst in config.rename.items()
    ]
    remove = [_path(p, f".remove[{i}]", "remove") for i, p in enumerate(config.remove)]
    set_: list[tuple[Path, bytes]] = []
    for key, value in config.set_.items():
        where = _child(".set", key)
        path = _path(key, where, "set")
        _check_json(value, where, "set")
        set_.append((path, _encode(value)))
    wrap = _path(config.wrap, ".wrap", "wrap") if config.wrap is not None else None
    pick = None
    if config.pick is not None:
        pick = _pick_tree([_path(p, f".pick[{i}]", "pick") for i, p in enumerate(config.pick)])
    template = None
    if config.template is not None:
        _check_json(config.template, ".template", "template")
        template = _compile_template(config.template, ".template")
    compiled = _Compiled(config.event_type, rename, remove, set_, wrap, pick, template)
    if compiled.event_type is None and not compiled.reshapes:
        raise ValueError(
            f"a {NAME} transform needs at least one of event_type, rename, remove, set, wrap, pick, template"
        )
    return compiled


def _pick_tree(paths: Sequence[Path]) -> PickTree:
    tree: PickTree = {}
    for path in paths:
        node = tree
        for segment in path[:-1]:
            below = node.setdefault(segment, {})
            if below is None:
                break  # an ancestor is picked whole
            node = below
        else:
            node[path[-1]] = None
    return tree


# --- templates -----------------------------------------------------------------------------------


def _compile_template(value: Any, where: str) -> Render:
    if isinstance(value, str):
        return _compile_string(value, where)
    if isinstance(value, dict):
        members = [(key, _compile_template(item, _child(where, key))) for key, item in value.items()]
        return lambda fields, body: {key: render(fields, body) for key, render in members}
    if isinstance(value, list):
        items = [_compile_template(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return lambda fields, body: [render(fields, body) for render in items]
    return lambda fields, body: value  # a number, true/false or null


def _compile_string(text: str, where: str) -> Render:
    found = list(_PLACEHOLDER.finditer(text))
    literals = _PLACEHOLDER.split(text)[::2]
    for literal in literals:
        for brace in ("{{", "}}"):
            if brace in literal:
                raise _at(
                    where,
                    f"template: a stray {json.dumps(brace)} in {json.dumps(text)}; "
                    'placeholders look like "{{ data.id }}"',
                )
    if not found:
        return lambda fields, body: text
    resolvers = [_resolver(m.group(1), where) for m in found]
    if len(found) == 1 and found[0].span() == (0, len(text)):
        resolve = resolvers[0]
        return lambda fields, body: _or_null(resolve(fields, body))

    def interpolate(fields: Fields, body: Any) -> str:
        out = [literals[0]]
        for resolve, literal in zip(resolvers, literals[1:], strict=True):
            out.append(_as_text(resolve(fields, body)))
            out.append(literal)
        return "".join(out)

    return interpolate


def _resolver(name: str, where: str) -> Render:
    if not name:
        raise _at(where, 'template: an empty placeholder "{{ }}"; write a path like "{{ data.id }}"')
    path = _path(name, where, "template")
    head = path[0]
    if head in EVENT_FIELDS:
        if len(path) > 1:
            raise _at(
                where,
                f'template: "{{{{ {head} }}}}" is the event\'s {head} and has no fields; '
                f'for the body\'s field write "{{{{ body.{name} }}}}"',
            )
        return lambda fields, body: fields[head]
    if head == BODY:
        path = path[1:]
    return lambda fields, body: _get(body, path)


def _or_null(value: Any) -> Any:
    return None if value is _MISSING else value


def _as_text(value: Any) -> str:
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, str):
        return value
    return _encode(value).decode()


# --- paths in a decoded body ---------------------------------------------------------------------


def _index(segment: str) -> int | None:
    return int(segment) if segment.isascii() and segment.isdigit() else None


def _get(value: Any, path: Path) -> Any:
    for segment in path:
        if isinstance(value, dict):
            value = value.get(segment, _MISSING)
            if value is _MISSING:
                return _MISSING
        elif isinstance(value, list):
            i = _index(segment)
            if i is None or i >= len(value):
                return _MISSING
            value = value[i]
        else:
            return _MISSING
    return value


def _container(root: Any, path: Path, create: bool) -> Any:
    """The object or list that holds the last segment of `path`; None if there is none.

    With `create`, missing and null intermediates under objects become new objects.
    """
    node = root
    for segment in path[:-1]:
        if isinstance(node, dict):
            below = node.get(segment)
            if below is None and create:
                below = node[segment] = {}
        elif isinstance(node, list):
            i = _index(segment)
            if i is None or i >= len(node):
                return None
            below = node[i]
            if below is None and create:
                below = node[i] = {}
        else:
            return None
        if not isinstance(below, dict | list):
            return None
        node = below
    return node if isinstance(node, dict | list) else None


def _put(root: Any, path: Path, value: Any) -> bool:
    """Set the value at `path`; False if a segment meets something that cannot hold it."""
    node = _container(root, path, create=True)
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
        return True
    if isinstance(node, list):
        i = _index(last)
        if i is not None and i < len(node):
            node[i] = value
            return True
    return False


def _take(root: Any, path: Path) -> tuple[Any, Callable[[], None]]:
    """Remove the value at `path`: (the value, a function that puts it back), or (_MISSING, ...)."""
    node = _container(root, path, create=False)
    last = path[-1]
    if isinstance(node, dict) and last in node:
        value = node.pop(last)
        return value, lambda: node.__setitem__(last, value)
    if isinstance(node, list):
        i = _index(last)
        if i is not None and i < len(node):
            value = node.pop(i)
            return value, lambda: node.insert(i, value)
    return _MISSING, lambda: None


def _extract(value: Any, tree: PickTree) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for segment, below in tree.items():
            if segment in value:
                got = value[segment] if below is None else _extract(value[segment], below)
                if got is not _MISSING:
                    out[segment] = got
        return out or _MISSING
    if isinstance(value, list):
        wanted: dict[int, PickTree | None] = {}
        for segment, below in tree.items():
            i = _index(segment)
            if i is not None and i < len(value):
                wanted.setdefault(i, below)
        items = []
        for i in sorted(wanted):
            below = wanted[i]
            got = value[i] if below is None else _extract(value[i], below)
            if got is not _MISSING:
                items.append(got)
        return items or _MISSING
    return _MISSING


def _show(path: Path) -> str:
    return json.dumps(".".join(path))


# --- the transform -------------------------------------------------------------------------------


class ShapeTransform:
    """One route's `shape` transform. Never raises on an event, whatever its body holds."""

    def __init__(self, config: ShapeConfig):
        self._plan = _compile(config)
        self._logged: set[str] = set()  # what was logged for this route already

    def transform(self, event: Event) -> Event | None:
        plan = self._plan
        new_type = plan.event_type if plan.event_type is not None else event.type
        body: bytes | None = None
        if plan.reshapes:
            root = _decode(event.body)
            if root is _MISSING:
                self._debug(
                    "non-json",
                    "%s transform: event %s from %s has a body that is not JSON (content type %s); "
                    "its body is left as it is (logged once per route)",
                    NAME,
                    event.id,
                    event.source,
                    event.content_type,
                )
            else:
                fields = {"type": new_type, "id": event.id, "source": event.source}
                shaped, changed = self._reshape(root, fields, event)
                if changed:
                    body = _encode(shaped)
        if body is None:
            if new_type == event.type:
                return event
            return msgspec.structs.replace(event, type=new_type)
        if event.internal:
            return msgspec.structs.replace(event, type=new_type, body=body)
        headers = [(k, v) for k, v in event.headers if k.lower() != "content-type"]
        headers.append(("content-type", JSON_CONTENT_TYPE))
        return msgspec.structs.replace(
            event, type=new_type, body=body, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    def _reshape(self, root: Any, fields: Fields, event: Event) -> tuple[Any, bool]:
        plan = self._plan
        changed = False
        for src, dst in plan.rename:
            value, put_back = _take(root, src)
            if value is _MISSING:
                continue
            if _put(root, dst, value):
                changed = True
            else:
                put_back()
                self._skipped("rename", dst, event)
        for path in plan.remove:
            value, _ = _take(root, path)
            changed |= value is not _MISSING
        for path, encoded in plan.set_:
            if _put(root, path, msgspec.json.decode(encoded)):
                changed = True
            else:
                self._skipped("set", path, event)
        if plan.wrap is not None:
            for segment in reversed(plan.wrap):
                root = {segment: root}
            changed = True
        if plan.pick is not None:
            picked = _extract(root, plan.pick)
            root = ([] if isinstance(root, list) else {}) if picked is _MISSING else picked
            changed = True
        if plan.template is not None:
            root = plan.template(fields, root)
            changed = True
        return root, changed

    def _skipped(self, option: str, path: Path, event: Event) -> None:
        self._debug(
            f"{option}:{'.'.join(path)}",
            "%s transform: %s %s skipped for event %s: a segment meets a value that is not an object "
            "(logged once per route and path)",
            NAME,
            option,
            _show(path),
            event.id,
        )

    def _debug(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.debug(message, *args)


def _decode(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    # ValueError: invalid UTF-8 inside a JSON string; RecursionError: nesting too deep for msgspec.
    except (msgspec.DecodeError, ValueError, RecursionError):
        return _MISSING


@hookimpl
def hookgate_register_components(registry: ComponentRegistry) -> None:
    registry.add_transform(NAME, ShapeConfig, ShapeTransform)
