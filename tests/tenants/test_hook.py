"""A third-party aggregation rule registers through stratos_aggregators like the built-ins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from stratosd import hookimpl
from stratosd.api import Aggregator
from stratosd.errors import PluginError
from stratosd.plugins import Plugins, make_plugin_manager


class KeepOwn(Aggregator):
    """Every tenant keeps its own update (no sharing)."""

    name: ClassVar[str] = "keep-own"

    def aggregate(self, updates: Mapping[str, Mapping[str, Any]],
                  weights: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
        return {t: dict(u) for t, u in updates.items()}


class ThirdParty:
    @hookimpl
    def stratos_aggregators(self) -> list[type[Aggregator]]:
        return [KeepOwn]


class Clash:
    class Dup(KeepOwn):
        name: ClassVar[str] = "acme-top-rank"

    @hookimpl
    def stratos_aggregators(self) -> list[type[Aggregator]]:
        return [self.Dup]


def test_third_party_aggregator_is_registered_and_used() -> None:
    plugins = Plugins(make_plugin_manager(autoload=False, extra=[ThirdParty()]))
    assert {"keep-own", "acme-top-rank", "lora-product-average"} <= set(
        plugins.aggregators.names())
    rule = plugins.aggregators.get("keep-own")()
    assert rule.aggregate({"a": {"x": 1}}, {"a": {"a": 1.0}}) == {"a": {"x": 1}}
    assert any("aggregators" in p.provides for p in plugins.info())


def test_duplicate_aggregator_name_fails_startup() -> None:
    plugins = Plugins(make_plugin_manager(autoload=False, extra=[Clash()]))
    with pytest.raises(PluginError, match="already registered"):
        _ = plugins.aggregators
