"""A tenant's data signature: aggregates only, never per-sample values.

The signature is two normalised histograms: the hashed character bigrams of all questions
(`QUESTION_BUCKETS` buckets) and the hashed answers (`ANSWER_BUCKETS` buckets), plus mean
lengths. Text tasks differ in their wording (bigrams) and in what they answer (answers); both
are cheap, need no model, and say nothing about any single row. The distance between two
signatures is the Jensen-Shannon divergence (base 2, in [0, 1]) of the question histograms plus
that of the answer histograms, so d ∈ [0, 2].
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

from schemas.tenants import TenantSignature

QUESTION_BUCKETS = 256
ANSWER_BUCKETS = 64


def _bucket(text: str, buckets: int) -> int:
    # crc32: stable across processes (hash() is salted per interpreter)
    return zlib.crc32(text.encode()) % buckets


def _normalise(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [round(c / total, 6) for c in counts] if total > 0 else counts


def compute_signature(
    tenant: str,
    rows: Iterable[tuple[str, str]],
    *,
    raw_bytes: int = 0,
    question_buckets: int = QUESTION_BUCKETS,
    answer_buckets: int = ANSWER_BUCKETS,
) -> TenantSignature:
    """The signature of (question, answer) rows: histograms and mean lengths only."""
    q_counts = [0.0] * question_buckets
    a_counts = [0.0] * answer_buckets
    n = q_chars = a_chars = 0
    for question, answer in rows:
        n += 1
        q_chars += len(question)
        a_chars += len(answer)
        text = f" {question.lower()} "
        for i in range(len(text) - 1):
            q_counts[_bucket(text[i:i + 2], question_buckets)] += 1
        a_counts[_bucket(answer.strip().lower(), answer_buckets)] += 1
    return TenantSignature(
        tenant=tenant, n_examples=n, question_hist=_normalise(q_counts),
        answer_hist=_normalise(a_counts), mean_question_chars=q_chars / n if n else 0.0,
        mean_answer_chars=a_chars / n if n else 0.0, raw_bytes=raw_bytes)


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (0: same distribution, 1: disjoint supports)."""
    if len(p) != len(q):
        raise ValueError(f"histograms of different sizes ({len(p)} and {len(q)})")
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m) / 2
        if b > 0:
            total += b * math.log2(b / m) / 2
    return max(0.0, min(1.0, total))


def distance(a: TenantSignature, b: TenantSignature) -> float:
    """JS(questions) + JS(answers), in [0, 2]."""
    return (js_divergence(a.question_hist, b.question_hist)
            + js_divergence(a.answer_hist, b.answer_hist))
