"""PluginManager factory and the typed facade the daemon, agents and CLI use to call hooks.

Loading order: BUILTIN_PLUGINS → `stratos` entry points (unless STRATOS_NO_PLUGIN_AUTOLOAD=1)
→ names blocked by STRATOS_DISABLE_PLUGINS (comma-separated) → check_pending().
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy
import structlog

from schemas.commands import PluginInfo
from stratosd import PROJECT, __version__, hookspecs
from stratosd.errors import ConfigError, PluginError
from stratosd.registry import Registry

if TYPE_CHECKING:
    from schemas.specs import ServerOffer, StudentCandidate, TaskSpec, TeacherScore
    from stratosd.api import (
        Aggregator,
        Deployer,
        DistillationMode,
        OfferCatalog,
        PeriodicJob,
        ServerSelector,
        TaskPack,
        TeacherBackend,
        Trainer,
    )
    from stratosd.offers import OfferTable

log = structlog.stdlib.get_logger(__name__)

BUILTIN_PLUGINS: tuple[str, ...] = (
    "plugins.selectors.pfg",
    "plugins.selectors.baselines",
    "plugins.catalogs.static",
    "plugins.tasks.jsonl_qa",
    "plugins.tasks.mahjong",
    "plugins.tasks.gsm8k",
    "plugins.teachers.openai_api",
    "plugins.teachers.hf_local",
    "plugins.teachers.vllm",
    "plugins.teachers.reference",
    "plugins.students.candidates",
    "plugins.modes.alignment",
    "plugins.modes.injection",
    "plugins.modes.hybrid",
    "plugins.modes.policy",
    "plugins.trainers.lora_sft",
    "plugins.trainers.sft",
    "plugins.trainers.grpo",
    "plugins.deployers.http_builtin",
    "plugins.deployers.vllm",
    "plugins.deployers.multi_adapter",
    "plugins.aggregators.builtin",
)

T = TypeVar("T")
CATALOG_MAX_AGE_S = 60.0  # catalogs change slowly; a plan need not re-read them


def make_plugin_manager(
    builtins: tuple[str, ...] = BUILTIN_PLUGINS,
    *,
    autoload: bool | None = None,
    disabled: list[str] | None = None,
    extra: list[object] | None = None,
) -> pluggy.PluginManager:
    """Build the PluginManager: built-ins, entry points, blocked names, pending check."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if disabled is None:
        disabled = [
            n.strip()
            for n in os.environ.get("STRATOS_DISABLE_PLUGINS", "").split(",")
            if n.strip()
        ]
    for name in disabled:
        pm.set_blocked(name)
    for modname in builtins:
        if pm.is_blocked(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            raise PluginError(modname, "import", str(exc), hint="reinstall stratos") from exc
        pm.register(module, name=modname)
    for plugin in extra or []:
        pm.register(plugin)
    if autoload is None:
        autoload = os.environ.get("STRATOS_NO_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")
    if autoload:
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must say which
            raise PluginError(
                "entry-point",
                "load",
                repr(exc),
                hint="uninstall the broken plugin or name it in STRATOS_DISABLE_PLUGINS",
            ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc.plugin), "check_pending", str(exc)) from exc
    return pm


