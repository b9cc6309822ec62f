"""The base of every typed configuration in the project (pydantic v2), and the tools around it.

One policy for all configs (training run, tokenizer training, tokenization job, ...):

* **Strict types.** An int field refuses ``"2"`` and ``2.0``; a bool field refuses ``"true"`` and ``1``;
  a ``Literal`` field refuses anything outside its choices. The exceptions are the forms YAML and the
  command line produce for the same value: a float field accepts an int and a numeric string (PyYAML
  reads ``lr: 1e-3`` as the *string* ``'1e-3'``, since YAML 1.1 wants a dot in a float), a tuple field
  accepts a list, and a ``Path`` field accepts a string.
* **No unknown keys.** A misspelt key is refused, named by its dotted path (``train.learning_rate``).
* **Checked on assignment.** ``cfg.train.lr = "fast"`` is refused like the same value in a file.
* **One error type.** Every refusal is a :class:`ConfigError` (a ``ValueError``) whose message names each
  offending field by its dotted path, e.g. ``train.micro_batch_size: input should be a valid integer,
  got '2'`` or ``model.layout='prefix' not in ('frame_prediction', 'hybrid')``.

Around the base :class:`TypedConfig`:

* :func:`load_yaml_layers` and :func:`apply_overrides`: layered YAML files (later files override earlier
  ones key by key) and ``{"section.key": value}`` overrides, merged into one dict before validation;
* :func:`format_config` / :func:`print_config`: every resolved field, one ``dotted.name ..... value``
  line each, between a header and a footer, as Megatron-LM prints its arguments at start-up;
* :func:`add_config_arguments` / :func:`config_overrides`: command-line flags derived from the fields
  (see :func:`cli_flags` for the per-field metadata: aliases, a renamed flag, constant-setting flags).

This module knows nothing about NBP; both ``data_prep`` and ``megatron_nbp`` build on it.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.fields import FieldInfo

__all__ = [
    "ConfigError", "TypedConfig", "cli_flags", "load_yaml_layers", "apply_overrides", "leaf_fields",
    "format_config", "print_config", "field_flags", "add_config_arguments", "config_overrides",
]


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names each offending field by its
    dotted path and value. One problem gives a one-line message (``invalid configuration: <problem>``),
    several give one ``  - <problem>`` line each."""

    @classmethod
    def from_problems(cls, problems: list[str]) -> "ConfigError":
        """The error listing ``problems`` (one string each, e.g. ``"train.lr: must be > 0, got -1"``)."""
        if len(problems) == 1:
            return cls(f"invalid configuration: {problems[0]}")
        return cls("invalid configuration:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------- types
def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a field's type: ``int | None`` -> ``(int, NoneType)``; others -> ``(t,)``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _value_type(annotation: Any) -> Any:
    """The field's type without ``None`` (``Literal[...] | None`` -> ``Literal[...]``)."""
    kinds = [k for k in _members(annotation) if k is not type(None)]
    return kinds[0] if len(kinds) == 1 else annotation


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, TypedConfig)


def _coerce(annotation: Any, value: Any) -> Any:
    """The YAML / command-line forms a strict field also accepts (see the module docstring)."""
    kinds = _members(annotation)
    if isinstance(value, str):
        if float in kinds and str not in kinds:
            try:
                return float(value)
            except ValueError:
                return value  # refused by the strict float check, which names the value
        if Path in kinds:
            return Path(value)
    if isinstance(value, list) and any(typing.get_origin(k) is tuple for k in kinds):
        return tuple(value)
    return value


# ----------------------------------------------------------------------------------------- base class
class _ConfigMeta(type(BaseModel)):
    """Turns pydantic's ValidationError of a direct construction (``ModelConfig(**d)``) into a ConfigError.

    Done here rather than in ``__init__``: pydantic validates nested sections through ``__init__`` when a
    class overrides it, which would nest one error message inside another."""

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _config_error(cls, exc) from None


