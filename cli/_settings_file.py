"""Settings from a YAML (or JSON) file, for every subcommand's ``--config-file``.

Keys are the flags' names, with dashes or underscores (``samples-per-prompt`` or
``samples_per_prompt``); flags given on the command line win over the file.
"""

from __future__ import annotations

# Settings files are small; a larger one is a mistake (or a YAML bomb), refused before parsing.
# A saved erase_config.json is JSON (no aliases to expand) and can list thousands of concepts.
MAX_SETTINGS_BYTES = 1 << 20
MAX_JSON_SETTINGS_BYTES = 64 << 20
# Never from a file: a reused config (a saved erase_config.json holds it) must not replace
# another run's results unless --overwrite is typed.
COMMAND_LINE_ONLY = ("overwrite",)


def read_settings_file(path: str) -> dict:
    """The file's mapping, keys with dashes turned to underscores; one-line errors.

    Only a regular file of at most 1 MiB is read (a FIFO or a device would block or never end);
    YAML aliases are refused (no "billion laughs" expansion) and so are duplicate keys, which
    YAML would silently resolve to the last. ``overwrite`` is dropped: it is a command-line flag.
    """
    text = _read_small_text(path)
    data = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise ValueError(f"--config-file: {path}: must hold a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    return {k: v for k, v in data.items() if k not in COMMAND_LINE_ONLY}


def _read_small_text(path: str) -> str:
    import os
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config-file: {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"--config-file: {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"--config-file: {path}: not a regular file")
    if info.st_size > MAX_JSON_SETTINGS_BYTES:
        raise ValueError(
            f"--config-file: {path}: {info.st_size} bytes; settings files are <= 1 MiB "
            "(JSON: 64 MiB)"
        )
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_JSON_SETTINGS_BYTES + 1).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config-file: {path}: not UTF-8 text (byte {e.start})") from None


def _load_yaml(text: str, path: str):
    """YAML with the 1.2 core schema's scalars, so a value means what the same text means on the
    command line: ``010`` is ten (YAML 1.1: eight), ``0x1f``, ``1:30`` and ``yes`` stay text for
    the flag's own type to read or refuse, and only true/false are booleans. A JSON file (a saved
    ``erase_config.json``) is read as JSON."""
    if text.lstrip().startswith("{"):
        data = _load_json(text, path)
        if data is not None:
            return data
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise ValueError(f"--config-file: {path}: YAML aliases (*name) are not read")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise ValueError(f"--config-file: {path}: {dup!r} is given twice")
            return super().construct_mapping(node, deep)

    _core_schema_scalars(Loader)
    if len(text.encode()) > MAX_SETTINGS_BYTES:
        raise ValueError(f"--config-file: {path}: settings files are <= 1 MiB (JSON: 64 MiB)")
    try:
        return yaml.load(text, Loader=Loader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config-file: {path}: not valid YAML ({e.__class__.__name__})") from e


def _core_schema_scalars(loader) -> None:
    """Replace PyYAML's YAML 1.1 resolvers for booleans, integers and floats on ``loader`` by
    the 1.2 core schema's, and read integers in base ten."""
    import re

    tags = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float")}
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in tags]
        for first, resolvers in loader.yaml_implicit_resolvers.items()
    }
    core = {
        "bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        "int": (r"^[-+]?[0-9]+$", "-+0123456789"),
        "float": (
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
            "-+0123456789.",
        ),
    }
    for name, (pattern, first) in core.items():
        loader.add_implicit_resolver(f"tag:yaml.org,2002:{name}", re.compile(pattern), list(first))
    loader.add_constructor(
        "tag:yaml.org,2002:int", lambda self, node: int(self.construct_scalar(node))
    )


def _load_json(text: str, path: str) -> dict | None:
    """The file as JSON (duplicate keys refused), or None where it is not JSON."""
    import json

    def pairs(items):
        keys = [k for k, _ in items]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise ValueError(f"--config-file: {path}: {dup!r} is given twice")
        return dict(items)

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError:
        return None  # a YAML flow mapping, {lr: 1e-4}, or broken: YAML says which


