"""Looking into config types (`X | None`, `Annotated[...]`, Structs) to walk values and word problems."""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

import msgspec


def annotates(type_: Any, known: Any) -> bool:
    """Whether `type_` is `known`, or `known` with more metadata (a description added to a
    Duration, say: Annotated flattens `Annotated[Duration, Meta(...)]` into one new type)."""
    if type_ == known:
        return True
    if get_origin(type_) is not Annotated or get_origin(known) is not Annotated:
        return False
    base, *metadata = get_args(type_)
    known_base, *known_metadata = get_args(known)
    return bool(base == known_base and all(m in metadata for m in known_metadata))


def unoptional(type_: Any) -> Any:
    """X for `X | None`; anything else unchanged."""
    if get_origin(type_) in (Union, types.UnionType):
        members = [t for t in get_args(type_) if t is not type(None)]
        if len(members) == 1:
            return members[0]
    return type_


def bare_type(type_: Any) -> Any:
    """The type without `| None` and `Annotated[...]` wrappers, to see its structure."""
    while True:
        inner = unoptional(type_)
        if get_origin(inner) is Annotated:
            inner = get_args(inner)[0]
        if inner is type_:
            return inner
        type_ = inner


def struct_of(type_: Any) -> type[msgspec.Struct] | None:
    bare = bare_type(type_)
    return bare if isinstance(bare, type) and issubclass(bare, msgspec.Struct) else None


def accepts_none(type_: Any) -> bool:
    if get_origin(type_) is Annotated:
        return accepts_none(get_args(type_)[0])
    if get_origin(type_) in (Union, types.UnionType):
        return any(accepts_none(t) for t in get_args(type_))
    return type_ is Any or type_ is None or type_ is type(None)


def struct_fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}
