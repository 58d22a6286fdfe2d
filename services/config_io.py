"""Configs in and out: YAML, then `ORZ__SECTION__KEY` environment variables, then flags (later wins), with one
error naming every bad key and value; the whole config as environment variables for child processes; the
configuration reference (docs/configuration.md)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from services.config import ENV_PREFIX, Config, ConfigError

BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than_equal", "less_than")


def _bound_message(section: str, key: str, value: Any) -> str:
    """A value outside its field's bounds (`ge`/`gt`/`le` on the field in services/config.py), as one line:
    `learner.max_staleness must be >= 0, got -1`, `learner.gamma must be in [0, 1], got 1.5`."""
    field = Config.model_fields[section].annotation.model_fields[key]
    low = high = None
    strict = False
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            low, strict = m.gt, True
        elif isinstance(m, annotated_types.Ge):
            low = m.ge
        elif isinstance(m, annotated_types.Le):
            high = m.le
    kind = next((t for t in (float, int) if t in (field.annotation, *getattr(field.annotation, "__args__", ()))),
                None)
    with contextlib.suppress(TypeError, ValueError):
        value = kind(value) if kind is not None and not isinstance(value, bool) else value
    if high is None:
        bounds = f"{'>' if strict else '>='} {low}"
    elif low is None:
        bounds = f"<= {high}"
    else:
        bounds = f"in {'(' if strict else '['}{low}, {high}]"
    return f"{section}.{key} must be {bounds}, got {value!r}"


def _explain(exc: ValidationError, source: str) -> ConfigError:
    """pydantic's errors as one line per key, with a suggestion for a misspelt one."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            section = Config
            for part in err["loc"][:-1]:
                field = section.model_fields.get(str(part))
                section = field.annotation if field is not None and isinstance(field.annotation, type) else None
                if section is None:
                    break
            known = list(section.model_fields) if section is not None else []
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            lines.append(f"{loc}: unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
        elif err["type"] == "value_error" and not err["loc"]:
            lines.extend(str(err["ctx"]["error"]).splitlines())
        elif err["type"] in BOUND_ERRORS and len(err["loc"]) == 2:
            lines.append(_bound_message(str(err["loc"][0]), str(err["loc"][1]), err.get("input")))
        else:
            lines.append(f"{loc}: {err['msg']}, got {err.get('input')!r}")
    return ConfigError(f"invalid configuration ({source}):\n" + "\n".join(f"  - {line}" for line in lines))


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`ORZ__LEARNER__TOTAL_STEPS=5` → {"learner": {"total_steps": 5}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        _set_path(tree, path, yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """YAML file, then environment (`ORZ__…`), then explicit overrides (CLI flags); later wins."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    source = f"{path or 'defaults'} + ORZ__ environment + overrides"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        error = _explain(exc, source)
        # The range checks run once every key is well-typed: check the rest without the bad keys, so one
        # message names every problem.
        bad = [err["loc"] for err in exc.errors() if err["loc"]]
        if bad:
            try:
                Config.model_validate(_without(data, bad))
            except ValidationError as rest:
                lines = [line for line in str(_explain(rest, source)).splitlines()[1:] if line not in str(error)]
                error = ConfigError("\n".join([str(error), *lines]))
        raise error from None


def _without(tree: Mapping[str, Any], locations: list[tuple]) -> dict[str, Any]:
    """`tree` without the keys at `locations` (pydantic error locations)."""
    out = copy.deepcopy(dict(tree))
    for loc in locations:
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def require_model(cfg: Config) -> None:
    """For processes that load the base model (learner, generator, eval): a clear error when it is not there."""
    path = cfg.model.path
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json (not a Hugging Face model directory)"
        raise ConfigError(f"model.base_path {path} {what}: build the tiny model with `orz make-base-model`, or "
                          f"point model.base_path at an HF-format model")


def config_to_env(cfg: Config) -> dict[str, str]:
    """The whole config as `ORZ__…` variables, so a child process sees exactly the parent's settings."""
    env: dict[str, str] = {}

    def walk(prefix: list[str], value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(prefix + [k], v)
        else:
            env[ENV_PREFIX + "__".join(p.upper() for p in prefix)] = yaml.safe_dump(
                value, default_flow_style=True, width=1 << 20
            ).strip().removesuffix("...").strip()

    walk([], cfg.model_dump(mode="json"))
    return env


def reference_markdown() -> str:
    """The configuration reference table of docs/configuration.md, generated from the models above."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def row(key: str, field: Any) -> None:
        if field.is_required():
            lines.append(f"| `{key}` | (required) | {field.description or ''} |")
            return
        default = field.default if field.default_factory is None else field.default_factory()
        if isinstance(default, BaseModel):
            return
        shown = yaml.safe_dump(default, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | `{shown}` | {field.description or ''} |")

    for name, field in Config.model_fields.items():
        section = field.default_factory() if field.default_factory is not None else None
        if isinstance(section, BaseModel):
            for sub, subfield in type(section).model_fields.items():
                row(f"{name}.{sub}", subfield)
                item = typing.get_args(subfield.annotation)[0] if typing.get_origin(subfield.annotation) is list \
                    else None
                if isinstance(item, type) and issubclass(item, BaseModel):  # a list of sections: task.sources
                    for part, partfield in item.model_fields.items():
                        row(f"{name}.{sub}[].{part}", partfield)
        else:
            row(name, field)
    return "\n".join(lines)


def write_reference(page: Path) -> None:
    """Rewrites the table after the page's `<!-- config-reference:start … -->` marker with the current one
    (`python -m services.config_io docs/configuration.md`)."""
    lines = page.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("<!-- config-reference:start"))
    end = start + 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    page.write_text("\n".join([*lines[:start + 1], *reference_markdown().split("\n"), *lines[end:]]))


if __name__ == "__main__":
    import sys

    write_reference(Path(sys.argv[1]))
