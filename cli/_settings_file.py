"""Settings from a YAML (or JSON) file, for every subcommand's ``--config-file``.

Keys are the flags' names, with dashes or underscores (``samples-per-prompt`` or
``samples_per_prompt``); flags given on the command line win over the file.
"""

from __future__ import annotations


def read_settings_file(path: str) -> dict:
    """The file's mapping, keys with dashes turned to underscores; one-line errors."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--config-file: {path}: no such file") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--config-file: {path}: not valid YAML ({e.__class__.__name__})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config-file: {path}: must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def find_config_file(argv: list[str]) -> str | None:
    """The value of ``--config-file`` in an argument list, before argparse sees it."""
    for i, arg in enumerate(argv):
        if arg == "--config-file" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-file="):
            return arg.split("=", 1)[1]
    return None


def apply_settings_file(parser, path: str) -> None:
    """Make a settings file's values the defaults of ``parser``, so flags still win.

    A setting that names no flag of the subcommand is an error naming it; a required flag that
    the file gives is no longer required on the command line.
    """
    data = read_settings_file(path)
    actions = {}
    for action in parser._actions:  # argparse keeps no public list of its options
        for option in action.option_strings:
            actions[option.lstrip("-").replace("-", "_")] = action
        actions.setdefault(action.dest, action)
    unknown = sorted(k for k in data if k not in actions or k in ("help", "config_file"))
    if unknown:
        raise ValueError(f"--config-file: {path}: unknown settings: {', '.join(unknown)}")
    for key, value in data.items():
        action = actions[key]
        if action.nargs == 0 or isinstance(value, (bool, list)):  # flags and repeated options
            parser.set_defaults(**{action.dest: value})
        else:
            parser.set_defaults(**{action.dest: str(value)})  # argparse types string defaults
        action.required = False
