"""Flags generated from a settings dataclass, and the dataclass read back from the parsed
arguments: one way for every subcommand (erase's ``EraseConfig``, generate's
``GenerateSettings``, audit's ``AuditSettings``, the attack's ``AttackSettings``).

A field's metadata may give ``help``, ``flag`` (the option's name, default ``--field-name``;
None: no flag) and ``choices``. A boolean field that defaults to true gets a ``--no-...`` flag
(its ``flag``) that stores false.
"""

from __future__ import annotations

import dataclasses
import types
import typing


def field_kind(hint):
    """(the field's type without ``None``, whether it is a list)."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    return kind, typing.get_origin(kind) is list


def flag_of(f: dataclasses.Field) -> str | None:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    return "--" + f.name.replace("_", "-")


def help_with_default(f: dataclasses.Field, shown=dataclasses.MISSING) -> str:
    """The field's help, plus its default where it has a telling one."""
    default = f.default if shown is dataclasses.MISSING else shown
    text = f.metadata.get("help", "")
    if default is dataclasses.MISSING or default is None or default is False:  # 0 == False
        return text
    if isinstance(default, list):
        return text
    return f"{text} (default: {default})"


def add_field_flag(p, f: dataclasses.Field, hint, *, dest: str, default, help_default) -> None:
    """One option for one field: ``dest`` names it in the parsed arguments."""
    kind, is_list = field_kind(hint)
    kwargs: dict = {"dest": dest, "default": default, "help": help_with_default(f, help_default)}
    if kind is bool:
        kwargs["action"] = "store_false" if f.default is True else "store_true"
        if f.default is True:
            kwargs["help"] = f.metadata.get("help", "")
    elif is_list:
        kwargs["action"] = "append"
    else:
        kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    p.add_argument(flag_of(f), **kwargs)


def add_settings_flags(p, cls, names=None, *, prefix: str = "") -> None:
    """Flags for the fields ``names`` of ``cls`` (default: every field that has a flag), whose
    parsed defaults are the dataclass's own; ``prefix`` keeps their ``dest`` apart from other
    flags' (the attack's ``steps`` is not generate's)."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls, names):
        default = _default(f)
        # a repeated flag starts empty: argparse would append to a default list
        parsed = None if isinstance(default, list) else default
        add_field_flag(
            p, f, hints[f.name], dest=prefix + f.name, default=parsed, help_default=default
        )


def settings_from_args(args, cls, names=None, *, prefix: str = ""):
    """``cls`` from the parsed arguments; fields without a flag (or a repeated flag never
    given) keep the dataclass's defaults."""
    given = {f.name: getattr(args, prefix + f.name, None) for f in _fields(cls, names)}
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    return cls(
        **{
            k: v
            for k, v in given.items()
            if hasattr(args, prefix + k) and not (v is None and isinstance(defaults[k], list))
        }
    )


def _fields(cls, names):
    fields = [f for f in dataclasses.fields(cls) if flag_of(f) is not None]
    if names is None:
        return fields
    by_name = {f.name: f for f in fields}
    return [by_name[n] for n in names]


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default
