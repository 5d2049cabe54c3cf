"""Layered settings: defaults, then ``[tool.gradscope]`` of the nearest pyproject.toml,
then the command line (which wins).

Unknown keys are an error that names the key: a typo in CI configuration must
not silently turn a check off. No torch here; the CLI reads settings before
deciding whether torch is needed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from gradscope.errors import ConfigError

FAIL_ON = ("error", "warning", "info", "never")


@dataclass(frozen=True)
class Settings:
    """Everything ``gradscope analyze`` can be told, with its defaults."""

    fail_on: str = "error"
    device: str = "auto"
    probe: bool = True
    output: str | None = None
    tracer: str | None = None
    input_shape: tuple[str, ...] = ()
    dtype: tuple[str, ...] = ()
    html: str | None = None
    json: str | None = None
    sarif: str | None = None
    seed: int = 0
    vanishing_warning: float = 1e-2
    vanishing_error: float = 1e-3
    exploding_warning: float = 1e2
    exploding_error: float = 1e3
    min_coverage: float = 0.9
    lr: float | None = None
    optimizer: str = "sgd"
    source: str | None = field(default=None, compare=False)

    def merged(self, **overrides: Any) -> Settings:
        """A copy with the given values set, ignoring ``None`` (an option not given)."""
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        return replace(self, **given)


_KEYS = {f.name for f in fields(Settings)} - {"source"}


def find_pyproject(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_settings(start: Path | None = None) -> Settings:
    """Defaults overlaid with ``[tool.gradscope]`` from the nearest pyproject.toml."""
    path = find_pyproject((start or Path.cwd()).resolve())
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix the TOML syntax") from exc
    table = data.get("tool", {}).get("gradscope")
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.gradscope] in {path} is not a table", "write it as a table")
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key == "thresholds" and isinstance(value, dict):
            for sub, sub_value in value.items():
                sub_key = sub.replace("-", "_")
                if sub_key not in _KEYS:
                    raise ConfigError(f"unknown key thresholds.{sub} in [tool.gradscope] of "
                                      f"{path}", "see the README for the settings")
                values[sub_key] = sub_value
            continue
        if key not in _KEYS:
            raise ConfigError(f"unknown key {raw_key!r} in [tool.gradscope] of {path}",
                              "see the README for the settings")
        if key in ("input_shape", "dtype"):
            value = tuple([value] if isinstance(value, str) else value)
        values[key] = value
    settings = Settings(source=str(path)).merged(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if settings.fail_on not in FAIL_ON:
        raise ConfigError(f"fail-on must be one of {', '.join(FAIL_ON)}, not "
                          f"{settings.fail_on!r}", "fix the setting")
    for name in ("vanishing_warning", "vanishing_error", "exploding_warning", "exploding_error",
                 "min_coverage"):
        value = getattr(settings, name)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{name} must be a non-negative number, not {value!r}",
                              "fix the setting")
