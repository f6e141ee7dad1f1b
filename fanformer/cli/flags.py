"""Dataclass fields as command-line flags: the one way the CLI turns configs and the
registries' options into flags, so a new field or a new format/method needs no CLI edit.

Two kinds:
- config flags (`add_config_flags`): one class, dest "Class.field", for configs whose
  unset fields must stay None so presets and saved state win (model, training, experiment);
- option flags (`add_option_flags`): the union of several registered options classes
  (export formats, quantization methods), one flag per field name, dest "option.field";
  `inapplicable` names the given flags the chosen class does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

OPTION = "option."


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text: str) -> int:
    """argparse type of a size: refused (one line, exit 2) unless a whole number >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type of a count where 0 has a stated meaning (off, all)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _kind(hint) -> tuple[type, bool]:
    """(element type, repeatable) of a field's type hint: `X | None` is X, `tuple[X, ...]` repeats X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    if args and type(None) in typing.get_args(hint):
        return args[0], False
    return hint, False


def _add(group, field: dataclasses.Field, kind: type, repeat: bool, dest: str, help_text: str) -> str | None:
    """Add the flag(s) of one field; returns how messages name it, or None if it has no flag."""
    help_text = help_text.replace("%", "%%")  # argparse %-formats help
    name = flag(field.name)
    choices = field.metadata.get("choices")
    negation = field.metadata.get("negation")
    if kind is bool and negation:  # --sym / --asym
        flags = group.add_mutually_exclusive_group()
        flags.add_argument(name, dest=dest, action="store_const", const=True, default=None, help=help_text or None)
        flags.add_argument(flag(negation), dest=dest, action="store_const", const=False, default=None,
                           help=f"the opposite of {name}")
        return f"{name}/{flag(negation)}"
    if kind is bool:  # `--compile` alone means true; `--compile false` is also accepted
        group.add_argument(name, dest=dest, default=None, nargs="?", const=True, type=parse_bool, metavar="BOOL",
                           help=help_text or None)
    elif repeat and kind is str:
        group.add_argument(name, dest=dest, default=None, action="append", metavar="VALUE", help=help_text or None)
    elif kind in (int, float, str):
        group.add_argument(name, dest=dest, default=None, type=kind, choices=choices,
                           metavar=None if choices else kind.__name__.upper(), help=help_text or None)
    else:
        return None
    return name


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str, show_defaults: bool = True) -> None:
    """One optional flag per field of `cls`; unset flags stay None."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, repeat = _kind(hints[f.name])
        if repeat:
            continue
        help_text = f.metadata.get("help", "")
        if show_defaults and f.default is not dataclasses.MISSING:
            help_text += f" (default {f.default})"
        _add(group, f, kind, repeat, f"{cls.__name__}.{f.name}", help_text.strip())


def config_overrides(args: argparse.Namespace, cls) -> dict:
    prefix = f"{cls.__name__}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def add_option_flags(parser: argparse.ArgumentParser, classes: dict[str, type], title: str) -> dict[str, str]:
    """One flag per field name over `classes` (name -> options dataclass); the help says which
    names have it. Returns field -> how messages name its flag."""
    owners: dict[str, dict[str, object]] = {}  # field -> {owner: its default there}
    fields: dict[str, tuple[dataclasses.Field, type, bool]] = {}
    for owner, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, {})[owner] = f.default
            fields.setdefault(f.name, (f, *_kind(hints[f.name])))
    group = parser.add_argument_group(title)
    shown = {}
    for name, (f, kind, repeat) in fields.items():
        defaults = owners[name]
        if repeat or all(d in (None, dataclasses.MISSING) for d in defaults.values()):
            default = ""
        elif len(set(map(repr, defaults.values()))) == 1:
            default = f" (default {f.default})"
        else:
            default = f" (default {', '.join(f'{owner} {d}' for owner, d in defaults.items())})"
        whose = "" if len(owners[name]) == len(classes) else f"{'/'.join(owners[name])}: "
        label = _add(group, f, kind, repeat, OPTION + name, f"{whose}{f.metadata.get('help', '')}{default}")
        if label:
            shown[name] = label
    return shown


def given_options(args: argparse.Namespace) -> dict:
    """The option flags that were given, by field name (repeatable ones as tuples)."""
    given = {k[len(OPTION):]: v for k, v in vars(args).items() if k.startswith(OPTION) and v is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def inapplicable(given: dict, chosen: type, classes: dict[str, type], shown: dict[str, str],
                 choice_flag: str, choice: str, argv: list[str] = ()) -> str | None:
    """None if `chosen` has every given field; else one message naming the flags that do not
    apply to `choice` (in the order `argv` gives them) and what they apply to."""
    names = {f.name for f in dataclasses.fields(chosen)}

    def position(label: str) -> int:
        return min((i for i, arg in enumerate(argv) if arg.split("=")[0] in label.split("/")), default=len(argv))

    extra = sorted((shown.get(name, flag(name)) for name in given if name not in names), key=position)
    if not extra:
        return None
    owners = {label: [owner for owner, cls in classes.items() if name in {f.name for f in dataclasses.fields(cls)}]
              for name, label in shown.items() if label in extra}
    where = "; ".join(f"{label} only applies to {choice_flag} {' or '.join(owners.get(label) or ['none'])}"
                      for label in extra)
    verb = "does" if len(extra) == 1 else "do"
    return f"{', '.join(extra)} {verb} not apply to {choice_flag} {choice}; {where}"