def find_config_file(argv: list[str]) -> str | None:
    """The value of ``--config-file`` in an argument list, before argparse sees it.

    Given twice, or abbreviated (``--config-f``, which argparse would accept and then ignore),
    it is refused rather than half-read."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if len(flag) > 2 and "--config-file".startswith(flag) and flag != "--config-file":
            raise ValueError(f"{flag}: write --config-file in full")
        if flag == "--config-file":
            if not eq and i + 1 >= len(argv):
                raise ValueError("--config-file: expected a file")
            found.append(value if eq else argv[i + 1])
    if len(found) > 1:
        raise ValueError(
            f"--config-file: given {len(found)} times ({', '.join(found)}); merge them into one"
        )
    return found[0] if found else None


def check_value(action, value, where: str) -> None:
    """A file's value fits its flag: true/false only for switches (YAML reads ``yes`` as true,
    which as a number would be 1), a list only for a repeatable flag, never a mapping."""
    import argparse

    switch, repeated = action.nargs == 0, isinstance(action, argparse._AppendAction)
    if isinstance(value, bool) != switch and not (switch and value is None):
        raise ValueError(
            f"{where}: expected {'true or false' if switch else 'a value'}, got {value!r}"
        )
    items = value if isinstance(value, list) and repeated else [value]
    if any(isinstance(v, (dict, list)) for v in items):
        raise ValueError(
            f"{where}: expected {'values' if repeated else 'one value'}, got {value!r}"
        )


def typed_value(action, value, where: str):
    """The value as the flag would parse it, from YAML's own type: YAML 1.1 reads ``1e-4`` as
    text, a 400-digit number must not become inf, and ``2.5`` is no whole number. A choice
    outside the flag's choices is refused here, naming the setting."""
    import argparse

    if action.nargs == 0:
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):  # one value is a list of one, not letters
        items = value if isinstance(value, list) else [value]
        return [typed_value_one(action, v, where) for v in items]
    return typed_value_one(action, value, where)


def typed_value_one(action, value, where: str):
    kind = action.type or str
    try:
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            typed = value
        elif kind is int:
            as_float = float(value)  # "1e3" reads as 1000, as in a JSON file
            if not as_float.is_integer() or isinstance(value, bool):
                raise ValueError(value)
            typed = (
                int(value) if isinstance(value, str) and value.strip().isdigit() else int(as_float)
            )
        elif kind is float:
            typed = float(value)
        else:
            typed = kind(str(value))
    except (TypeError, ValueError, OverflowError):
        name = getattr(kind, "__name__", "value")
        raise ValueError(f"{where}: expected {name}, got {_short(value)}") from None
    if action.choices is not None and typed not in action.choices:
        raise ValueError(
            f"{where}: unknown value {typed!r}; choose one of {', '.join(action.choices)}"
        )
    return typed


def _short(value) -> str:
    """A value as an error message may show it: a 400-digit number is not a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def apply_settings_file(parser, path: str) -> None:
    """Make a settings file's values the defaults of ``parser``, so flags still win (a repeated
    flag adds to the file's list). Every subcommand reads its file this way.

    Keys are the flags' names or their destinations (``concept`` or ``concepts``); a key that
    names no flag, two keys for one flag, or a value of the wrong type is an error naming it. A
    required flag that the file gives is no longer required on the command line; ``null``
    leaves a flag at its default (a saved ``erase_config.json`` reads back as the same run).
    """
    data = read_settings_file(path)
    actions, options = {}, set()
    for action in parser._actions:  # argparse keeps no public list of its options
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
            options.add(option.lstrip("-").replace("-", "_"))
        actions.setdefault(action.dest, action)
    unknown = sorted(k for k in data if k not in actions or k in ("help", "config_file"))
    if unknown:
        raise ValueError(f"--config-file: {path}: unknown settings: {', '.join(unknown)}")
    seen: dict = {}
    for key, value in data.items():
        action = actions[key]
        if id(action) in seen:
            raise ValueError(f"--config-file: {path}: {seen[id(action)]} and {key} are one setting")
        seen[id(action)] = key
        where = f"--config-file: {path}: {key}"
        check_value(action, value, where)
        if value is None:
            continue
        if action.nargs == 0 and key not in options:
            # the setting's own name (``blur: true``, as a saved config writes it) gives its
            # value; the switch's name (``no_blur: true``) means what typing the switch means
            parser.set_defaults(**{action.dest: value})
            continue
        parser.set_defaults(**{action.dest: typed_value(action, value, where)})
        action.required = False
