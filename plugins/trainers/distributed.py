"""Every device of one server: one rank per device, launched by torchrun (torch.distributed.run).

The train step runs a trainer in-process when it trains on one rank (the path it always had);
with more ranks, or when the student only fits sharded, it launches
`python -m torch.distributed.run --standalone --nproc-per-node N -m plugins.trainers.rank SPEC`
as its own child (same process group: the agent's cancel reaches every rank). transformers and
accelerate take the ranks from torchrun's environment: DDP, or FSDP2 (`strategy = "fsdp"`), with
NCCL on GPUs and gloo on CPU, so the tests run the very path a GPU server does.

Semantics that keep a job's results independent of the hardware it lands on:

- **The global batch is the job's**: `per_device_train_batch_size x gradient_accumulation_steps`
  as written (the one-rank figures); N ranks split it (`split_batch`). Same global batch, same
  sampler seed → the same examples in each optimizer step, so 2 ranks follow 1 rank's loss
  curve and a checkpoint resumes on any world size at the same point of the data order.
- **Checkpoints say how they were written** (`stratos_world.json`); `prepare_resume` adds the
  per-rank RNG files another world size looks for.
- **Stopping is collective**: a rank stops when any rank was asked (an all-reduce per step), so
  no rank waits forever in a collective its peers left.

Rank 0 reports progress and checkpoints through a JSON-lines file the launcher forwards to the
step context; each rank writes its result or error to a file the launcher reads back.

**More than one server** (`Rendezvous`, from the daemon's `stratosd.groups`): every member agent
runs this launcher with `--nnodes MIN:MAX --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--rdzv-id ID`; the rendezvous host's launcher serves the c10d store (`is_host=1`) on a port it
picked and reported to the daemon. Global rank 0 lands on whichever node the rendezvous sorts
first: that node's launcher gets rank 0's events (checkpoints, progress) and its result; the
others return their own rank's result marked `model_writer = False` and write no model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from stratosd.api import TrainContext
from stratosd.errors import ConfigError, JobFailed, OutOfMemory, StratosError

log = structlog.stdlib.get_logger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")
WORLD_FILE = "stratos_world.json"  # in every checkpoint: the world size and batch split
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"
POLL_S = 0.2
TERM_GRACE_S = 60.0


@dataclass(frozen=True)
class LaunchPlan:
    """How a training job runs: how many ranks, and whether replicated or sharded."""

    ranks: int  # on this server (torchrun's --nproc-per-node)
    strategy: str  # "single" (in-process), "ddp" or "fsdp" (under torchrun)
    reason: str = ""
    nodes: int = 1  # servers of the group (each runs `ranks` ranks)

    @property
    def world(self) -> int:
        """Ranks of the whole job (every node's)."""
        return self.ranks * self.nodes

    @property
    def launched(self) -> bool:
        """True when torchrun starts the ranks (False: the trainer runs in-process)."""
        return self.strategy != "single"


def device_count() -> int:
    """Devices one rank each can use: the visible CUDA devices (the agent reserved them), 0 on
    CPU-only hosts."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def world_size() -> int:
    """Ranks of the job this process belongs to (torchrun's WORLD_SIZE; 1 in-process)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        return 1


def split_batch(per_device: int, accum: int, ranks: int) -> tuple[int, int] | None:
    """(per-rank micro-batch, accumulation) whose product x ranks is per_device x accum;
    None when the global batch does not divide among the ranks."""
    total = per_device * accum
    if ranks < 1 or total % ranks:
        return None
    share = total // ranks
    if per_device % ranks == 0:  # keep accumulation, shrink the micro-batch
        return per_device // ranks, accum
    if accum % ranks == 0:
        return per_device, accum // ranks
    micro = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return micro, share // micro


def plan_launch(params: Mapping[str, Any], *, devices: int | None = None,
                supports_ranks: bool = True, supports_fsdp: bool = True,
                world: Mapping[str, Any] | None = None, fits_one_device: bool | None = None
                ) -> LaunchPlan:
    """The launch for a job's params (`ranks`: 0 = every device, `strategy`), the devices the
    agent holds, the checkpoint it resumes (`world`: its stratos_world.json) and whether one
    replica of the training state fits a device (None: unknown; False makes "auto" shard)."""
    devices = device_count() if devices is None else devices
    asked = params.get("ranks", 0)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise ConfigError(f"training param 'ranks' must be an integer >= 0, got {asked!r}",
                          hint="0 uses every device of the server, N launches N ranks",
                          field="train.ranks")
    strategy = str(params.get("strategy") or "auto")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown training strategy {strategy!r}",
                          hint=f"one of {', '.join(STRATEGIES)}", field="train.strategy")
    if devices and asked > devices:
        raise ConfigError(f"ranks = {asked} but this server has {devices} device(s)",
                          hint="ask for at most as many ranks as the server has devices, or 0 "
                          "for all of them", field="train.ranks")
    ranks = asked or max(devices, 1)
    reason = f"{ranks} rank(s) on {devices or 'no'} GPU(s)" + ("" if asked else " (all)")
    pd, ga = params.get("per_device_train_batch_size"), params.get("gradient_accumulation_steps")
    batch = (pd if isinstance(pd, int) else 0) * (ga if isinstance(ga, int) else 1)
    if not asked and batch > 0 and batch % ranks:  # every device unless the batch won't split
        ranks = max(n for n in range(1, ranks + 1) if batch % n == 0)
        reason = f"{ranks} of {devices} GPU(s): the ranks split the global batch {batch}"
    if world and world.get("strategy") == "fsdp" and strategy != "fsdp":
        strategy, reason = "fsdp", reason + "; the checkpoint was written sharded (fsdp)"
    if strategy == "auto" and fits_one_device is False and ranks > 1:
        strategy, reason = "fsdp", reason + "; one replica does not fit a device: sharded"
    if strategy == "fsdp" and not devices:
        raise ConfigError(
            "strategy fsdp needs GPUs: accelerate (which transformers' Trainer drives) turns "
            "FSDP on only for multi-GPU/accelerator process groups; on CPU (gloo, MULTI_CPU) "
            "it ignores the FSDP plugin and would silently train unsharded replicas",
            hint="use strategy ddp (or auto) on CPU hosts; shard on a GPU server",
            field="train.strategy")
    if strategy == "fsdp" and not supports_fsdp:
        raise ConfigError("this trainer does not shard its training state (fsdp)",
                          hint="use strategy ddp, or full-sft for a sharded full fine-tune",
                          field="train.strategy")
    if not supports_ranks and (ranks > 1 or strategy == "fsdp"):
        if asked > 1 or strategy == "fsdp":
            raise ConfigError("this trainer runs on one device only",
                              hint="drop ranks/strategy, or use lora-sft or full-sft",
                              field="train.ranks")
        ranks, reason = 1, "this trainer runs on one device"
    # one rank trains in-process unless a strategy was asked for (then torchrun starts it)
    kind = "fsdp" if strategy == "fsdp" else \
        ("single" if ranks == 1 and strategy == "auto" else "ddp")
    return LaunchPlan(ranks=ranks, strategy=kind, reason=reason)


def rank_batch(per_device: int, accum: int) -> tuple[int, int]:
    """This rank's (micro-batch, accumulation): the job's global batch split over the world."""
    n = world_size()
    split = split_batch(per_device, accum, n)
    if split is None:
        raise ConfigError(
            f"the global batch {per_device * accum} (per_device_train_batch_size x "
            f"gradient_accumulation_steps) does not divide among {n} ranks",
            hint="make the batch a multiple of the rank count, or set ranks to one that "
            "divides it", field="train.ranks")
    return split


def rank_params(params: Mapping[str, Any], plan: LaunchPlan) -> dict[str, Any]:
    """The trainer params each rank gets (the batch stays the job's global one: each rank
    splits it in hparams.resolve_params)."""
    return {**params, "ranks": plan.ranks, "strategy": plan.strategy}


# --- checkpoints ------------------------------------------------------------------------------

def world_record(plan: LaunchPlan, world: int | None = None) -> dict[str, Any]:
    """What stratos_world.json says about a checkpoint: the world that wrote it (`world`: the
    ranks that actually trained, when an elastic group started with fewer than planned)."""
    record: dict[str, Any] = {"world_size": world or plan.world, "strategy": plan.strategy}
    if plan.nodes > 1:
        record["nodes"] = plan.nodes
    return record


def write_world(checkpoint: Path, plan: LaunchPlan, world: int | None = None) -> None:
    """Record the world a checkpoint was written by (before it is uploaded)."""
    if checkpoint.is_dir():
        (checkpoint / WORLD_FILE).write_text(json.dumps(world_record(plan, world), indent=2))


def read_world(resume_from: Path | None) -> dict[str, Any] | None:
    """The world record of the checkpoint a resume will load (None: none, or written before
    the record existed)."""
    from plugins.trainers.common import checkpoint_to_resume

    found = checkpoint_to_resume(resume_from)
    if found is None:
        return None
    path = Path(found) / WORLD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if isinstance(record, dict) else None


def prepare_resume(resume_from: Path | None, world_size: int) -> None:
    """Give every rank of the new world the RNG state file transformers looks for: one process
    reads rng_state.pth, rank i of several rng_state_{i}.pth (copied from rank 0's)."""
    from plugins.trainers.common import checkpoint_to_resume

    found = checkpoint_to_resume(resume_from)
    if found is None:
        return
    ckpt = Path(found)
    source = next((p for p in (ckpt / "rng_state_0.pth", ckpt / "rng_state.pth") if p.is_file()),
                  None)
    if source is None:
        return
    wanted = ["rng_state.pth"] if world_size == 1 else \
        [f"rng_state_{i}.pth" for i in range(world_size)]
    for name in wanted:
        if not (ckpt / name).is_file():
            shutil.copyfile(source, ckpt / name)
            log.info("rng_state_adapted", checkpoint=str(ckpt), file=name, source=source.name)


# --- more than one server ---------------------------------------------------------------------

JOIN_TIMEOUT_S = 600.0  # how long a node waits for the group's first MIN nodes
LAST_CALL_S = 60.0  # once MIN nodes are in, how long the rendezvous waits for up to MAX


@dataclass(frozen=True)
class Rendezvous:
    """This node's part in a multi-server job (the train step's `group` argument).

    `endpoint` is HOST:PORT of the c10d store; the rendezvous host gets only `host` and picks
    the port (`free_port`), which it reports to the daemon before it launches."""

    node_rank: int
    nnodes: int
    min_nodes: int
    rdzv_id: str
    host: str
    endpoint: str = ""  # "" on the rendezvous host until it picked its port
    is_host: bool = False
    local_addr: str = ""  # this node's address for the ranks' store ("": its hostname)

    @classmethod
    def from_args(cls, group: Mapping[str, Any]) -> Rendezvous:
        """Validate the daemon's `group` argument (ConfigError naming the field)."""
        def num(name: str, low: int) -> int:
            value = group.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"group.{name} must be an integer >= {low}, got {value!r}",
                                  hint="the daemon writes `group`; resubmit the run",
                                  field=f"args.group.{name}")
            return value

        nnodes, rank = num("nnodes", 1), num("node_rank", 0)
        min_nodes = num("min_nodes", 1) if "min_nodes" in group else nnodes
        rdzv_id, host = str(group.get("rdzv_id") or ""), str(group.get("host") or "")
        if rank >= nnodes or min_nodes > nnodes or not rdzv_id or not host:
            raise ConfigError(f"inconsistent group {dict(group)!r}",
                              hint="node_rank < nnodes, min_nodes <= nnodes, rdzv_id and host "
                              "set", field="args.group")
        return cls(node_rank=rank, nnodes=nnodes, min_nodes=min_nodes, rdzv_id=rdzv_id,
                   host=host, endpoint=str(group.get("endpoint") or ""),
                   is_host=bool(group.get("is_host", rank == 0)),
                   local_addr=str(group.get("local_addr") or ""))

    def with_port(self, port: int) -> Rendezvous:
        """The host's rendezvous once it picked its port."""
        return Rendezvous(**{**asdict(self), "endpoint": f"{self.host}:{port}"})

    def argv(self) -> list[str]:
        """torchrun's multi-node arguments: elastic MIN:MAX nodes, c10d rendezvous."""
        if not self.endpoint:
            raise ConfigError("the group's rendezvous endpoint is not known yet",
                              hint="the rendezvous host picks it (with_port) before launching",
                              field="args.group.endpoint")
        conf = f"is_host={int(self.is_host)},join_timeout={JOIN_TIMEOUT_S:g}," \
               f"last_call_timeout={LAST_CALL_S:g}"
        out = [f"--nnodes={self.min_nodes}:{self.nnodes}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.rdzv_id}",
               f"--rdzv-conf={conf}"]
        return out + ([f"--local-addr={self.local_addr}"] if self.local_addr else [])


