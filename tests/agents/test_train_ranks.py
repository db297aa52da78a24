"""A train job with ranks = 2 on one agent: torchrun under the job, a collective cancel."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from schemas.commands import Accepted, RunStep
from tests.plugins.test_distributed import write_dataset

pytest.importorskip("trl")


async def _until(pred: Any, timeout: float = 60.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


def _train(job_id: str, dataset: str, **params: Any) -> RunStep:
    base = {"ranks": 2, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8,
            "cpu_threads": 1, "learning_rate": 5e-3}
    return RunStep(job_id=job_id, run_id="r1", step="train", inputs={"dataset": dataset},
                   args={"model": "config:tiny", "trainer": "lora-sft",
                         "params": {**base, **params}})


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_rank_job_trains_and_reports_its_ranks(daemon: Any, agent: Any,
                                                         tmp_path: Path) -> None:
    key = await daemon.bus.put_artifact("r1/data.jsonl", write_dataset(tmp_path / "d.jsonl"))
    assert isinstance(await daemon.dispatch.send("gpu-1", _train("ranks-1", key)), Accepted)
    # the job holds the agent's devices while its ranks run
    await _until(lambda: agent.runner.jobs["ranks-1"].state == "running", 20)
    assert agent.runner.training_jobs() == ["ranks-1"]
    await _until(lambda: agent.runner.jobs["ranks-1"].state not in ("queued", "running"), 150)
    job = agent.runner.jobs["ranks-1"]
    assert job.state == "completed", (job.error, list(job.stderr_tail)[-5:])
    assert job.result["ranks"] == 2 and job.result["strategy"] == "ddp"
    assert job.result["steps"] == 4 and "model.tar" in job.artifacts
    ckpt = Path(agent.runner.work_dir) / "runs" / "r1" / "train" / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "stratos_world.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_cancel_stops_every_rank_at_one_step_with_a_checkpoint(
        daemon: Any, agent: Any, tmp_path: Path) -> None:
    key = await daemon.bus.put_artifact("r1/data.jsonl", write_dataset(tmp_path / "d.jsonl"))
    cmd = _train("ranks-2", key, max_steps=100_000, save_steps=100_000)
    assert isinstance(await daemon.dispatch.send("gpu-1", cmd), Accepted)
    events = Path(agent.runner.work_dir) / "runs" / "r1" / "train" / "launch" / "events.jsonl"
    await _until(lambda: events.is_file() and events.stat().st_size > 0, 120)  # ranks train
    agent.runner.grace_s = 60.0  # a busy host: let the ranks save rather than be killed
    job = await agent.runner.cancel("ranks-2")  # what the cancel command runs
    assert job.state == "cancelled"
    # both ranks left together at one step: rank 0 saved there, the trainer returned
    result = json.loads((events.parent / "result.json").read_text())
    assert result["stopped"] and result["steps"] >= 1
    ckpts = Path(agent.runner.work_dir) / "runs" / "r1" / "train" / "checkpoints"
    saved = ckpts / f"checkpoint-{result['steps']}"
    assert json.loads((saved / "stratos_world.json").read_text())["world_size"] == 2
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                               "rng_state_1.pth"}
