"""Data files shipped with the built-in task packs.

`gsm8k_style.jsonl`: 220 grade-school math problems with worked solutions, written for
Stratos in the format of the GSM8K train set (`<<a*b=c>>` calculator annotations, units,
currency, percentages, fractions, a final `#### N` line); none is taken from GSM8K.
`gsm8k_style_wrong.jsonl`: 65 solutions in the same format with one deliberate error each
(`error`: `arithmetic` or `final`; `note`: where), the verifier's rejection side.
Both load as a gsm8k task (`path = ...`); bench/bench_tasks.py and the tests read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent
GSM8K_STYLE = DATA_DIR / "gsm8k_style.jsonl"
GSM8K_STYLE_WRONG = DATA_DIR / "gsm8k_style_wrong.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a shipped JSONL file, in order."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
