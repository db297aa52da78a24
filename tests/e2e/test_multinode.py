"""More than one server (train.nodes): group candidates in selection; two local agents train one
2-node job (c10d rendezvous the daemon arranges over the bus, gloo) with the loss curve of one
agent's 2-rank job; a node killed mid-training → the group restarts from the last checkpoint on
the survivor, the run's events say so, and the run completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from schemas import subjects
from schemas.commands import Accepted, RunStep, SubmitRun
from schemas.events import RunCompleted, RunFailed, RunProgress
from schemas.specs import ServerOffer
from stratosd.errors import ConfigError, Infeasible
from stratosd.groups import GroupJob, group_offers, nodes_asked, train_group
from stratosd.pipeline import StageRun
from stratosd.stages import STAGE_FUNCS
from stratosd.validate import spec_from_data
from tests.conftest import start_agent
from tests.daemon.test_resume import RunEvents
from tests.e2e.jobs import tiny_spec
from tests.plugins.test_distributed import write_dataset

PARAMS = {"max_steps": 8, "save_steps": 4, "per_device_train_batch_size": 8, "cpu_threads": 1,
          "learning_rate": 5e-3, "save_total_limit": 5}


# --- selection (fast) -------------------------------------------------------------------------

def _offer(i: int, region: str = "eu", price: float = 1.0, **kw: Any) -> ServerOffer:
    return ServerOffer(id=f"a{i}", agent_id=f"a{i}", region=region, cpu_count=4, ram_mib=8000,
                       price_usd_per_hour=price, **kw)


def test_nodes_are_read_from_the_train_table() -> None:
    assert nodes_asked({}) == (1, 1)
    assert nodes_asked({"nodes": 3}) == (3, 3)
    assert nodes_asked({"nodes": 3, "min_nodes": 2}) == (3, 2)
    for bad in ({"nodes": 0}, {"nodes": "2"}, {"nodes": 2, "min_nodes": 3}):
        with pytest.raises(ConfigError):
            nodes_asked(bad)


def test_a_group_is_one_candidate_of_one_region_and_kind() -> None:
    fleet = [_offer(1, price=2.0), _offer(2), _offer(3, region="us"), _offer(4, price=3.0),
             _offer(5, gpu_model="T4", gpu_count=1, gpu_mem_mib=16000)]
    [group] = group_offers(fleet, 2)
    # the two cheapest of the eu CPU servers, the cheaper one hosts the rendezvous
    assert group.members == ["a2", "a1"] and group.agent_id == "a2" and group.id == "a2+a1"
    assert group.price_usd_per_hour == 3.0 and group.region == "eu"
    # training is credited with both servers at the scaling efficiency of 2 ranks; the
    # phases that run on the head alone (probe, evaluation, deployment) are not
    from schemas.costs import JobWork
    from stratosd.costmodel import JobCosting
    from stratosd.costmodel.model import prior_scaling
    from stratosd.costmodel.work import ALL_DEVICES

    work = JobWork(params=1e6, trainable_params=1e6, trainer="full-sft", train_tokens=1e7,
                   train_steps=100, seq_tokens=100.0, hidden=64, layers=2,
                   devices=ALL_DEVICES)
    costing = JobCosting(work)
    single, pair = costing.columns([fleet[1], group]).hardware
    assert pair == pytest.approx(single * 2 * prior_scaling("cpu", 2))
    by_phase = {o.id: {p.name: p.seconds for p, _k, _c in costing.phase_seconds(o)}
                for o in (fleet[1], group)}
    assert by_phase[group.id]["evaluate"] == pytest.approx(by_phase["a2"]["evaluate"])
    assert by_phase[group.id]["train"] < by_phase["a2"]["train"]
    gpus = group_offers([_offer(i, gpu_model="T4", gpu_count=2, gpu_mem_mib=16000)
                         for i in range(3)], 3)
    assert gpus[0].gpu_count == 6 and gpus[0].hardware_score is None  # the cost model scales


def test_no_group_queues_when_busy_and_fails_when_the_fleet_is_too_small() -> None:
    with pytest.raises(Infeasible) as busy:
        group_offers([_offer(1), _offer(2, busy=True)], 2)
    assert busy.value.field == "constraints.busy"
    with pytest.raises(Infeasible) as small:
        group_offers([_offer(1), _offer(2, region="us")], 2)
    assert small.value.field == "train.nodes"


def test_each_member_launches_torchrun_with_elastic_c10d_rendezvous() -> None:
    from plugins.trainers.distributed import Rendezvous, torchrun_argv

    host = Rendezvous.from_args({"node_rank": 0, "nnodes": 3, "min_nodes": 2, "rdzv_id": "r-1",
                                 "host": "10.0.0.5", "is_host": True, "local_addr": "10.0.0.5"})
    with pytest.raises(ConfigError, match="not known yet"):
        host.argv()  # the host picks its port first
    argv = torchrun_argv(2, Path("spec.json"), host.with_port(29511))
    assert "--standalone" not in argv and "--nproc-per-node=2" in argv
    for arg in ("--nnodes=2:3", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.5:29511",
                "--rdzv-id=r-1", "--local-addr=10.0.0.5", "--max-restarts=0"):
        assert arg in argv, argv
    conf = next(a for a in argv if a.startswith("--rdzv-conf="))
    assert "is_host=1" in conf and "last_call_timeout=" in conf
    member = Rendezvous.from_args({"node_rank": 1, "nnodes": 3, "rdzv_id": "r-1",
                                   "host": "10.0.0.5", "endpoint": "10.0.0.5:29511"})
    assert "is_host=0" in " ".join(member.argv()) and member.min_nodes == 3
    with pytest.raises(ConfigError):
        Rendezvous.from_args({"node_rank": 3, "nnodes": 3, "rdzv_id": "r", "host": "h"})


# --- two local agents (slow) ------------------------------------------------------------------

@pytest.fixture
async def agent2(nats_url: str, tmp_path: Path, daemon: Any, agent: Any
                 ) -> AsyncIterator[tuple[Any, asyncio.Task[None]]]:
    """A second agent gpu-2 beside the conftest's gpu-1 (same price: gpu-1 hosts)."""
    a, task = await start_agent(nats_url, tmp_path, "gpu-2", price=2.0)
    await _until(lambda: daemon.fleet.is_up("gpu-2") and daemon.fleet.is_up("gpu-1"), 20)
    try:
        yield a, task
    finally:
        a.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def _until(pred: Any, timeout: float = 60.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.1)

    await asyncio.wait_for(loop(), timeout)


