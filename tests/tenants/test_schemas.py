"""Tenant wire messages: golden examples keep decoding; the job TOML parses and refuses typos."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from schemas.tenants import (
    TENANT_COMMAND_DECODER,
    TENANT_EVENT_DECODER,
    TENANT_REPLY_DECODER,
    TenantCommand,
    TenantEvent,
    TenantReply,
)
from stratosd.ctl.tenants import parse_tenant_toml
from stratosd.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"
TS = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC).isoformat()
SPEC = {"tenants": [{"name": "t1", "agents": ["host-1"], "data_path": "/data/t1.jsonl"}]}
STATE = {"job_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "name": "tenants", "state": "running",
         "spec": SPEC}
STATUS = {"t1": {"state": "ok", "agent": "host-1", "student": "config:tiny", "rounds_done": 1,
                 "accuracy_alone": 0.5, "accuracy_aggregated": 0.6, "bytes_sent": 1000,
                 "raw_bytes": 4000}}
FILL = {"spec": SPEC, "job_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "job": STATE, "jobs": [STATE],
        "code": "config", "message": "m", "name": "tenants", "tenants": STATUS,
        "stage": "round-1", "round": 1, "rounds": 2, "rule": "acme-top-rank", "tenant": "t1"}
OVERRIDE = {"tenant_job_submitted": {"tenants": ["t1"]},
            "tenant_budget_stopped": {"round": 2, "spent_usd": 0.5, "projected_usd": 1.5,
                                      "budget_usd": 1.0},
            "tenant_endpoint_ready": {"endpoint": {
                "student": "config:tiny", "agent": "host-1", "deployer": "builtin-multi",
                "endpoint_id": "01jzzzzzzzzzzzzzzzzzzzzzzz-serve-0a1b2c3d",
                "url": "http://127.0.0.1:8000/v1", "names": {"t1": "t1"},
                "weights_bytes": {"t1": 0}, "state": "serving"}}}
UNIONS = (TenantCommand, TenantReply, TenantEvent)
DECODERS = (TENANT_COMMAND_DECODER, TENANT_REPLY_DECODER, TENANT_EVENT_DECODER)


def write_missing() -> None:
    """One minimal valid example per tenant tag (existing files are never rewritten)."""
    GOLDEN.mkdir(exist_ok=True)
    for union in UNIONS:
        for tp in union.__args__:
            tag = tp.__struct_config__.tag
            path = GOLDEN / f"{tag}.json"
            if path.exists():
                continue
            fields = {f.name for f in msgspec.structs.fields(tp)}
            data = {"type": tag, "id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "ts": TS}
            data.update({k: v for k, v in FILL.items() if k in fields})
            data.update(OVERRIDE.get(tag, {}))
            msgspec.convert(data, tp)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_golden_tenant_messages_decode(path: Path) -> None:
    data = path.read_bytes()
    tag = json.loads(data)["type"]
    for decoder in DECODERS:
        try:
            msg = decoder.decode(data)
        except msgspec.ValidationError:
            continue
        assert type(msg).__struct_config__.tag == tag
        return
    pytest.fail(f"golden {tag} no longer decodes")


def test_every_tenant_tag_has_a_golden_file() -> None:
    tags = {t.__struct_config__.tag for u in UNIONS for t in u.__args__}
    assert tags <= {p.stem for p in GOLDEN.glob("*.json")}


def test_tenant_job_toml(tmp_path: Path) -> None:
    good = tmp_path / "job.toml"
    good.write_text('name = "demo"\n[[tenants]]\nname = "t1"\nagents = ["a1"]\n'
                    'data_path = "/srv/t1.jsonl"\n[tenants.limits]\nmax_params = 100000\n'
                    '[aggregation]\nrule = "acme-top-rank"\ntemperature = 0.2\n')
    job = parse_tenant_toml(str(good))
    assert job.tenants[0].limits.max_params == 100000
    assert job.aggregation.rule == "acme-top-rank"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tenants]]\nname = "t1"\nagents = ["a1"]\ndata_path = "x"\ndata_pth = "y"\n')
    with pytest.raises(ConfigError, match="data_pth"):
        parse_tenant_toml(str(bad))


if __name__ == "__main__":
    write_missing()
