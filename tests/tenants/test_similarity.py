"""Signatures are aggregates, and their similarity recovers a designed structure."""

from __future__ import annotations

import msgspec
import pytest

from bench.tenant_data import DESIGN, rows_for
from stratosd.errors import ConfigError
from stratosd.tenants.signature import compute_signature, js_divergence
from stratosd.tenants.similarity import similarity_matrix, softmax_weights, uniform_weights


def _sigs(seed: int) -> list:  # type: ignore[type-arg]
    return [compute_signature(t, [(r["question"], r["answer"]) for r in
                                  rows_for(mix, 80, seed + i)])
            for i, (t, mix) in enumerate(DESIGN.items())]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_recovers_the_design(seed: int) -> None:
    s = similarity_matrix(_sigs(seed))
    assert s["t1"]["t2"] > s["t1"]["t3"] > s["t1"]["t4"]
    assert s["t2"]["t1"] == s["t1"]["t2"] and s["t1"]["t1"] == 1.0


def test_signature_holds_no_row() -> None:
    rows = [("max 3 7 secretrow", "7"), ("min 1 2", "1")]
    sig = compute_signature("t", rows, raw_bytes=99)
    blob = msgspec.json.encode(sig)
    assert b"secretrow" not in blob and b"max 3 7" not in blob
    assert sig.n_examples == 2 and sig.raw_bytes == 99
    assert abs(sum(sig.question_hist) - 1) < 1e-4 and abs(sum(sig.answer_hist) - 1) < 1e-4


def test_js_divergence_bounds() -> None:
    assert js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)


def test_temperature_sharpens_weights() -> None:
    s = similarity_matrix(_sigs(0))
    names = sorted(s)
    cold = softmax_weights(s, names, 0.05)
    warm = softmax_weights(s, names, 1.0)
    for w in (cold, warm):
        assert all(abs(sum(row.values()) - 1) < 1e-9 for row in w.values())
    assert cold["t1"]["t4"] < warm["t1"]["t4"] < 0.25 + 1e-9
    assert cold["t1"]["t2"] > warm["t1"]["t2"]
    assert uniform_weights(names)["t1"]["t4"] == 0.25
    with pytest.raises(ConfigError):
        softmax_weights(s, names, 0.0)
