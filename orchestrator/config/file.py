"""A config file as plain data: size-bounded, safe YAML without anchors or aliases.

Imports neither torch, Ray nor MLflow, so the CLI refuses a hostile or broken file within a
blink, before any heavy import (`schema` validates the data).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a job config is a page of settings, never megabytes


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names file, field and value."""


class _DataLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a config is plain data of bounded size, and an
    alias bomb ("billion laughs") expands to gigabytes once validated."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"uses the YAML alias *{event.anchor} at line {event.start_mark.line + 1}; "
                "psat configs take no anchors or aliases: write the values out"
            )
        return super().compose_node(parent, index)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_DataLoader)  # noqa: S506 (a SafeLoader)


def read_config_file(path: str | Path) -> Any:
    """The file's YAML data, or a ConfigError naming the file and how to fix it."""
    path = Path(path)
    if not path.exists():
        examples = Path(str(files("jobs") / "configs"))  # installed with psat
        raise ConfigError(
            f"config file {path} does not exist; the example configs are installed in "
            f"{examples}: copy one, e.g. cp {examples / 'quickstart.yaml'} ."
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} has {size:,} bytes; a psat config has at most "
            f"{MAX_CONFIG_BYTES:,}: give the job's settings, not data"
        )
    try:
        return _yaml(path.read_text())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is None and not hasattr(err, "problem"):  # ours: already one sentence
        return str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"not valid YAML{where}: {problem}"


def parse_overrides(pairs: list[str]) -> dict:
    """`section.field=value` pairs (from --set) -> a nested dict; values are parsed as YAML."""
    merged: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.field=value, got {pair!r}")
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = _yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: {_yaml_problem(err)}") from None
    return merged
