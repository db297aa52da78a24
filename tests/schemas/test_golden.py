"""Golden messages keep decoding forever; JSON Schema files match the code."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from schemas.base import decode_or_error, is_id, new_id
from schemas.commands import AGENT_COMMAND_DECODER, DAEMON_COMMAND_DECODER, REPLY_DECODER
from schemas.events import EVENT_DECODER
from schemas.export import main as export_main
from schemas.telemetry import TELEMETRY_DECODER
from stratosd.errors import BadMessage

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))
DECODERS = [EVENT_DECODER, AGENT_COMMAND_DECODER, DAEMON_COMMAND_DECODER, REPLY_DECODER,
            TELEMETRY_DECODER]


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_message_decodes(path: Path) -> None:
    data = path.read_bytes()
    tag = json.loads(data)["type"]
    decoded = []
    for decoder in DECODERS:
        try:
            decoded.append(decoder.decode(data))
        except msgspec.ValidationError:
            continue
    assert decoded, f"golden {tag} no longer decodes"
    assert type(decoded[0]).__struct_config__.tag == tag


def test_every_tag_has_a_golden_file() -> None:
    from schemas.commands import AgentCommand, DaemonCommand, Reply
    from schemas.events import Event

    tags = {t.__struct_config__.tag for u in (Event, AgentCommand, DaemonCommand, Reply)
            for t in u.__args__} | {"agent_telemetry"}
    assert tags <= {p.stem for p in GOLDEN}


def test_json_schema_files_are_fresh() -> None:
    import difflib

    from schemas.export import OUT, render

    stale = []
    for name, text in render().items():
        old = (OUT / name).read_text() if (OUT / name).exists() else ""
        if old != text:
            diff = difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                        f"checked in {name}", f"from the code {name}", n=2)
            stale.append("".join(list(diff)[:40]))
    assert not stale, "run python -m schemas.export\n" + "\n".join(stale)
    assert export_main(["--check"]) == 0


def test_unknown_fields_are_tolerated_on_the_wire() -> None:
    golden = json.loads((Path(__file__).parent / "golden" / "job_progress.json").read_text())
    golden["added_in_a_later_release"] = 1
    event = EVENT_DECODER.decode(json.dumps(golden).encode())
    assert event.job_id == "job-1"


def test_decode_or_error_names_the_field() -> None:
    with pytest.raises(BadMessage) as info:
        decode_or_error(EVENT_DECODER, b'{"type": "job_progress", "job_id": 5}')
    assert info.value.field == "job_id"
    with pytest.raises(BadMessage) as info:
        decode_or_error(EVENT_DECODER, b"{nope")
    assert info.value.field == "$"


def test_ids_are_sortable_lowercase_ulids() -> None:
    a, b = new_id(), new_id()
    assert is_id(a) and is_id(b) and a.islower()
    assert len({new_id() for _ in range(1000)}) == 1000
