"""Typed access to a run's stage results (the contract is `schemas.stages`)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import structlog

from schemas.commands import RunInfo
from schemas.stages import STAGE_RESULTS, StageResult
from stratosd.errors import BadMessage

log = structlog.get_logger(__name__)

R = TypeVar("R", bound=StageResult)


def stage_result(run: RunInfo, cls: type[R]) -> R | None:
    """The stage's result, or None when the stage has not completed.

    A stored result that does not match the contract (a run written by an older daemon, an odd
    agent) is logged and read as missing, so a report is still written from the rest."""
    value = run.results.get(cls.STAGE)
    if value is None:
        return None
    try:
        return msgspec.convert(value, cls, strict=False)
    except msgspec.ValidationError as exc:
        log.warning("stage_result_malformed", run_id=run.run_id, stage=cls.STAGE, error=str(exc))
        return None


def checked(stage: str, result: StageResult | dict[str, Any]) -> dict[str, Any]:
    """A stage's result as the JSON the run stores, validated against its contract."""
    cls = STAGE_RESULTS.get(stage)
    if isinstance(result, StageResult):
        data: dict[str, Any] = msgspec.to_builtins(result)
        return data
    if cls is not None:
        try:
            msgspec.convert(result, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise BadMessage(f"results.{stage}", f"stage result breaks its contract: {exc}") \
                from exc
    return dict(result)
