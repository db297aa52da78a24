"""Write tests/schemas/golden/<tag>.json for every event, command and reply (run once per tag)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from schemas.commands import AgentCommand, DaemonCommand, Reply
from schemas.events import Event
from schemas.telemetry import AgentTelemetry

GOLDEN = Path(__file__).parent / "golden"
TS = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
SPEC = {"name": "golden", "task": {"name": "mahjong-winning-tiles", "params": {"difficulty": 1}},
        "teachers": [{"backend": "reference", "model": "reference"}],
        "students": [{"model": "config:tiny"}]}
OFFER = {"id": "gpu-1", "gpu_model": "H100", "gpu_count": 1, "gpu_mem_mib": 81920,
         "price_usd_per_hour": 2.5, "latency_ms": 12.0}
RUN = {"run_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "name": "golden", "state": "running",
       "stage": "train", "created": TS.isoformat(), "updated": TS.isoformat(), "spec": SPEC}
FILL = {"spec": SPEC, "run_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "job_id": "job-1",
        "agent_id": "gpu-1", "stage": "train", "step": "train", "message": "m", "code": "x",
        "silent_s": 3.0, "endpoint_id": "job-1", "url": "http://127.0.0.1:1/v1",
        "model": "m", "deployer": "builtin", "ref": "r", "state": "running", "runs": [RUN],
        "run": RUN, "servers": [{"offer": OFFER}], "plugins": [{"name": "p"}],
        "selection": {"selector": "pfg", "chosen": OFFER}, "endpoints": []}


def main() -> None:
    """Write one minimal valid example per tag (existing files are never rewritten)."""
    GOLDEN.mkdir(exist_ok=True)
    for union in (Event, AgentCommand, DaemonCommand, Reply, AgentTelemetry):
        members = getattr(union, "__args__", (union,))
        for tp in members:
            tag = tp.__struct_config__.tag
            path = GOLDEN / f"{tag}.json"
            if path.exists():
                continue
            fields = {f.name for f in msgspec.structs.fields(tp)}
            data = {"type": tag, "id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "ts": TS.isoformat()}
            data.update({k: v for k, v in FILL.items() if k in fields})
            msgspec.convert(data, tp)  # must be valid
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
