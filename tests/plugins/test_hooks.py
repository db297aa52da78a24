"""Every hookspec is documented and exercised; built-ins register through the same hooks."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import structlog

from schemas.specs import ServerOffer, TaskSpec, TeacherScore
from stratosd import hookimpl, hookspecs
from stratosd.api import PeriodicJob, ServerSelector
from stratosd.errors import PluginError
from stratosd.plugins import BUILTIN_PLUGINS, Plugins, make_plugin_manager

SPECS = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
         if n.startswith("stratos_")]


def test_every_hookspec_has_a_docstring_and_a_test() -> None:
    tests = {n for n, _ in inspect.getmembers(__import__(__name__), inspect.isfunction)}
    for name in SPECS:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} lacks a docstring"
        assert f"test_hook_{name}" in globals(), f"no test_hook_{name}"
    assert tests is not None


def _plugins(*extra: object) -> Plugins:
    return Plugins(make_plugin_manager(autoload=False, extra=list(extra)))


def test_hook_stratos_configure() -> None:
    seen: list[Any] = []

    class P:
        @hookimpl
        def stratos_configure(self, config: Any) -> None:
            seen.append(config)

    p = _plugins()
    p.configure({"x": 1})
    p.pm.register(P())  # historic: a late plugin still gets the config
    assert seen == [{"x": 1}]


def test_hook_stratos_server_selectors() -> None:
    assert {"pfg", "cost-first", "random"} <= set(_plugins().selectors.names())


def test_hook_stratos_teacher_backends() -> None:
    assert {"openai", "hf", "vllm", "reference"} <= set(_plugins().teachers.names())


def test_hook_stratos_offer_catalogs() -> None:
    p = _plugins()
    assert "static" in p.catalogs.names()
    assert p.catalogs.get("static")().offers()


def test_hook_stratos_student_candidates() -> None:
    class P:
        @hookimpl
        def stratos_student_candidates(self, task: TaskSpec, offer: ServerOffer) -> list[Any]:
            from schemas.specs import StudentCandidate

            return [StudentCandidate(model=f"config:tiny-for-{offer.id}")]

    got = _plugins(P()).student_candidates(TaskSpec(name="gsm8k"), ServerOffer(id="s1"))
    assert [c.model for c in got] == ["config:tiny-for-s1"]


def test_hook_stratos_distillation_modes() -> None:
    assert {"alignment", "injection", "hybrid"} <= set(_plugins().modes.names())


def test_hook_stratos_trainers() -> None:
    assert {"lora-sft", "full-sft", "grpo"} <= set(_plugins().trainers.names())


def test_hook_stratos_deployers() -> None:
    assert {"builtin", "vllm"} <= set(_plugins().deployers.names())


def test_hook_stratos_tasks() -> None:
    assert {"mahjong-winning-tiles", "gsm8k", "jsonl-qa"} <= set(_plugins().tasks.names())


def test_hook_stratos_aggregators() -> None:
    assert {"acme-top-rank", "lora-product-average"} <= set(_plugins().aggregators.names())


def test_hook_stratos_choose_mode() -> None:
    task = TaskSpec(name="gsm8k")
    good = TeacherScore(name="t", backend="hf", model="m", accuracy=0.9, n=10, correct=9)
    bad = TeacherScore(name="t", backend="hf", model="m", accuracy=0.1, n=10, correct=1)
    p = _plugins()
    assert p.choose_mode(task, good, 0.5) == "alignment"
    assert p.choose_mode(task, bad, 0.5) == "injection"

    class Always:
        @hookimpl
        def stratos_choose_mode(self, task: TaskSpec, teacher: TeacherScore,
                                threshold: float) -> str:
            return "hybrid"

    assert _plugins(Always()).choose_mode(task, good, 0.5) == "hybrid"  # built-in is trylast


def test_hook_stratos_periodic_jobs() -> None:
    async def tick() -> None:
        return None

    class P:
        @hookimpl
        def stratos_periodic_jobs(self, config: Any) -> list[PeriodicJob]:
            return [PeriodicJob("tick", tick, 1.0)]

    assert [j.id for j in _plugins(P()).periodic_jobs({})] == ["tick"]


async def test_hook_stratos_startup() -> None:
    seen: list[Any] = []

    class P:
        @hookimpl
        async def stratos_startup(self, daemon: Any) -> None:
            seen.append(daemon)

    await _plugins(P()).startup("d")
    assert seen == ["d"]


async def test_hook_stratos_on_event() -> None:
    seen: list[Any] = []

    class Broken:
        @hookimpl
        def stratos_on_event(self, event: Any) -> None:
            raise RuntimeError("observer bug")

    class Good:
        @hookimpl
        def stratos_on_event(self, event: Any) -> None:
            seen.append(event)

    with structlog.testing.capture_logs() as logs:
        await _plugins(Broken(), Good()).on_event("e")
    assert seen == ["e"]  # a broken observer is logged and ignored
    assert any(e["event"] == "plugin_hook_failed" for e in logs)


async def test_hook_stratos_shutdown() -> None:
    seen: list[Any] = []

    class P:
        @hookimpl
        def stratos_shutdown(self, daemon: Any) -> None:
            seen.append(daemon)

    await _plugins(P()).shutdown("d")
    assert seen == ["d"]


def test_duplicate_names_fail_startup() -> None:
    class Dup(ServerSelector):
        name = "pfg"

        def select(self, *a: Any, **k: Any) -> Any:
            raise AssertionError

    class P:
        @hookimpl
        def stratos_server_selectors(self) -> list[type[ServerSelector]]:
            return [Dup]

    with pytest.raises(PluginError, match="already registered"):
        _ = _plugins(P()).selectors


def test_blocked_plugins_are_not_loaded() -> None:
    pm = make_plugin_manager(autoload=False, disabled=["plugins.selectors.baselines"])
    assert "cost-first" not in Plugins(pm).selectors.names()
    assert "pfg" in Plugins(pm).selectors.names()


def test_builtins_import_nothing_heavy() -> None:
    import subprocess
    import sys

    code = ("import sys; from stratosd.plugins import Plugins; p = Plugins(); p.info(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'vllm', 'matplotlib')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(BUILTIN_PLUGINS) >= 20