class TypedConfig(BaseModel, metaclass=_ConfigMeta):
    """Base of the project's configs: strict pydantic model, no unknown keys, validated on assignment.

    Subclasses declare fields with ``Field(default, description=...)``; the description is the field's
    documentation and its ``--help`` text. Nested configs are fields whose type is another
    ``TypedConfig`` (a section of the YAML file). Cross-field rules that need more than one section (or
    the world size) belong in a subclass method (e.g. ``validate``), not in pydantic validators, so that
    a config can be assembled step by step and checked once.

    Raises (construction, :meth:`from_dict`, :meth:`set`, attribute assignment):
        ConfigError: a wrong type, a value outside a ``Literal``'s choices, an unknown key or a missing
            required field, each named by its dotted path.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              ser_json_inf_nan="constants")

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _config_error(type(self), exc) from None

    @field_validator("*", mode="before")
    @classmethod
    def _accept_yaml_forms(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name)
        return value if field is None else _coerce(field.annotation, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None):
        """Build from nested dicts (the YAML structure) plus dotted ``overrides`` (``None`` values are
        skipped: an unset command-line flag).

        Raises:
            ConfigError: see the class docstring; all problems of ``raw`` are listed at once.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid configuration: expected a mapping of keys to values, got "
                              f"{type(raw).__name__}")
        data = apply_overrides(raw, overrides or {})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(cls, exc) from None

    @classmethod
    def from_yaml(cls, paths: str | Path | Iterable[str | Path], overrides: dict[str, Any] | None = None):
        """Read one or more YAML files (later files override earlier ones key by key, see
        :func:`load_yaml_layers`) and apply ``overrides`` ({"train.lr": 1e-3, "save": "ckpt", ...}).

        Raises:
            FileNotFoundError: a file does not exist.
            ConfigError: an unknown key or a value of the wrong type (named by its dotted path).
        """
        return cls.from_dict(load_yaml_layers(paths), overrides)

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied (``dataclasses.replace`` for configs).

        Raises:
            ConfigError: an unknown key or a value of the wrong type.
        """
        return type(self).from_dict({**self.model_dump(), **changes})

    # ------------------------------------------------------------------ access
    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or a top-level key) to ``value``, validated like a value read from a file.

        Raises:
            ConfigError: unknown key, or a value of the wrong type (the message names ``dotted``).
        """
        target: TypedConfig = self
        *parents, key = dotted.split(".")
        for i, parent in enumerate(parents):
            target = getattr(target, parent, None)
            if not isinstance(target, TypedConfig):
                raise ConfigError(f"invalid configuration: unknown config key {dotted!r} "
                                  f"({'.'.join(parents[:i + 1])} is not a section)")
        if key not in type(target).model_fields:
            raise ConfigError(f"invalid configuration: unknown config key {dotted!r}; known keys: "
                              f"{', '.join(type(target).model_fields)}")
        try:
            BaseModel.__setattr__(target, key, value)
        except ValidationError as exc:
            raise _config_error(type(target), exc, prefix=tuple(parents)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, JSON/YAML-safe (tuples become lists, paths strings)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------- error messages
def _field_at(cls: type[TypedConfig], loc: tuple) -> tuple[type[TypedConfig] | None, FieldInfo | None]:
    """Walk ``loc`` (a pydantic error location) from ``cls``: (the config owning the last key, its field)."""
    owner, field = cls, None
    for i, key in enumerate(loc):
        if not isinstance(key, str) or owner is None:
            break
        field = owner.model_fields.get(key)
        if field is None:
            return owner, None
        if i < len(loc) - 1:
            nested = _value_type(field.annotation)
            owner = nested if _is_config(nested) else None
    return owner, field


def _dotted(loc: Iterable) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _problem(cls: type[TypedConfig], error: dict, prefix: tuple) -> str:
    """One line naming the field of a pydantic error by its dotted path."""
    loc = tuple(error["loc"])
    path, value, kind = _dotted(prefix + loc), error.get("input"), error["type"]
    if kind == "extra_forbidden":
        section: Any = cls
        if len(loc) > 1:
            _, field = _field_at(cls, loc[:-1])
            section = _value_type(field.annotation) if field is not None else None
        known = f"; known keys: {', '.join(section.model_fields)}" if _is_config(section) else ""
        return f"unknown config key {path!r}{known}"
    if kind == "missing":
        return f"{path}: required, not given"
    if kind == "literal_error":
        _, field = _field_at(cls, loc)
        choices = typing.get_args(_value_type(field.annotation)) if field is not None else ()
        if choices:
            return f"{path}={value!r} not in {choices!r}"
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    return f"{path}: {message[:1].lower()}{message[1:]}, got {value!r}"


def _config_error(cls: type[TypedConfig], exc: ValidationError, prefix: tuple = ()) -> ConfigError:
    return ConfigError.from_problems([_problem(cls, e, prefix) for e in exc.errors()])


# --------------------------------------------------------------------------------------- YAML + overrides
def load_yaml_layers(paths: str | Path | Iterable[str | Path]) -> dict[str, Any]:
    """Merge YAML files in order: a mapping in a later file updates the same mapping of the earlier ones
    key by key (recursively); any other value replaces it. Empty files count as ``{}``.

    Raises:
        FileNotFoundError: a file does not exist.
        ConfigError: a file whose top level is not a mapping.
    """
    merged: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"invalid configuration: {path} must hold a mapping of keys to values, got "
                              f"{type(data).__name__}")
        _merge(merged, data)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, dict) else value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``{"section.key": value}`` set (``None`` values are skipped).

    Raises:
        ConfigError: a dotted key that goes through a value that is not a section.
    """
    out = _copy_tree(raw)
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, key = dotted.split(".")
        node = out
        for i, parent in enumerate(parents):
            child = node.setdefault(parent, {})
            if child is None:
                child = node[parent] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"invalid configuration: unknown config key {dotted!r} "
                                  f"({'.'.join(parents[:i + 1])} is not a section)")
            node = child
        node[key] = value
    return out


def _copy_tree(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in raw.items()}


# ------------------------------------------------------------------------------------------- printing
def leaf_fields(cls: type[TypedConfig], prefix: str = "") -> dict[str, FieldInfo]:
    """Every non-section field of ``cls``, nested sections flattened: ``{"train.lr": FieldInfo, ...}``
    in declaration order (sections in their order)."""
    out: dict[str, FieldInfo] = {}
    for name, field in cls.model_fields.items():
        nested = _value_type(field.annotation)
        if _is_config(nested):
            out.update(leaf_fields(nested, f"{prefix}{name}."))
        else:
            out[prefix + name] = field
    return out


def _resolved(cfg: TypedConfig, dotted: str) -> Any:
    value: Any = cfg
    for key in dotted.split("."):
        value = getattr(value, key)
    return value


def format_config(cfg: TypedConfig, title: str = "arguments") -> str:
    """Every resolved field of ``cfg`` as ``  dotted.name ........ value`` lines sorted by name,
    between ``---- title ----`` and ``---- end of title ----`` (the layout of Megatron-LM's argument
    print-out, with dotted names for nested sections)."""
    names = sorted(leaf_fields(type(cfg)))
    width = max([len(n) for n in names] + [0]) + 4
    rule = max(width + 20, 60)
    lines = [f" {title} ".center(rule, "-")]
    lines += [f"  {name} {'.' * (width - len(name))} {_resolved(cfg, name)!r}" for name in names]
    lines.append(f" end of {title} ".center(rule, "-"))
    return "\n".join(lines)


def print_config(cfg: TypedConfig, title: str = "arguments", file=None) -> None:
    """Print :func:`format_config` (to ``file``, default stdout)."""
    print(format_config(cfg, title), file=file, flush=True)


# ----------------------------------------------------------------------------------------- command line
def cli_flags(*aliases: str, flag: str | None = None, consts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Command-line metadata of a field, for ``Field(..., json_schema_extra=cli_flags(...))``.

    Args:
        aliases: more option strings for the same flag (Megatron-LM's short names: ``"--tp"``).
        flag: the option string in place of the derived ``--field-name`` (e.g. ``"--input"`` for
            ``input_dir``).
        consts: option strings that set the field to a constant, ``{"--bf16": "bf16", ...}``; they are
            mutually exclusive with the field's own flag.
    """
    meta: dict[str, Any] = {}
    if aliases:
        meta["flags"] = list(aliases)
    if flag:
        meta["flag"] = flag
    if consts:
        meta["consts"] = dict(consts)
    return meta


