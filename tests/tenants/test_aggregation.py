"""Aggregation math on small tensors: LoRA product averaging and ACME's top-rank form."""

from __future__ import annotations

import numpy as np
import pytest

from stratosd.errors import ConfigError
from stratosd.tenants import aggregation
from stratosd.tenants.similarity import check_same_group, group_by_student

RNG = np.random.default_rng(0)


def _lora(r: int = 3, out: int = 4, inp: int = 5, scale: float = 2.0) -> dict[str, np.ndarray]:
    return {"m.lora_A": RNG.normal(size=(r, inp)), "m.lora_B": RNG.normal(size=(out, r)),
            "m.scaling": np.asarray(scale)}


def test_product_average_is_the_weighted_sum_of_products() -> None:
    u = {"a": _lora(), "b": _lora(), "c": _lora()}
    w = {"a": {"a": 0.5, "b": 0.3, "c": 0.2}, "b": {"a": 0.1, "b": 0.8, "c": 0.1},
         "c": {"a": 0.0, "b": 0.0, "c": 1.0}}
    mixed = aggregation.product_average(u, w)
    for i in u:
        expected = sum(w[i][j] * 2.0 * u[j]["m.lora_B"] @ u[j]["m.lora_A"] for j in u)
        np.testing.assert_allclose(mixed[i]["m"], expected)
    np.testing.assert_allclose(mixed["c"]["m"], 2.0 * u["c"]["m.lora_B"] @ u["c"]["m.lora_A"])
    # the product of averaged factors is not the averaged product
    avg_b = np.sum([w["a"][j] * u[j]["m.lora_B"] for j in u], axis=0)
    avg_a = np.sum([w["a"][j] * u[j]["m.lora_A"] for j in u], axis=0)
    assert not np.allclose(2.0 * avg_b @ avg_a, mixed["a"]["m"])


def test_rank_importance_and_acme_keep_top_ranks() -> None:
    a = np.eye(3, 4)
    b = np.diag([3.0, 1.0, 2.0])[:, :3]
    own = {"m.lora_A": a, "m.lora_B": b, "m.scaling": np.asarray(1.0)}
    imp = aggregation.rank_importance(own)["m"]
    np.testing.assert_allclose(imp, [0.5, 1 / 6, 1 / 3])
    other = np.array([0.0, 1.0, 0.0])
    mixed = aggregation.importance_mix({"x": {"m": imp}, "y": {"m": other}},
                                       {"x": {"x": 0.5, "y": 0.5}, "y": {"x": 0.0, "y": 1.0}})
    np.testing.assert_allclose(mixed["x"]["m"], [0.25, 7 / 12, 1 / 6])
    assert aggregation.top_ranks(mixed["x"]["m"], 2) == [0, 1]
    kept = aggregation.keep_ranks(own, mixed["x"], 2)
    dw = aggregation.delta(kept, "m")
    np.testing.assert_allclose(dw, np.diag([3.0, 1.0, 0.0]) @ a)  # rank 2 pruned


def test_weights_must_cover_the_senders_and_sum_to_one() -> None:
    u = {"a": _lora(), "b": _lora()}
    with pytest.raises(ConfigError, match="sum to"):
        aggregation.product_average(u, {"a": {"a": 0.5, "b": 0.6}, "b": {"b": 1.0}})
    with pytest.raises(ConfigError, match="without an update"):
        aggregation.product_average(u, {"a": {"a": 0.5, "z": 0.5}, "b": {"b": 1.0}})


def test_adapters_of_different_students_are_never_mixed() -> None:
    u = {"a": _lora(out=4), "b": _lora(out=6)}
    with pytest.raises(ConfigError, match="shapes"):
        aggregation.product_average(u, {"a": {"a": 0.5, "b": 0.5}, "b": {"a": 0.5, "b": 0.5}})
    ranks = {"a": {"m": np.ones(3) / 3}, "b": {"m": np.ones(4) / 4}}
    with pytest.raises(ConfigError, match="ranks differ"):
        aggregation.importance_mix(ranks, {"a": {"a": 1.0}, "b": {"b": 1.0}})
    groups = group_by_student({"a": ("config:tiny", 8), "b": ("config:small", 8),
                               "c": ("config:tiny", 8), "d": ("config:tiny", 4)})
    assert groups == {"config:tiny#r8": ["a", "c"], "config:small#r8": ["b"],
                      "config:tiny#r4": ["d"]}
    with pytest.raises(ConfigError, match="different students"):
        check_same_group({"a": ("config:tiny", 8), "b": ("config:small", 8)})