def _curve(result: dict[str, Any]) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in result["loss_history"]}


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_two_agents_train_one_job_like_two_ranks_on_one(
        daemon: Any, agent: Any, agent2: Any, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d.jsonl")
    args = {"model": "config:tiny", "trainer": "full-sft", "seed": 7}
    # one agent, 2 ranks
    key = await daemon.bus.put_artifact("r1/data.jsonl", data)
    one = RunStep(job_id="one-agent", run_id="r1", step="train", inputs={"dataset": key},
                  args={**args, "params": {**PARAMS, "ranks": 2}})
    assert isinstance(await daemon.dispatch.send("gpu-1", one), Accepted)
    single = await daemon.dispatch.wait("one-agent", timeout=300)
    assert single.state == "completed", single.error
    # two agents, 1 rank each, rendezvous arranged by the daemon
    key2 = await daemon.bus.put_artifact("r2/data.jsonl", data)
    said: list[str] = []

    async def say(message: str) -> None:
        said.append(message)

    job = GroupJob(run_id="r2", attempt=1, members=["gpu-1", "gpu-2"], min_nodes=2,
                   args={**args, "params": dict(PARAMS)}, inputs={"dataset": key2},
                   dispatch=daemon.dispatch, fleet=daemon.fleet, bus=daemon.bus, say=say,
                   resume_key="r2/train-checkpoint.tar")
    group = await asyncio.wait_for(train_group(job), 300)
    res = group.result
    assert res["nodes"] == 2 and res["world_size"] == 2 and res["steps"] == PARAMS["max_steps"]
    assert res["node_restarts"] == [] and not said
    a, b = _curve(single.result), _curve(res)
    assert sorted(a) == sorted(b) == list(range(1, PARAMS["max_steps"] + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a, b)
    assert res["final_loss"] == pytest.approx(single.result["final_loss"], rel=2e-3)
    # rank 0's node wrote the model and the checkpoints; the other completed without a model
    assert "model.tar" in group.artifacts and await daemon.bus.has_artifact(
        "r2/train-checkpoint.tar")
    other = next(m for m in ("gpu-1", "gpu-2") if m != res["writer"])
    other_job = f"r2-train-1-g0n{['gpu-1', 'gpu-2'].index(other)}"
    other_out = daemon.dispatch.outcomes[other_job]
    assert other_out.result["model_writer"] is False and "model.tar" not in other_out.artifacts
    print(f"\n1 agent x 2 ranks: final loss {single.result['final_loss']:.5f} in "
          f"{single.result['train_time_s']}s; 2 agents x 1 rank: {res['final_loss']:.5f} in "
          f"{res['train_time_s']}s (writer {res['writer']})")


def _kill_job_tree(agent: Any) -> int:
    """SIGKILL a training job's whole process tree at once (its host died): the step, torchrun
    (its own session) and the ranks."""
    job = next(j for j in agent.runner.jobs.values() if j.state == "running")
    root = psutil.Process(job.proc.pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            os.kill(p.pid, signal.SIGKILL)
    return len(procs)


def _stub(result: dict[str, Any]) -> Any:
    async def stage(_ctx: StageRun) -> dict[str, Any]:
        return result
    return stage


@pytest.mark.slow
@pytest.mark.timeout(500)
async def test_a_killed_node_restarts_the_group_from_the_last_checkpoint(
        daemon: Any, agent: Any, agent2: Any, tmp_path: Path) -> None:
    """The real select_server (a group of both agents) and train stages; the stages around
    them are stubs (their own tests run them)."""
    gpu2, gpu2_task = agent2
    data = write_dataset(tmp_path / "d.jsonl")

    async def synthesize(ctx: StageRun) -> dict[str, Any]:
        return {"artifact": await daemon.bus.put_artifact(f"{ctx.run_id}/data.jsonl", data)}

    teacher = {"backend": "reference", "model": "reference", "name": "oracle"}
    daemon.pipeline.stages = {
        **STAGE_FUNCS,
        "probe_teachers": _stub({}),
        "select_student": _stub({"chosen": "config:tiny"}),
        "choose_strategy": _stub({"mode": "injection", "teacher": "oracle",
                                        "teacher_spec": teacher, "teacher_accuracy": 1.0,
                                        "threshold": 0.5}),
        "synthesize": synthesize,
        "evaluate": _stub({}), "deploy": _stub({"skipped": True}),
        "report": _stub({}),
    }
    daemon.pipeline.retries = 0  # the group's own restart must carry the run
    spec = spec_from_data(tiny_spec("multinode", trainer="full-sft", constraints={}, train={
        **PARAMS, "max_steps": 24, "save_steps": 4, "nodes": 2, "min_nodes": 1}))
    run_id = (await daemon.bus.request(subjects.daemon_cmd("submit"), SubmitRun(spec=spec))).ref
    events = RunEvents()
    await daemon.bus.js.subscribe(subjects.run_events(run_id), cb=events.cb,
                                  ordered_consumer=True, stream=subjects.EVENTS_STREAM)
    ckpt = f"{run_id}/train-checkpoint.tar"

    async def checkpointed() -> None:
        while not await daemon.bus.has_artifact(ckpt):
            await asyncio.sleep(0.2)

    await asyncio.wait_for(checkpointed(), 300)  # both nodes train; rank 0 saved step 4
    run = await daemon.store.get(run_id)
    chosen = run.results["select_server"]["selection"]["chosen"]
    assert chosen["members"] == ["gpu-1", "gpu-2"] and chosen["price_usd_per_hour"] == 4.0
    assert _kill_job_tree(gpu2) >= 3  # gpu-2's host dies: its step, torchrun and rank
    gpu2.stop()
    await asyncio.wait_for(gpu2_task, 30)
    await events.until(lambda: bool(events.of(RunCompleted) or events.of(RunFailed)), 400)
    assert events.of(RunCompleted), events.of(RunFailed)
    lost = [e.message for e in events.of(RunProgress) if "node(s) lost" in e.message]
    assert len(lost) == 1 and lost[0].startswith("node(s) lost: gpu-2") \
        and "from the last checkpoint on 1 node(s): gpu-1" in lost[0], lost
    result = (await daemon.store.get(run_id)).results["train"]
    assert result["steps"] == 24 and result["nodes"] == 1 and result["writer"] == "gpu-1"
    assert result["resumed_from"] and result["artifact"]
    assert result["node_restarts"][0]["lost"] == ["gpu-2"]
    resumed_at = min(step for step, _loss in result["loss_history"]) - 1  # new steps only
    assert 4 <= resumed_at < 24 and resumed_at % 4 == 0  # a checkpoint rank 0 uploaded
    print(f"\nnode gpu-2 killed; resumed from step {resumed_at} on gpu-1: {lost[0][:160]}")