def free_port(host: str) -> int:
    """A TCP port free on host now (the c10d store binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- the launcher -----------------------------------------------------------------------------

def torchrun_argv(ranks: int, spec: Path, rdzv: Rendezvous | None = None) -> list[str]:
    """The torchrun command line: standalone on one host, or a group's c10d rendezvous. No
    restarts inside torchrun: a failed rank fails the job, and the daemon resumes it from the
    last checkpoint (on a group's survivors or a replacement: only rank 0's node holds the
    checkpoints, so an in-place restart on the others would have nothing to load)."""
    where = rdzv.argv() if rdzv is not None else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where,
            f"--nproc-per-node={ranks}", "--max-restarts=0", "--monitor-interval=0.2",
            "-m", "plugins.trainers.rank", str(spec)]


def rank_env(threads: int) -> dict[str, str]:
    """The ranks' environment: each rank's CPU threads (torchrun would force 1 and warn)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads if threads > 0 else max((os.cpu_count() or 1), 1))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(trainer: str, ctx: TrainContext, plan: LaunchPlan, *,
           task: Mapping[str, Any] | None = None, threads: int = 0,
           run_dir: Path | None = None, rdzv: Rendezvous | None = None) -> dict[str, Any]:
    """Train with `plan.ranks` ranks under torchrun (on each of a group's nodes with rdzv);
    progress and checkpoints reach ctx; returns rank 0's metrics, or on a group node without
    rank 0 its first rank's, marked model_writer = False. Raises the first failed rank's
    error, typed as it was."""
    run_dir = run_dir or ctx.checkpoint_dir.parent / "launch"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {
        "trainer": trainer, "model": ctx.model, "train_file": str(ctx.train_file),
        "out_dir": str(ctx.out_dir), "checkpoint_dir": str(ctx.checkpoint_dir),
        "params": rank_params(ctx.params, plan), "task": dict(task) if task else None,
        "resume_from": str(ctx.resume_from) if ctx.resume_from else None, "seed": ctx.seed,
        "plan": asdict(plan), "run_dir": str(run_dir), "launcher_pid": os.getpid(),
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    prepare_resume(ctx.resume_from, plan.world)
    log.info("ranks_launching", trainer=trainer, ranks=plan.ranks, strategy=plan.strategy,
             reason=plan.reason, nodes=plan.nodes,
             rdzv_endpoint=rdzv.endpoint if rdzv else None)
    t0 = time.monotonic()
    # Its own session: a cancel reaches this process (ctx.should_stop), which asks the ranks to
    # stop together; a signal to every rank at once would let torchrun kill them mid-save.
    # Ranks also stop when this process is gone (rank.RankIO.should_stop).
    proc = subprocess.Popen(torchrun_argv(plan.ranks, spec_path, rdzv),
                            env=rank_env(threads), stdin=subprocess.DEVNULL,
                            start_new_session=True)
    events = _EventReader(run_dir / EVENTS_FILE, ctx)
    stop_sent = 0.0
    try:
        while proc.poll() is None:
            events.forward()
            if ctx.should_stop() and not stop_sent:
                (run_dir / STOP_FILE).touch()  # the ranks agree on the step, save, and leave
                stop_sent = time.monotonic()
            if stop_sent and time.monotonic() - stop_sent > TERM_GRACE_S:
                proc.terminate()
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # an exception here: never leave ranks behind
            proc.terminate()
            try:
                proc.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
    events.forward()
    result_path = run_dir / "result.json"
    others = sorted(run_dir.glob("result-*.json"))  # a group node without rank 0
    if proc.returncode == 0 and (result_path.is_file() or others):
        writer = result_path.is_file()
        metrics: dict[str, Any] = json.loads((result_path if writer else others[0]).read_text())
        metrics.update(ranks=plan.ranks, strategy=plan.strategy,
                       launch_wall_s=round(time.monotonic() - t0, 3))
        if rdzv is not None:
            metrics.update(nodes=plan.nodes, node_rank=rdzv.node_rank, model_writer=writer)
        return metrics
    raise rank_error(run_dir, proc.returncode, plan.world)


class _EventReader:
    """Forwards rank 0's progress and checkpoint lines to the step context."""

    def __init__(self, path: Path, ctx: TrainContext) -> None:
        self.path = path
        self.ctx = ctx
        self.offset = 0

    def forward(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            kind = line.pop("kind", "")
            if kind == "progress":
                self.ctx.progress(**line)
            elif kind == "checkpoint":
                self.ctx.checkpoint(Path(line["path"]))


def rank_error(run_dir: Path, returncode: int, ranks: int) -> StratosError:
    """The error of a failed launch: the first rank's own error (OOM keeps its detail)."""
    def rank_of(path: Path) -> int:
        tail = path.stem.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else 1 << 30

    # this node's ranks only (a group's other nodes report through their own jobs)
    errors = [json.loads(p.read_text()) for p in sorted(run_dir.glob("error-*.json"),
                                                         key=rank_of)]
    if not errors:
        return JobFailed(f"torchrun exited with code {returncode} and no rank reported an error",
                         hint="see the job log for the ranks' output")
    # a rank's own failure beats the collective errors its peers saw when it left
    err = next((e for e in errors if e.get("code") != "job_failed"), errors[0])
    code, message, hint = str(err.get("code")), str(err.get("message")), str(err.get("hint"))
    if code == OutOfMemory.code:
        detail = dict(err.get("detail") or {})
        if isinstance(detail.get("per_device_train_batch_size"), int):
            # in the job's terms: its global batch (the daemon degrades from these)
            detail["per_device_train_batch_size"] *= ranks
            detail["ranks"] = ranks
        return OutOfMemory(message, hint=hint, detail=detail)
    if code == ConfigError.code:
        return ConfigError(message, hint=hint, field=err.get("field"))
    return JobFailed(f"rank {err.get('rank', '?')} of {ranks} failed: {message}",
                     hint=hint or "see the job log", child_code=code)
