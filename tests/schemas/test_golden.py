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


def test_schema_files_do_not_depend_on_import_order() -> None:
    # typing caches Annotated[float, Meta(ge=0)] and Annotated[float, Meta(ge=0.0)] as one
    # type: the spelling msgspec sees is whichever module was imported first (CI saw 0.0
    # where a lone run saw 0). The export writes bounds one way, and the code spells float
    # bounds as floats so validation messages read the same whatever the import order.
    import re
    from typing import Annotated

    from msgspec import Meta

    from schemas.export import render

    before = render()
    Annotated[float, Meta(ge=0.0)]  # noqa: B018 - the other spelling, now cached
    Annotated[float, Meta(ge=0)]  # noqa: B018
    assert render() == before
    root = Path(__file__).resolve().parents[2]
    int_bound = re.compile(r"Annotated\[float, Meta\([^)]*\b(?:ge|gt|le|lt)=\d[\d_]*(?![._\d])")
    offenders = [f"{p.relative_to(root)}:{i}"
                 for d in ("schemas", "stratosd", "agents", "plugins")
                 for p in sorted((root / d).rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if int_bound.search(line)]
    assert not offenders, f"write float bounds as floats (ge=0.0): {offenders}"
