"""Checks of a command line against the project's typed configs in `conf/` (which `config_dir()`
finds), made before Hydra composes anything: YAML that would compose wrongly, keys the schema
does not have (each with the closest key it does have) and values its scalar keys cannot take.
The sweep's and the analysis's command lines share them (the analysis may not import the sweep).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any


def yaml_problems(argv: list[str], config_dir: str) -> list[str]:
    """YAML errors in the config files a command will compose (the project's conf/ and any
    `hydra.searchpath` dir on the command line), found before Hydra would print a traceback for
    them. A key twice in one mapping (an arm defined twice) is one: YAML would keep the last."""
    import yaml

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    mark = key_node.start_mark
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    dirs = [config_dir]
    for arg in argv:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            dirs += [p.removeprefix("file://") for p in arg.split("=", 1)[1].strip("[]").split(",") if p]
    problems = []
    for path in sorted(p for d in dirs for p in Path(d).rglob("*.yaml")):
        try:
            yaml.load(path.read_text(), Loader=Strict)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = f" line {where.line + 1}" if where else ""
            problems.append(f"{path}{line}: {getattr(exc, 'problem', None) or exc}")
    return problems


def override_problems(argv: list[str], schema: Any, config_dir: str) -> list[str]:
    """Plain overrides (`key=value`) whose key the schema does not have, each with the closest key
    it does have, or whose value a scalar key cannot take (`analysis.margin=`): found before
    Hydra, whose own message would advise `+key=value` first, which the schema then refuses.
    Config groups (`model=tiny`, `op@ops.base=...`), `hydra.*` keys and `+`/`~` overrides are
    left to Hydra and to `to_config`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    # Hydra's flags that take a value (`-sc install=bash`, `-cn NAME`): the value is no override.
    valued = {"-sc", "--shell-completion", "-cn", "--config-name", "-cp", "--config-path"}
    valued |= {"-cd", "--config-dir", "--experimental-rerun", "-p", "--package", "-c", "--cfg"}
    candidates = [
        a
        for i, a in enumerate(argv)
        if "=" in a and not a.startswith("-") and (i == 0 or argv[i - 1] not in valued)
    ]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return []  # Hydra says what is wrong with the syntax itself
    groups = {p.relative_to(config_dir).as_posix() for p in Path(config_dir).rglob("*") if p.is_dir()}
    problems = []
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.is_force_add() or override.package:
            continue
        if key in groups or key.split(".")[0].split("/")[0] == "hydra":
            continue
        problem, leaf = _schema_leaf(schema, key.split("."))
        if not problem and leaf is not None:
            problem = _value_problem(override, leaf)
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _value_problem(override: Any, leaf: Any) -> str:
    """Why the override's value (or any value of a sweep over several) cannot be the scalar type
    `leaf` (Optional[...] also takes null), or ""."""
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    args = typing.get_args(leaf)
    optional = typing.get_origin(leaf) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), leaf) if optional else leaf
    if base not in SCALARS:
        return ""
    for value in values:
        if not (value is None and optional) and not _fits(value, base):
            return f"{value!r} is not {SCALARS[base]}"
    return ""


def _fits(value: Any, base: type) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return False
    if base is float:
        return isinstance(value, int | float)
    if base is int:
        return isinstance(value, int)
    return isinstance(value, str | int | float)  # Hydra reads `name=3` as 3: still a fine string


def _schema_leaf(schema: Any, parts: list[str]) -> tuple[str, Any]:
    """(why `parts` is no key of the dataclass `schema`, with a suggestion, or ""; the type of the
    key's value where it is a field, else None)."""
    node: Any = schema
    for i, part in enumerate(parts):
        origin = typing.get_origin(node)
        if origin is dict:  # a dict of dataclasses (ops, rules, arms): any name, then its fields
            node = typing.get_args(node)[-1]
            continue
        if origin in (list, tuple) or not dataclasses.is_dataclass(node):
            return "", None  # an element of a list or a leaf's value: Hydra checks the rest
        hints = typing.get_type_hints(node)
        if part not in hints:
            where = ".".join(parts[:i])
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f" (did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1 :]])}?)" if close else ""
            return f"no such key{' in ' + where if where else ''}{hint}", None
        node = hints[part]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if (
            i < len(parts) - 1
            and typing.get_origin(node) in (typing.Union, types.UnionType)
            and len(args) == 1
        ):
            node = args[0]  # Optional[X] on the way down
    return "", node
