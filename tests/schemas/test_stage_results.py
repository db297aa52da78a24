"""Stage results are a contract (schemas.stages): written validated, read typed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from schemas.commands import RunInfo
from schemas.specs import RunSpec, Selection, ServerOffer
from schemas.stages import STAGE_RESULTS, SelectServerResult, TrainResult
from stratosd.errors import BadMessage
from stratosd.pipeline import STAGES
from stratosd.results import checked, stage_result

OFFER = ServerOffer(id="cpu-a", agent_id="cpu-a", cpu_count=2, price_usd_per_hour=0.4)


def _run(results: dict[str, Any]) -> RunInfo:
    now = datetime.now(UTC)
    spec = RunSpec(name="contract", task={"name": "mahjong"}, teachers=[{"backend": "reference"}],
                   students=[{"model": "config:tiny"}])
    return RunInfo(run_id="01jcontract000000000000000", name="contract", state="running",
                   stage="train", created=now, updated=now, spec=spec, results=results)


def test_every_pipeline_stage_has_a_contract() -> None:
    assert list(STAGE_RESULTS) == list(STAGES)


def test_a_struct_is_stored_as_plain_json_and_read_back_typed() -> None:
    sel = SelectServerResult(selection=Selection(selector="pfg", chosen=OFFER),
                             agent_id="cpu-a", offers=[OFFER], queued_s=2.0)
    stored = checked("select_server", sel)
    assert isinstance(stored["selection"], dict) and stored["offers"][0]["id"] == "cpu-a"
    got = stage_result(_run({"select_server": stored}), SelectServerResult)
    assert got == sel


def test_an_agent_result_keeps_its_extra_fields_and_is_validated() -> None:
    stored = checked("train", {"final_loss": 0.5, "steps": 10, "artifact": "r/model.tar",
                               "my_trainer_metric": 7})
    assert stored["my_trainer_metric"] == 7  # kept in the run, ignored by the typed reader
    got = stage_result(_run({"train": stored}), TrainResult)
    assert got is not None and got.steps == 10 and got.artifact == "r/model.tar"


def test_a_result_that_breaks_its_contract_is_refused_naming_the_stage() -> None:
    with pytest.raises(BadMessage) as exc:
        checked("train", {"steps": "ten"})
    assert "results.train" in exc.value.message and "steps" in exc.value.message


def test_missing_is_none_and_malformed_is_logged_and_none() -> None:
    assert stage_result(_run({}), TrainResult) is None
    with structlog.testing.capture_logs() as logs:
        assert stage_result(_run({"train": {"steps": "ten"}}), TrainResult) is None
    assert any(e["event"] == "stage_result_malformed" and e["stage"] == "train" for e in logs)