class Plugins:
    """Typed facade over the hooks. Registries are collected once, on first use."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else make_plugin_manager()
        self._catalog_table: tuple[float, OfferTable] | None = None

    def _collect(self, hook_name: str, kind: str, **kwargs: Any) -> Registry[Any]:
        registry: Registry[Any] = Registry(kind)
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            try:
                classes = impl.function(**kwargs)
            except Exception as exc:  # noqa: BLE001 - name the plugin that broke
                raise PluginError(impl.plugin_name, hook_name, repr(exc)) from exc
            registry.extend(classes or [], impl.plugin_name)
        return registry

    @cached_property
    def selectors(self) -> Registry[ServerSelector]:
        """Server selectors by name."""
        return self._collect("stratos_server_selectors", "selector")

    @cached_property
    def teachers(self) -> Registry[TeacherBackend]:
        """Teacher backends by name."""
        return self._collect("stratos_teacher_backends", "teacher backend")

    @cached_property
    def catalogs(self) -> Registry[OfferCatalog]:
        """Offer catalogs by name."""
        return self._collect("stratos_offer_catalogs", "offer catalog")

    @cached_property
    def modes(self) -> Registry[DistillationMode]:
        """Distillation modes by name."""
        return self._collect("stratos_distillation_modes", "mode")

    @cached_property
    def trainers(self) -> Registry[Trainer]:
        """Trainers by name."""
        return self._collect("stratos_trainers", "trainer")

    @cached_property
    def deployers(self) -> Registry[Deployer]:
        """Deployers by name."""
        return self._collect("stratos_deployers", "deployer")

    @cached_property
    def tasks(self) -> Registry[TaskPack]:
        """Task packs by name."""
        return self._collect("stratos_tasks", "task")

    @cached_property
    def aggregators(self) -> Registry[Aggregator]:
        """Tenant aggregation rules by name."""
        return self._collect("stratos_aggregators", "aggregator")

    def catalog_offers(self) -> list[ServerOffer]:
        """Every offer from every catalog plugin."""
        return [o for name in self.catalogs.names() for o in self.catalogs.get(name)().offers()]

    def catalog_table(self, max_age_s: float = CATALOG_MAX_AGE_S) -> OfferTable:
        """The catalogs' offers in columnar form, rebuilt at most every max_age_s (a catalog
        of a million offers is read once, not per plan)."""
        from stratosd.offers import OfferTable  # numpy: not on stratosctl's start-up path

        now = time.monotonic()
        got = self._catalog_table
        if got is None or now - got[0] > max_age_s:
            got = self._catalog_table = (now, OfferTable.from_offers(self.catalog_offers()))
        return got[1]

    def task(self, name: str, params: dict[str, Any] | None = None) -> TaskPack:
        """Instantiate a task pack with its params."""
        return self.tasks.get(name)(params or {})

    def configure(self, config: Any) -> None:
        """Call the historic stratos_configure hook."""
        self.pm.hook.stratos_configure.call_historic(kwargs={"config": config})

    def choose_mode(self, task: TaskSpec, teacher: TeacherScore, threshold: float) -> str:
        """The first plugin's answer to stratos_choose_mode (the built-in policy is last)."""
        try:
            mode = self.pm.hook.stratos_choose_mode(
                task=task, teacher=teacher, threshold=threshold
            )
        except Exception as exc:  # noqa: BLE001
            raise PluginError("?", "stratos_choose_mode", repr(exc)) from exc
        if not mode:
            raise ConfigError("no plugin chose a distillation mode", hint="set `mode` in the job")
        return str(mode)

    def student_candidates(self, task: TaskSpec, offer: ServerOffer) -> list[StudentCandidate]:
        """Extra student candidates from plugins."""
        out: list[StudentCandidate] = []
        for impl in self.pm.hook.stratos_student_candidates.get_hookimpls():
            try:
                out.extend(cast("list[StudentCandidate]",
                                impl.function(task=task, offer=offer) or []))
            except Exception as exc:  # noqa: BLE001
                raise PluginError(
                    impl.plugin_name, "stratos_student_candidates", repr(exc)
                ) from exc
        return out

    def periodic_jobs(self, config: Any) -> list[PeriodicJob]:
        """Periodic jobs from every plugin."""
        jobs: list[PeriodicJob] = []
        for impl in self.pm.hook.stratos_periodic_jobs.get_hookimpls():
            try:
                jobs.extend(cast("list[PeriodicJob]", impl.function(config=config) or []))
            except Exception as exc:  # noqa: BLE001
                raise PluginError(impl.plugin_name, "stratos_periodic_jobs", repr(exc)) from exc
        return jobs

    async def _observe(self, hook_name: str, **kwargs: Any) -> None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                result = impl.function(**kwargs)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - an observer never breaks the daemon
                log.warning(
                    "plugin_hook_failed", plugin=impl.plugin_name, hook=hook_name, exc_info=True
                )

    async def startup(self, daemon: Any) -> None:
        """Run every stratos_startup hook."""
        await self._observe("stratos_startup", daemon=daemon)

    async def on_event(self, event: Any) -> None:
        """Run every stratos_on_event hook (failures logged and ignored)."""
        await self._observe("stratos_on_event", event=event)

    async def shutdown(self, daemon: Any) -> None:
        """Run every stratos_shutdown hook."""
        await self._observe("stratos_shutdown", daemon=daemon)

    def info(self) -> list[PluginInfo]:
        """Installed plugins: name, distribution, version, and what each provides."""
        dists = {id(p): d for p, d in self.pm.list_plugin_distinfo()}
        provides: dict[str, dict[str, list[str]]] = {}
        for reg_name in (
            "selectors",
            "teachers",
            "catalogs",
            "modes",
            "trainers",
            "deployers",
            "tasks",
            "aggregators",
        ):
            reg: Registry[Any] = getattr(self, reg_name)
            for name in reg.names():
                provides.setdefault(reg.owner(name), {}).setdefault(reg_name, []).append(name)
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            if dist is not None:
                dist_name, version = dist.project_name, dist.version
            else:
                dist_name, version = "stratos (built-in)", __version__
            out.append(
                PluginInfo(
                    name=name,
                    distribution=dist_name,
                    version=version,
                    provides=provides.get(name, {}),
                )
            )
        return sorted(out, key=lambda p: p.name)


def lookup(registry: Registry[T], name: str, field: str) -> type[T]:
    """registry.get with the job-spec field named in the error."""
    try:
        return registry.get(name)
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.hint, field=field) from None


_cached: Plugins | None = None


def get_plugins(factory: Callable[[], Plugins] = Plugins) -> Plugins:
    """A process-wide Plugins instance (built on first use)."""
    global _cached
    if _cached is None:
        _cached = factory()
    return _cached