def _cli_meta(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def field_flags(dotted: str, field: FieldInfo) -> list[str]:
    """All option strings of a field: its flag (``--`` + the field name with dashes, or the ``flag``
    metadata), its aliases and its constant-setting flags."""
    meta = _cli_meta(field)
    name = dotted.rsplit(".", 1)[-1]
    main = meta.get("flag") or "--" + name.replace("_", "-")
    own = [main, *meta.get("flags", [])]
    negated = []
    if _value_type(field.annotation) is bool and not name.startswith("no_"):
        negated = ["--no-" + f.removeprefix("--") for f in own if f.startswith("--")]
    return [*own, *negated, *meta.get("consts", {})]


def _argument_kwargs(dotted: str, field: FieldInfo, show_defaults: bool) -> dict[str, Any]:
    """argparse keyword arguments for one field (dest = the dotted path, no default: unset flags are
    absent from the namespace, so they never override the YAML)."""
    name = field_flags(dotted, field)[0].lstrip("-").replace("-", "_")
    kind = _value_type(field.annotation)
    help_text = field.description or ""
    if show_defaults and not field.is_required():
        help_text += f" (default: {field.get_default(call_default_factory=True)!r})"
    kwargs: dict[str, Any] = dict(dest=dotted, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                                  required=field.is_required())
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:  # --x / --no-x; a field named no_x only --no-x (Megatron-LM's --no-load-optim)
        negative = dotted.rsplit(".", 1)[-1].startswith("no_")
        kwargs["action"] = "store_true" if negative else argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs.update(choices=list(args), type=type(args[0]))
    elif origin is tuple and args and Ellipsis not in args:
        kwargs.update(nargs=len(args), type=args[0], metavar=name.upper())
    elif origin in (tuple, list):
        kwargs.update(nargs="+", type=args[0] if args else str, metavar=name.upper())
    elif kind in (int, float, str, Path):
        kwargs.update(type=kind, metavar=name.upper())
    else:
        raise TypeError(f"no command-line form for config field {dotted} of type {field.annotation}")
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TypedConfig], *,
                         show_defaults: bool = False) -> dict[str, str]:
    """Add one flag per field of ``cls`` (nested sections flattened; one argument group per section).

    The flag is ``--`` + the field name with dashes (Megatron-LM's convention: ``train.micro_batch_size``
    -> ``--micro-batch-size``); its help is the field's ``description``. A ``Literal`` field gets its
    choices; a bool field ``--x`` / ``--no-x`` (a field named ``no_x``: ``--no-x`` only); a tuple field
    ``nargs`` = its length; a list field one or more values. Field metadata from :func:`cli_flags` adds
    aliases, renames the flag or adds constant-setting flags. Unset flags stay out of the parsed
    namespace, so :func:`config_overrides` returns only what the command line set.

    Args:
        show_defaults: append each field's default to its help (for a tool without a YAML file, where
            the field default is the effective default).

    Returns:
        ``{option string: dotted field path}`` for every flag added.

    Raises:
        argparse.ArgumentError: two fields derive the same flag (or one the parser already has).
        TypeError: a field type with no command-line form.
    """
    flags: dict[str, str] = {}
    groups: dict[str, Any] = {}
    for dotted, field in leaf_fields(cls).items():
        section = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        if section not in groups:
            groups[section] = parser.add_argument_group(section, _summary(cls, section)) if section else parser
        target = groups[section]
        meta = _cli_meta(field)
        all_flags = field_flags(dotted, field)
        kwargs = _argument_kwargs(dotted, field, show_defaults)
        own = [all_flags[0], *meta.get("flags", [])]  # the flag and its aliases (argparse adds any --no-x)
        if meta.get("consts"):
            target = target.add_mutually_exclusive_group()
            for option, value in meta["consts"].items():
                target.add_argument(option, dest=dotted, action="store_const", const=value,
                                    default=argparse.SUPPRESS, help=f"same as {own[0]} {value}")
        target.add_argument(*own, **kwargs)
        flags.update({f: dotted for f in all_flags})
    return flags


def _summary(cls: type[TypedConfig], section: str) -> str | None:
    """First paragraph of the docstring of the section ``section`` of ``cls`` (an argument group's text)."""
    _, field = _field_at(cls, tuple(section.split(".")))
    doc = (_value_type(field.annotation).__doc__ or "") if field is not None else ""
    return " ".join(doc.strip().split("\n\n")[0].split()) or None


def config_overrides(args: argparse.Namespace, cls: type[TypedConfig]) -> dict[str, Any]:
    """``{dotted path: value}`` of the config flags set on the command line (see
    :func:`add_config_arguments`)."""
    given = vars(args)
    return {dotted: given[dotted] for dotted in leaf_fields(cls) if dotted in given}
