"""Failure classes, end to end: a permanent failure (configuration, missing model, bad or missing
inputs) fails the run at once with the child's code, message and hint; a transient one is
retried; out of memory degrades the training settings, then the student, and the run records
what was done. Real nats-server, daemon, agent and job children; a test trainer plugin
(installed through an entry point) fails on demand."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agents.worker import child_error
from schemas.base import utc_now
from schemas.commands import RunInfo
from schemas.events import JobFailed, RunFailed
from stratosd.ctl.jobs import print_run
from stratosd.degrade import next_degradation
from stratosd.dispatch import job_error
from stratosd.errors import ConfigError, JobRejected, OutOfMemory, StratosError
from stratosd.errors import JobFailed as JobFailedError
from stratosd.pipeline import StageRun
from stratosd.stages import run_job
from stratosd.validate import spec_from_data
from tests.conftest import ROOT, start_agent
from tests.daemon.jobstages import SPEC, install, run_end

TRAINER = textwrap.dedent('''
    from stratosd import hookimpl
    from stratosd.api import Trainer
    from stratosd.errors import ConfigError, OutOfMemory

    MICRO, ACCUM, CKPT = ("per_device_train_batch_size", "gradient_accumulation_steps",
                          "gradient_checkpointing")


    class FailingTrainer(Trainer):
        """Fails as train.simulate says; a model in FITS trains (in no time)."""

        name = "failing-test"
        FITS = {"config:small"}

        def train(self, ctx):
            p = dict(ctx.params)
            how = p.get("simulate", "")
            if how == "config":
                raise ConfigError("simulated: learning_rate must be positive",
                                  hint="set train.learning_rate above 0",
                                  field="train.learning_rate")
            if how == "crash":
                raise RuntimeError("simulated crash")
            if how == "oom" and ctx.model not in self.FITS:
                raise MemoryError("simulated allocation failure")  # raw, as Python raises it
            if how == "oom-detail" and p.get(MICRO, 8) > 4:  # as run_hf_trainer reports it
                raise OutOfMemory("simulated CUDA out of memory", detail={
                    MICRO: p.get(MICRO, 8), ACCUM: p.get(ACCUM, 1), CKPT: p.get(CKPT, False)})
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            (ctx.out_dir / "weights.txt").write_text(ctx.model)
            return {"trainer": self.name, "steps": 1, "final_loss": 0.5, "ran_with": p}


    @hookimpl
    def stratos_trainers():
        return [FailingTrainer]
''')
ROW = {"example_id": "e1", "question": "1123m?", "answer": "1m", "reasoning": "r", "target": "t",
       "teacher": "oracle", "mode": "injection"}
CANDIDATES = [  # what the prescreen step returns, as the select_student result keeps it
    {"model": "config:big", "params_m": 100.0, "est_train_mem_mib": 9000.0,
     "prescreen_accuracy": 0.9},
    {"model": "config:huge", "params_m": 900.0, "est_train_mem_mib": 90000.0,
     "prescreen_accuracy": 0.95},  # larger than the one that ran out of memory: never next
    {"model": "config:dropped", "params_m": 1.0, "est_train_mem_mib": 100.0, "kept": False},
    {"model": "config:small", "params_m": 10.0, "est_train_mem_mib": 1000.0,
     "prescreen_accuracy": 0.5},
]


@pytest.fixture
async def gpu1(daemon: Any, nats_url: str, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Agent gpu-1 whose job children can load the failing-test trainer plugin."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "failing_trainer.py").write_text(TRAINER)
    dist = site / "failing_trainer-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: failing-trainer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stratos]\nfailing = failing_trainer\n")
    path = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.delenv("STRATOS_NO_PLUGIN_AUTOLOAD", raising=False)
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1")
    await daemon.fleet.wait_up("gpu-1", timeout=10)
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)


def training(daemon: Any, *, trainer: str = "failing-test", rows: bytes | None = None,
             retries: int = 2, chosen: str = "config:big") -> Any:
    """Stages whose synthesize uploads a dataset and whose train runs a real train job the way
    stratosd.stages.train does: the student from select_student, params from spec.train."""
    data = rows if rows is not None else (json.dumps(ROW) + "\n").encode()

    async def synthesize(ctx: StageRun) -> dict[str, Any]:
        src = daemon.config.home_path / f"{ctx.run_id}-dataset.jsonl"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        key = await daemon.bus.put_artifact(f"{ctx.run_id}/dataset.jsonl", src)
        return {"artifact": key if rows != b"" else f"{ctx.run_id}/missing.jsonl"}

    async def select_student(ctx: StageRun) -> dict[str, Any]:
        return {"candidates": CANDIDATES, "chosen": chosen, "reason": "best pre-screen"}

    async def train(ctx: StageRun) -> dict[str, Any]:
        args = {"model": ctx.result("select_student")["chosen"], "trainer": trainer,
                "params": dict(ctx.spec.train), "seed": 0}
        out = await run_job(ctx, "train", args,
                            inputs={"dataset": ctx.result("synthesize")["artifact"]})
        return out.result

    return install(daemon, {"synthesize": synthesize, "select_student": select_student,
                            "train": train}, retries=retries)


async def run(daemon: Any, train: dict[str, Any]) -> tuple[RunInfo, list[Any]]:
    """Submit straight to the pipeline (the test trainer's params are not lora-sft's)."""
    info = await daemon.pipeline.submit(spec_from_data({**SPEC, "train": train}))
    return await run_end(daemon, info.run_id, timeout=150)


@pytest.mark.timeout(240)
async def test_out_of_memory_degrades_then_takes_the_next_student(daemon: Any,
                                                                   gpu1: Any) -> None:
    stages = training(daemon, retries=0)  # degrading uses up no retry
    run_info, _ = await run(daemon, {"simulate": "oom", "per_device_train_batch_size": 4,
                                     "gradient_accumulation_steps": 2})
    assert run_info.state == "completed", run_info.error
    done = [
        "out of memory in train: micro-batch 4 → 2, gradient accumulation 2 → 4 "
        "(effective batch 8 kept)",
        "out of memory in train: micro-batch 2 → 1, gradient accumulation 4 → 8 "
        "(effective batch 8 kept)",
        "out of memory in train: gradient checkpointing on",
        "out of memory in train: student config:big → config:small (the next that fits)",
    ]
    train = run_info.results["train"]
    assert train["degradations"] == done
    assert train["model"] == "config:small"
    assert train["ran_with"] == {"simulate": "oom", "per_device_train_batch_size": 1,
                                 "gradient_accumulation_steps": 8,
                                 "gradient_checkpointing": True}
    assert run_info.results["select_student"]["chosen"] == "config:small"
    assert stages.attempts["train"] == [1, 2, 3, 4, 5]
    assert run_info.progress["oom_students"] == ["config:big"]


@pytest.mark.timeout(120)
async def test_out_of_memory_degrades_from_the_settings_the_child_ran_with(
    daemon: Any, gpu1: Any,
) -> None:
    training(daemon)
    run_info, _ = await run(daemon, {"simulate": "oom-detail"})  # the trainer's defaults: 8 × 1
    assert run_info.state == "completed", run_info.error
    assert run_info.results["train"]["degradations"] == [
        "out of memory in train: micro-batch 8 → 4, gradient accumulation 1 → 2 "
        "(effective batch 8 kept)"]
    assert run_info.results["train"]["ran_with"]["per_device_train_batch_size"] == 4


@pytest.mark.timeout(120)
async def test_out_of_memory_with_nothing_left_fails_the_run(daemon: Any, gpu1: Any) -> None:
    stages = training(daemon, chosen="config:dropped")  # no smaller fitting student left
    run_info, events = await run(daemon, {"simulate": "oom", "per_device_train_batch_size": 1,
                                          "gradient_checkpointing": True})
    assert run_info.state == "failed"
    assert run_info.error is not None and run_info.error["code"] == "out_of_memory"
    assert "nothing left to degrade" in run_info.error["message"]
    assert "MemoryError: simulated allocation failure" in run_info.error["message"]
    assert stages.attempts["train"] == [1]
    assert [e.code for e in events if isinstance(e, RunFailed)] == ["out_of_memory"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("trainer", "train", "rows", "code", "words", "hint"), [
    ("failing-test", {"simulate": "config"}, None, "config",
     "simulated: learning_rate must be positive", "set train.learning_rate above 0"),
    ("lora-sft", {}, b"{not json\n", "config", "line 1 is not JSON", "one JSON object"),
    ("lora-sft", {}, b"", "not_found", "missing.jsonl", "producing stage"),
    ("lora-sft-missing-model", {}, None, "config", "could not be loaded", "config:NAME"),
], ids=["config-error", "bad-input", "missing-input", "missing-model"])
async def test_a_permanent_failure_fails_the_run_at_once_with_the_childs_error(
    daemon: Any, gpu1: Any, capsys: pytest.CaptureFixture[str], trainer: str,
    train: dict[str, Any], rows: bytes | None, code: str, words: str, hint: str,
) -> None:
    chosen = "config:big"
    if trainer == "lora-sft-missing-model":
        trainer, chosen = "lora-sft", "no-such-org/no-such-model"
    stages = training(daemon, trainer=trainer, rows=rows, chosen=chosen)
    run_info, events = await run(daemon, train)
    assert run_info.state == "failed"
    assert stages.attempts["train"] == [1]  # never retried
    error = run_info.error or {}
    assert error["code"] == code, error
    assert words in error["message"] and f"[{code}]" in error["message"], error
    assert hint in error["hint"], error
    assert [(e.code, e.hint) for e in events if isinstance(e, RunFailed)] == \
        [(code, error["hint"])]
    capsys.readouterr()
    print_run(run_info)  # what `stratosctl status RUN` prints
    shown = capsys.readouterr().out
    assert f"[{code}]" in shown and words in shown and error["hint"] in shown


@pytest.mark.timeout(120)
async def test_a_transient_failure_is_retried(daemon: Any, gpu1: Any) -> None:
    stages = training(daemon, retries=1)
    run_info, _ = await run(daemon, {"simulate": "crash"})
    assert run_info.state == "failed"
    assert stages.attempts["train"] == [1, 2]
    error = run_info.error or {}
    assert error["code"] == "job_failed" and "RuntimeError: simulated crash" in error["message"]


def test_the_child_keeps_its_error_code() -> None:
    class OutOfMemoryError(RuntimeError):  # torch's name, without importing torch
        pass

    assert child_error(ConfigError("bad", hint="fix", field="x"))["code"] == "config"
    oom = child_error(OutOfMemory("oom", detail={"per_device_train_batch_size": 2}))
    assert (oom["code"], oom["detail"]) == ("out_of_memory", {"per_device_train_batch_size": 2})
    for exc in (MemoryError(), OutOfMemoryError("CUDA error"),
                RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")):
        assert child_error(exc)["code"] == "out_of_memory", exc
    crash = child_error(KeyError("x"))
    assert crash["code"] == "job_failed" and crash["message"] == "KeyError: 'x'"


def test_a_failed_job_raises_by_its_class() -> None:
    def err(code: str) -> StratosError:
        return job_error("j1", JobFailed(job_id="j1", step="train", code=code, message="m",
                                         hint="h", detail={"a": 1}))

    config = err("config")
    assert isinstance(config, JobRejected) and config.remote_code == "config"
    assert config.message == "train job j1 failed [config]: m" and config.hint == "h"
    assert isinstance(err("not_found"), JobRejected)
    oom = err("out_of_memory")
    assert isinstance(oom, OutOfMemory) and oom.detail == {"a": 1}
    for transient in ("job_failed", "bus_unavailable", "internal", "something_new"):
        failed = err(transient)
        assert isinstance(failed, JobFailedError) and failed.child_code == transient


def test_an_odd_micro_batch_says_how_the_effective_batch_changed() -> None:
    spec = spec_from_data({**SPEC, "train": {"per_device_train_batch_size": 5}})
    now = utc_now()
    run_info = RunInfo(run_id="r", name="n", state="running", stage="train", created=now,
                       updated=now, spec=spec)
    step = next_degradation(run_info, "train", {})
    assert step is not None and step.train == {"per_device_train_batch_size": 2,
                                               "gradient_accumulation_steps": 3}
    assert "(effective batch 5 → 6)" in step.note
    assert next_degradation(run_info, "evaluate", {}) is None  # only training degrades
