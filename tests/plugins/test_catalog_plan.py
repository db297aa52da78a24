"""The static offer catalog (shipped file, extra TOML/CSV files, errors) and server plans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plugins.catalogs.static import (
    REGIONS,
    SHIPPED,
    StaticCatalog,
    read_catalog_file,
    region_latency_ms,
)
from plugins.selectors.baselines import CostFirst
from plugins.selectors.pfg import ParetoFrontGrid
from schemas.specs import Constraints
from stratosd.costmodel import JobCosting
from stratosd.errors import ConfigError
from stratosd.planning import format_plan, plan_rows, plot_plan


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATOS_OFFER_CATALOGS", raising=False)
    monkeypatch.delenv("STRATOS_USER_REGION", raising=False)


def test_shipped_catalog_is_realistic() -> None:
    offers = StaticCatalog().offers()
    assert 25 <= len(offers) <= 40
    assert len({o.id for o in offers}) == len(offers)
    assert all(re.fullmatch(r"[a-z0-9_-]+", o.id) for o in offers)
    assert all(o.source == "catalog:static" and o.status == "up" for o in offers)
    cpu = [o for o in offers if o.gpu_count == 0]
    assert 1 <= len(cpu) <= 5
    gpus = {o.gpu_model for o in offers if o.gpu_count}
    assert any("H100" in g for g in gpus) and any("T4" in g for g in gpus)
    assert all(0.1 < o.price_usd_per_hour < 40 for o in offers)
    assert all(o.region in REGIONS for o in offers)
    near = [o for o in offers if o.region == "us-east"]
    assert all(o.latency_ms == 5.0 for o in near)  # same region: the 5 ms base


def test_region_latency_table() -> None:
    assert region_latency_ms("us-east", "us-east") == 5.0
    assert 70 < region_latency_ms("us-east", "eu-west") < 95
    assert 140 < region_latency_ms("us-east", "ap-northeast") < 175
    assert region_latency_ms("eu-west", "us-east") == region_latency_ms("us-east", "eu-west")


def test_user_region_changes_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATOS_USER_REGION", "eu-central")
    by_id = {o.id: o for o in StaticCatalog().offers()}
    assert by_id["l4-x1-eu-central"].latency_ms == 5.0
    assert by_id["l4-x1-us-east"].latency_ms > 60
    monkeypatch.setenv("STRATOS_USER_REGION", "moon-base")
    with pytest.raises(ConfigError, match="unknown user region 'moon-base'"):
        StaticCatalog()


def test_extra_catalogs_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text(
        '[[offer]]\nid = "lab-a100"\ngpu_model = "A100 80GB"\ngpu_count = 2\n'
        'gpu_mem_mib = 81920\nprice_usd_per_hour = 0.0\nregion = "on-prem"\nlatency_ms = 2.5\n'
    )
    csv = tmp_path / "more.csv"
    csv.write_text(
        "id,gpu_model,gpu_count,gpu_mem_mib,price_usd_per_hour,region,status\n"
        "csv-l4,NVIDIA L4,1,23034,0.5,eu-west,\n"
        "csv-down,NVIDIA T4,1,15360,0.2,us-west,down\n"
    )
    monkeypatch.setenv("STRATOS_OFFER_CATALOGS", f"{toml}:{csv}")
    by_id = {o.id: o for o in StaticCatalog().offers()}
    assert by_id["lab-a100"].latency_ms == 2.5 and by_id["lab-a100"].gpu_count == 2
    assert by_id["csv-l4"].gpu_mem_mib == 23034 and by_id["csv-l4"].status == "up"
    assert by_id["csv-l4"].latency_ms == region_latency_ms("us-east", "eu-west")
    assert by_id["csv-down"].status == "down"
    only = StaticCatalog({"paths": [str(csv)], "shipped": False}).offers()
    assert [o.id for o in only] == ["csv-l4", "csv-down"]


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("bad.csv",
         "id,price_usd_per_hour,region,gpu_count\nok,1.0,us-east,1\nbad,1.0,us-east,two\n",
         r"bad\.csv: row 3: field `gpu_count`"),
        ("bad.csv", "id,price_usd_per_hour,region\nBad Id!,1.0,us-east\n",
         r"bad\.csv: row 2: field `id`"),
        ("bad.csv", "id,region\nx,us-east\n", r"row 2: field `price_usd_per_hour`"),
        ("bad.toml", '[[offer]]\nid = "a"\nprice_usd_per_hour = -1\nregion = "us-east"\n',
         r"bad\.toml: offer #1 \(a\): field `price_usd_per_hour`"),
        ("bad.toml", '[[offer]]\nid = "a"\nprice_usd_per_hour = 1\nregion = "us-east"\n'
         "gpu_modle = 'typo'\n", r"offer #1 \(a\): field `gpu_modle`"),
        ("bad.toml", "offer = 3\n", r"expected \[\[offer\]\] tables"),
        ("bad.toml", "[[offer]\n", r"invalid TOML"),
        ("bad.json", "{}", r"unsupported file type"),
    ],
)
def test_catalog_errors_name_file_row_and_field(
    tmp_path: Path, name: str, text: str, pattern: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        read_catalog_file(path)


def test_catalog_semantic_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.toml"
    dup.write_text('[[offer]]\nid = "t4-x1-us-east"\nprice_usd_per_hour = 1\nregion = "us-east"\n')
    with pytest.raises(ConfigError, match=r"id 't4-x1-us-east' already defined in .*offers\.toml"):
        StaticCatalog({"paths": [str(dup)]}).offers()
    far = tmp_path / "far.toml"
    far.write_text('[[offer]]\nid = "x"\nprice_usd_per_hour = 1\nregion = "mars-1"\n')
    with pytest.raises(ConfigError, match=r"offer #1 \(x\): field `region`: unknown region"):
        StaticCatalog({"paths": [str(far)], "shipped": False}).offers()
    with pytest.raises(ConfigError, match="not found"):
        StaticCatalog({"paths": [str(tmp_path / "nope.csv")]}).offers()


def test_shipped_file_is_packaged_next_to_the_module() -> None:
    assert SHIPPED.name == "offers.toml" and SHIPPED.is_file()


# --- plans -------------------------------------------------------------------------------------


def test_plan_rows_and_format_on_shipped_catalog() -> None:
    offers = StaticCatalog().offers()
    constraints = Constraints(max_latency_ms=90, budget_usd=3.0)
    sel = ParetoFrontGrid().select(offers, constraints, est_train_hours=0.5)
    rows = plan_rows(sel, offers, constraints, JobCosting.reference_hours(0.5))
    assert {r["id"] for r in rows} == set(sel.pareto_ids) | {sel.chosen.id}
    assert [r["chosen"] for r in rows].count(True) == 1
    assert all(r["pareto"] for r in rows)  # PFG always picks from the front
    assert rows == sorted(rows, key=lambda r: (r["est_job_usd"], r["id"]))
    assert all(r["est_job_usd"] <= 3.0 and r["latency_ms"] <= 90 for r in rows)
    assert all(r["budget_left_usd"] == pytest.approx(3.0 - r["est_job_usd"]) for r in rows)
    pick = next(r for r in rows if r["chosen"])
    assert pick["est_job_usd"] == pytest.approx(sel.details["chosen"]["est_job_usd"], abs=1e-3)
    text = format_plan(sel, rows)
    lines = text.splitlines()
    header = next(line for line in lines if "server" in line and "job $" in line)
    table = lines[lines.index(header): lines.index(header) + len(rows) + 1]
    end = header.index("job $") + len("job $")  # numbers are right-aligned under it
    assert all(line[end - 1].isdigit() and line[end] == " " for line in table[1:])
    assert any(line.startswith("* " + sel.chosen.id) for line in table)
    assert text.endswith(sel.explanation)


def test_plan_rows_show_where_a_baseline_pick_sits() -> None:
    offers = StaticCatalog().offers()
    sel = CostFirst().select(offers, Constraints(), est_train_hours=0.5)
    rows = plan_rows(sel, offers, Constraints(), JobCosting.reference_hours(0.5))
    assert rows[0]["chosen"]  # the cheapest job comes first
    assert "budget_left_usd" not in rows[0]


def test_plot_plan_writes_png(tmp_path: Path) -> None:
    offers = StaticCatalog().offers()
    sel = ParetoFrontGrid().select(offers, Constraints(max_latency_ms=90))
    out = plot_plan(offers, sel, tmp_path / "sub" / "plan.png")
    assert out == tmp_path / "sub" / "plan.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
