"""One training job per device set: a second one is refused while the first holds them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import subjects
from schemas.commands import Accepted, Calibrate, RunStep
from stratosd.api import DataRow
from stratosd.errors import RemoteError
from tests.conftest import start_agent


async def _until(pred: Any, timeout: float = 30.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


def _dataset(path: Path) -> Path:
    rows = [DataRow(example_id=f"{a}-{b}", question=f"{a}+{b}=", answer=str(a + b),
                    reasoning=f"{a}+{b}={a + b}", target=f"{a}+{b}={a + b}\nAnswer: {a + b}",
                    teacher="reference", mode="injection", verified=True)
            for a in range(4) for b in range(4)]
    path.write_bytes(b"\n".join(msgspec.json.encode(r) for r in rows) + b"\n")
    return path


def _train(job_id: str, **inputs: str) -> RunStep:
    # far more steps than the test lets it run: it trains until cancelled
    return RunStep(job_id=job_id, run_id="r1", step="train", inputs=inputs,
                   args={"model": "config:tiny", "trainer": "lora-sft",
                         "params": {"max_steps": 100_000, "save_steps": 100_000}})


@pytest.mark.timeout(120)
async def test_second_training_job_is_refused_while_the_first_holds_the_devices(
    daemon: Any, nats_url: str, tmp_path: Path
) -> None:
    agent, task = await start_agent(nats_url, tmp_path, "gpu-1", calibrate=False)
    try:
        await _until(lambda: daemon.fleet.is_up("gpu-1"), 10)
        key = await daemon.bus.put_artifact("r1/data.jsonl", _dataset(tmp_path / "data.jsonl"))
        await daemon.dispatch.send("gpu-1", _train("hold-1", dataset=key))
        await _until(lambda: agent.runner.jobs["hold-1"].state == "running")

        # another train job, and a prescreen (it trains too), are refused, naming the holder
        for job_id, step in (("hold-2", "train"), ("screen-1", "prescreen")):
            cmd = msgspec.structs.replace(_train(job_id, dataset=key), step=step)
            with pytest.raises(RemoteError) as info:
                await daemon.dispatch.send("gpu-1", cmd)
            assert info.value.remote_code == "conflict"
            assert "busy" in info.value.message and "hold-1" in info.value.message
            assert job_id not in agent.runner.jobs
        # so is a calibration, which would measure the contention
        with pytest.raises(RemoteError) as info:
            await daemon.bus.request(subjects.agent_cmd("gpu-1", "calibrate"), Calibrate())
        assert info.value.remote_code == "conflict" and "hold-1" in info.value.message
        # other steps still share the host up to max_jobs
        other = RunStep(job_id="synth-1", run_id="r1", step="synthesize", args={})
        assert isinstance(await daemon.dispatch.send("gpu-1", other), Accepted)

        # telemetry names the holder; the daemon's offer says busy
        await _until(lambda: daemon.fleet.offer("gpu-1").busy)
        assert daemon.fleet.agents["gpu-1"].telemetry.training_jobs == ["hold-1"]

        await daemon.dispatch.cancel("gpu-1", "hold-1")
        held = agent.runner.jobs["hold-1"]
        # it trained until now; the child stops at its next step (seconds on a loaded host)
        await _until(lambda: held.state == "cancelled", 30)
        assert agent.runner.training_jobs() == []
        await _until(lambda: not daemon.fleet.offer("gpu-1").busy)
        # the devices are free again: the next training job is taken
        assert isinstance(await daemon.dispatch.send("gpu-1", _train("hold-3")), Accepted)
    finally:
        agent.stop()
        await asyncio.wait_for(task, 30)
