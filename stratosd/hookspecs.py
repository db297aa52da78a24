"""Every hook a Stratos plugin can implement. These docstrings are the plugin documentation.

Implement with `from stratosd import hookimpl` and expose the module through the
`[project.entry-points.stratos]` group. Hooks are synchronous and cheap: registration hooks
return classes; the work happens in those classes' methods.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from stratosd import hookspec

if TYPE_CHECKING:
    from schemas.specs import ServerOffer, StudentCandidate, TaskSpec, TeacherScore
    from stratosd.api import (
        Aggregator,
        DaemonAPI,
        Deployer,
        DistillationMode,
        OfferCatalog,
        PeriodicJob,
        ServerSelector,
        TaskPack,
        TeacherBackend,
        Trainer,
    )


@hookspec(historic=True)
def stratos_configure(config: Any) -> None:
    """Receive the loaded StratosConfig once at startup (also for plugins registered later)."""


@hookspec
def stratos_server_selectors() -> list[type[ServerSelector]]:
    """Return ServerSelector classes (e.g. `pfg`, `cost-first`); `name` must be unique."""


@hookspec
def stratos_teacher_backends() -> list[type[TeacherBackend]]:
    """Return TeacherBackend classes (e.g. `openai`, `hf`, `vllm`, `reference`)."""


@hookspec
def stratos_offer_catalogs() -> list[type[OfferCatalog]]:
    """Return OfferCatalog classes: servers that can be planned for before any agent runs."""


@hookspec
def stratos_student_candidates(task: TaskSpec, offer: ServerOffer) -> list[StudentCandidate]:
    """Return extra student candidates for a task on a server (added to the job's own)."""


@hookspec
def stratos_distillation_modes() -> list[type[DistillationMode]]:
    """Return DistillationMode classes (e.g. `alignment`, `injection`, `hybrid`)."""


@hookspec
def stratos_trainers() -> list[type[Trainer]]:
    """Return Trainer classes (e.g. `lora-sft`, `full-sft`, `grpo`); used on agents."""


@hookspec
def stratos_deployers() -> list[type[Deployer]]:
    """Return Deployer classes (e.g. `vllm`, `builtin`); used on agents."""


@hookspec
def stratos_tasks() -> list[type[TaskPack]]:
    """Return TaskPack classes (e.g. `mahjong-winning-tiles`, `gsm8k`, `jsonl-qa`)."""


@hookspec(firstresult=True)
def stratos_choose_mode(task: TaskSpec, teacher: TeacherScore, threshold: float) -> str | None:
    """Name the distillation mode for a task given the best teacher's probe score, or None
    to let the next plugin decide. The built-in policy (trylast) compares accuracy to
    threshold: at or above → `alignment`, below → `injection`."""


@hookspec
def stratos_periodic_jobs(config: Any) -> list[PeriodicJob]:
    """Return PeriodicJob entries the daemon's scheduler runs (id, coroutine, interval)."""


@hookspec
def stratos_startup(daemon: DaemonAPI) -> Awaitable[None] | None:
    """Called once the daemon is connected; may return an awaitable."""


@hookspec
def stratos_on_event(event: Any) -> Awaitable[None] | None:
    """Observe every event the daemon publishes or receives; failures are logged, ignored."""


@hookspec
def stratos_shutdown(daemon: DaemonAPI) -> Awaitable[None] | None:
    """Called at daemon shutdown, before the bus is drained."""


@hookspec
def stratos_aggregators() -> list[type[Aggregator]]:
    """Return Aggregator classes: rules that mix tenants' adapter updates by similarity
    (e.g. `acme-top-rank`, `lora-product-average`); used by the daemon's tenants jobs."""
