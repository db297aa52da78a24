"""Job-spec checks the schema cannot make: plugin names exist, params sane, no secrets."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from schemas.base import decode_or_error
from schemas.specs import RunSpec
from stratosd.errors import BadMessage, ConfigError, StratosError
from stratosd.plugins import Plugins
from stratosd.registry import Registry

_SECRET_PARAM = re.compile(r"(api_?key|secret|password|token)$", re.I)
_SPEC_DECODER = msgspec.json.Decoder(RunSpec)


def parse_spec_toml(path: str | Path) -> RunSpec:
    """Read a job TOML file into a RunSpec; errors name the file and the field."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file {str(p)!r} does not exist",
                          hint="pass the path of a job TOML (see examples/)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}", hint="fix the syntax there") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                          hint="save the job file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read job file {str(p)!r}: {exc.strerror or exc}",
                          hint="pass the path of a readable job TOML file") from None
    return spec_from_data(data, origin=str(p))


def spec_from_data(data: Any, origin: str = "job") -> RunSpec:
    """Convert plain data into a RunSpec (BadMessage names the field)."""
    try:
        return decode_or_error(_SPEC_DECODER, msgspec.json.encode(data))
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate cannot be encoded
        raise ConfigError(f"{origin}: cannot be read as a job: {exc}",
                          hint="check the file's text encoding and values", field="$") from None
    except BadMessage as exc:
        raise ConfigError(f"{origin}: invalid value at `{exc.field}`: {exc.reason}",
                          hint="fix that field in the job file", field=exc.field) from None


def _secret_keys(params: dict[str, Any], where: str) -> None:
    for key in params:
        if _SECRET_PARAM.search(key):
            raise ConfigError(
                f"{where}.{key}: job specs must not carry secrets",
                hint=f"put it in an environment variable and name it with {where}.{key}_env "
                "(e.g. api_key_env = \"OPENAI_API_KEY\")",
                field=f"{where}.{key}",
            )


def validate_spec(spec: RunSpec, plugins: Plugins) -> None:
    """Raise ConfigError naming the first bad field of a spec."""
    checks: list[tuple[str, Registry[Any], str]] = [
        ("selector", plugins.selectors, spec.selector),
        ("task.name", plugins.tasks, spec.task.name),
        ("trainer", plugins.trainers, spec.trainer),
        ("deployer", plugins.deployers, spec.deployer),
    ]
    if spec.mode != "auto":
        checks.append(("mode", plugins.modes, spec.mode))
    for i, teacher in enumerate(spec.teachers):
        checks.append((f"teachers[{i}].backend", plugins.teachers, teacher.backend))
        _secret_keys(teacher.params, f"teachers[{i}].params")
    for i, student in enumerate(spec.students):
        _secret_keys(student.params, f"students[{i}].params")
    _secret_keys(spec.train, "train")
    for field, registry, name in checks:
        if name not in registry:
            known = ", ".join(registry.names()) or "none installed"
            raise ConfigError(f"{field}: unknown {registry.kind} {name!r} (known: {known})",
                              hint="fix the name, or install the plugin that provides it",
                              field=field)
    try:
        plugins.selectors.get(spec.selector)(spec.selector_params)
    except (StratosError, TypeError, ValueError) as exc:
        raise ConfigError(f"selector_params: {exc}", hint="see the selector's documentation",
                          field="selector_params") from None
    labels = [t.label for t in spec.teachers]
    if len(set(labels)) != len(labels):
        raise ConfigError("teachers: two teachers have the same name",
                          hint="give each a distinct `name`", field="teachers")
    try:
        plugins.task(spec.task.name, spec.task.params)
    except StratosError as exc:
        raise ConfigError(f"task.params: {exc.message}", hint=exc.hint,
                          field=f"task.params{('.' + exc.field) if exc.field else ''}") from None
