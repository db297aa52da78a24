"""A third-party plugin installed as a distribution is found through the `stratos` group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stratosd.plugins import Plugins, make_plugin_manager


@pytest.fixture
def third_party(tmp_path: Path) -> Path:
    pkg = tmp_path / "site"
    (pkg / "acme_stratos").mkdir(parents=True)
    (pkg / "acme_stratos" / "__init__.py").write_text(textwrap.dedent('''
        from stratosd import hookimpl
        from stratosd.api import ServerSelector
        from stratosd.errors import Infeasible

        class Cheapest(ServerSelector):
            name = "acme-cheapest"
            description = "cheapest server, by ACME"

            def select(self, offers, constraints, *, est_train_hours=0.5, seed=0):
                from schemas.specs import Selection
                if not offers:
                    raise Infeasible("no offers")
                best = min(offers, key=lambda o: o.price_usd_per_hour)
                return Selection(selector=self.name, chosen=best, candidates=len(offers),
                                 explanation=f"{best.id} is cheapest")

        @hookimpl
        def stratos_server_selectors():
            return [Cheapest]
    '''))
    dist = pkg / "acme_stratos-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-stratos\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[stratos]\nacme = acme_stratos\n")
    sys.path.insert(0, str(pkg))
    yield pkg
    sys.path.remove(str(pkg))
    sys.modules.pop("acme_stratos", None)


def test_entry_point_plugin_is_loaded_and_listed(third_party: Path) -> None:
    from schemas.specs import Constraints, ServerOffer

    plugins = Plugins(make_plugin_manager(autoload=True))
    cls = plugins.selectors.get("acme-cheapest")
    offers = [ServerOffer(id="a", price_usd_per_hour=3.0), ServerOffer(id="b",
                                                                       price_usd_per_hour=1.0)]
    assert cls().select(offers, Constraints()).chosen.id == "b"
    info = {p.name: p for p in plugins.info()}
    assert info["acme"].distribution == "acme-stratos"
    assert info["acme"].version == "1.2.3"
    assert info["acme"].provides == {"selectors": ["acme-cheapest"]}


def test_autoload_can_be_switched_off(third_party: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATOS_NO_PLUGIN_AUTOLOAD", "1")
    assert "acme-cheapest" not in Plugins(make_plugin_manager()).selectors.names()


def test_blocked_by_env(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATOS_DISABLE_PLUGINS", "acme")
    assert "acme-cheapest" not in Plugins(make_plugin_manager()).selectors.names()
