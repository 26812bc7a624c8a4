"""Command-line flags generated from the config dataclasses, and configs built back from them.

Each field of a config dataclass says in its metadata how the command line sets it::

    ttl: float = field(default=900.0, metadata=flag("--scheduler-ttl", "seconds a request may wait ..."))

The metadata is plain data, so ``server/engine_config.py`` writes the same keys without
importing this package:

- ``flag``: the flag's name; ``help``: its help line; ``aliases``: other names (FastDeploy's);
- ``const``: the value of the bare flag, which makes the value optional (``--cuda-graphs``);
- ``negation``: ``(name, value)``, a second flag that stores ``value`` (``--no-cuda-graphs``);
- ``group``: the help section of a field of the root config (default: the root's section);
- ``internal``: why the field has no flag. Every leaf field has a ``flag`` or an ``internal``.

A field whose default is itself a config dataclass is a section (``section(title)``), walked in
turn. The annotation gives argparse its converter (``int``, ``float``, ``str``, ``X | None``),
a ``Literal`` its choices, and a ``bool`` a ``--no-`` twin. Defaults come from the root's
default instance, so a ``default_factory`` that sets values shows them in ``--help``. Values
are checked only where the configs check them: in their ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
_KEYS = frozenset({"flag", "help", "aliases", "const", "negation", "group", "internal", "section"})


def flag(name: str, help: str, *, aliases: tuple[str, ...] = (), const: object = None,
         negation: tuple[str, object] | None = None, group: str = "") -> dict[str, Any]:
    """Metadata of a field set by ``name`` (and ``aliases``)."""
    meta: dict[str, Any] = {"flag": name, "help": help}
    if aliases:
        meta["aliases"] = aliases
    if const is not None:
        meta["const"] = const
    if negation is not None:
        meta["negation"] = negation
    if group:
        meta["group"] = group
    return meta


def internal(reason: str) -> dict[str, Any]:
    """Metadata of a field the command line does not set, and why."""
    return {"internal": reason}


def section(title: str) -> dict[str, Any]:
    """Metadata of a field holding a nested config: its flags' help section."""
    return {"section": title}


@dataclass(frozen=True)
class ConfigField:
    """A leaf field of a config tree: a setting, with or without a flag."""

    path: tuple[str, ...]  # attribute names from the root: ("scheduler", "ttl")
    type: Any  # the resolved annotation
    default: Any
    meta: Mapping[str, Any]
    group: str

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def is_internal(self) -> bool:
        return "flag" not in self.meta

    @property
    def names(self) -> tuple[str, ...]:
        """Every flag that sets this field: name, aliases, negation (a bool's ``--no-`` twin)."""
        if self.is_internal:
            return ()
        negation = self.negation
        return (self.meta["flag"], *self.meta.get("aliases", ()), *([negation[0]] if negation else []))

    @property
    def negation(self) -> tuple[str, object] | None:
        if self.type is bool:
            return "--no-" + self.meta["flag"][2:], False
        value = self.meta.get("negation")
        return None if value is None else (value[0], value[1])


def config_fields(cls: type, group: str = "", default: Any = None,
                  path: tuple[str, ...] = ()) -> Iterator[ConfigField]:
    """Every leaf field of the config ``cls`` and of its nested configs, in declaration order."""
    default = cls() if default is None else default
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        unknown = set(f.metadata) - _KEYS
        if unknown:
            raise TypeError(f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(unknown)}")
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_fields(type(value), f.metadata.get("section", f.name), value, (*path, f.name))
            continue
        if ("flag" in f.metadata) == bool(f.metadata.get("internal")):
            raise TypeError(f"{cls.__name__}.{f.name} needs flag(...) or internal(reason) in its metadata")
        yield ConfigField((*path, f.name), hints[f.name], value, f.metadata, f.metadata.get("group", group))


def add_config_flags(parser: argparse.ArgumentParser, cls: type,
                     group: str) -> dict[str, argparse._ArgumentGroup]:
    """Add a flag for every flagged field of ``cls`` (root fields go to section ``group``);
    the sections by title, in order of first use."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for leaf in config_fields(cls, group):
        if leaf.is_internal:
            continue
        if leaf.group not in sections:
            sections[leaf.group] = parser.add_argument_group(leaf.group)
        _add_flag(sections[leaf.group], leaf)
    return sections


def config_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The config ``cls`` with every flagged field taken from ``namespace`` (as parsed by a
    parser ``add_config_flags`` built); internal fields keep their defaults."""
    return _build(cls(), namespace, ())


def _build(default: T, namespace: argparse.Namespace, path: tuple[str, ...]) -> T:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(default):  # type: ignore[arg-type]
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _build(value, namespace, (*path, f.name))
        elif "flag" in f.metadata:
            changes[f.name] = getattr(namespace, ".".join((*path, f.name)))
    return dataclasses.replace(default, **changes)  # type: ignore[type-var]


def _add_flag(group: argparse._ArgumentGroup, leaf: ConfigField) -> None:
    meta, name = leaf.meta, leaf.meta["flag"]
    common: dict[str, Any] = {"dest": leaf.dest, "default": leaf.default}
    negation = leaf.negation
    if leaf.type is bool:
        group.add_argument(name, *meta.get("aliases", ()), action="store_true",
                           help=_help(meta["help"], "on" if leaf.default else "off"), **common)
    else:
        convert, choices = _converter(leaf.type, leaf.dest)
        optional = {"nargs": "?", "const": meta["const"]} if "const" in meta else {}
        group.add_argument(name, *meta.get("aliases", ()), type=convert, choices=choices,
                           metavar=None if choices else name[2:].upper().replace("-", "_"),
                           help=_help(meta["help"], leaf.default), **optional, **common)
    if negation is not None:
        shown = f"turn {name} off" if leaf.type is bool else f"same as {name} {_shown(negation[1])}"
        group.add_argument(negation[0], action="store_const", const=negation[1], help=shown, **common)


def _converter(annotation: Any, dest: str) -> tuple[type, tuple[Any, ...] | None]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return type(args[0]), args
    if origin in (Union, types.UnionType):  # X | None: the flag gives an X; None only as the default
        (inner,) = [a for a in args if a is not type(None)]
        return _converter(inner, dest)
    if annotation in (int, float, str):
        return annotation, None
    raise TypeError(f"{dest}: no command-line converter for {annotation!r}")


def _help(text: str, default: Any) -> str:
    if "default" in text or default in ("", None):
        return text
    return f"{text} (default {_shown(default)})"


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")
