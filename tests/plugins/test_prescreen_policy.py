"""A pre-screen that can say no (trial fine-tune, Wilson intervals), the interval-aware mode
policy, and the report's prediction next to the outcome."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import msgspec
import pytest

from agents.stepctx import StepContext
from plugins.modes.policy import decide_with_interval, explain_mode, straddles
from plugins.students.candidates import choose
from plugins.students.screen import MIN_DECIDE_STEPS, Thresholds, estimate, loss_trend, verdict
from plugins.tasks.base import last_marker_text
from schemas.commands import RunInfo
from schemas.specs import (
    AccuracyEstimate,
    ServerOffer,
    StudentCandidate,
    TaskSpec,
    TeacherScore,
    TrialFit,
)
from schemas.stages import ChooseStrategyResult, SelectStudentResult
from stratosd import hookimpl
from stratosd.api import Example, Split, TaskPack
from stratosd.pipeline import StageRun
from stratosd.plugins import Plugins, make_plugin_manager
from stratosd.report import _md_student, prediction_vs_outcome
from stratosd.results import checked, stage_result
from stratosd.stages import choose_strategy

CPU = ServerOffer(id="cpu", gpu_count=0, ram_mib=8192)
# hidden size 4: too small to learn even "Answer: N" in the 32-step trial (loss barely moves)
TOO_SMALL = ("config:tiny?hidden_size=4&intermediate_size=4&num_hidden_layers=1"
             "&num_attention_heads=1&num_key_value_heads=1")
CAN_LEARN = ("config:tiny?hidden_size=16&intermediate_size=16&num_hidden_layers=1"
             "&num_attention_heads=1&num_key_value_heads=1")


def _score(correct: int, n: int) -> TeacherScore:
    return TeacherScore(name="t", backend="hf", model="m", accuracy=correct / n if n else 0.0,
                        n=n, correct=correct)


# --- mode policy ----------------------------------------------------------------------------


def test_hybrid_when_the_probe_interval_straddles_the_threshold() -> None:
    s = _score(7, 16)  # 44% [23–67%]
    assert straddles(s, 0.5) and decide_with_interval(s, 0.5) == "hybrid"
    assert explain_mode(s, 0.5) == (
        "teacher t probe accuracy 44% [95% CI 23–67%, n=16] straddles the threshold 50%: hybrid")
    plugins = Plugins(make_plugin_manager(autoload=False))
    assert plugins.choose_mode(TaskSpec(name="gsm8k"), s, 0.5) == "hybrid"


def test_no_hybrid_when_the_interval_is_clearly_on_one_side() -> None:
    plugins = Plugins(make_plugin_manager(autoload=False))
    task = TaskSpec(name="gsm8k")
    low, high = _score(1, 16), _score(15, 16)  # 1–28% and 72–99%
    assert plugins.choose_mode(task, low, 0.5) == "injection"
    assert plugins.choose_mode(task, high, 0.5) == "alignment"
    assert explain_mode(low, 0.5) == (
        "teacher t probe accuracy 6% [95% CI 1–28%, n=16] < threshold 50%: injection")
    assert explain_mode(high, 0.5).endswith(">= threshold 50%: alignment")
    # The same 44% from a large probe is clearly below the threshold.
    assert plugins.choose_mode(task, _score(176, 400), 0.5) == "injection"
    # No probe: the point rule (the interval would be 0–100%).
    assert decide_with_interval(_score(0, 0), 0.5) == "injection"
    # A plugin's choice is named as such.
    assert "chosen by a plugin; the built-in policy says injection" in explain_mode(
        low, 0.5, "alignment")


def _stage_run(scores: list[TeacherScore], *, mode: str = "auto") -> StageRun:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    spec = {"name": "p", "task": {"name": "gsm8k"}, "mode": mode, "mode_threshold": 0.5,
            "teachers": [{"backend": "hf", "model": "m", "name": "t"}],
            "students": [{"model": "config:tiny"}]}
    run = msgspec.convert({
        "run_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "name": "p", "state": "running",
        "stage": "choose_strategy", "created": ts.isoformat(), "updated": ts.isoformat(),
        "spec": spec, "results": {"probe_teachers": {
            "scores": [msgspec.to_builtins(s) for s in scores], "best": "t"}}}, RunInfo)
    services = SimpleNamespace(plugins=Plugins(make_plugin_manager(autoload=False)))
    return StageRun(SimpleNamespace(services=services), run, "choose_strategy", 0)  # type: ignore[arg-type]


async def test_choose_strategy_hedges_with_hybrid_and_says_why() -> None:
    out = msgspec.convert(await choose_strategy(_stage_run([_score(7, 16)])),
                          ChooseStrategyResult)
    assert out.mode == "hybrid"
    assert out.reason == ("teacher t probe accuracy 44% [95% CI 23–67%, n=16] straddles the "
                          "threshold 50%: hybrid")
    assert out.teacher_n == 16 and out.teacher_ci_low is not None
    assert out.teacher_ci_low < 0.5 < (out.teacher_ci_high or 0)
    clear = msgspec.convert(await choose_strategy(_stage_run([_score(1, 16)])),
                            ChooseStrategyResult)
    assert clear.mode == "injection" and "< threshold 50%: injection" in clear.reason
    fixed = msgspec.convert(await choose_strategy(_stage_run([_score(7, 16)],
                                                              mode="injection")),
                            ChooseStrategyResult)
    assert (fixed.mode, fixed.reason) == ("injection", "set in the job")


# --- the keep/drop rule ---------------------------------------------------------------------


def _trial(**over: Any) -> TrialFit:
    base: dict[str, Any] = {"trainer": "full-sft", "steps": 32, "loss_drop": 0.3, "n": 24,
                            "parsed": 20, "correct": 5}
    base.update(over)
    parsed, n = base["parsed"], base["n"]
    e = estimate(parsed, n, "")
    return TrialFit(**base, format_rate=e.accuracy, format_ci_low=e.ci_low,
                    format_ci_high=e.ci_high)


def test_verdict_drops_what_cannot_learn_the_format() -> None:
    limits = Thresholds()
    est = estimate(5, 24, "trial")
    assert verdict(est, _trial(), limits)[0]
    kept, why = verdict(est, _trial(loss_drop=0.01), limits)
    assert not kept and "training loss did not drop (1.0% over 32 steps" in why
    kept, why = verdict(estimate(0, 24, ""), _trial(parsed=0, correct=0), limits)
    assert not kept and "0/24 held-out answers parse" in why and "95% CI 0–14%" in why
    kept, why = verdict(est, _trial(error="out of memory in the trial: x"), limits)
    assert not kept and "trial fine-tune failed" in why
    kept, why = verdict(est, None, Thresholds(min_accuracy=0.5))
    assert not kept and "estimated accuracy 21% [95% CI 9–40%, n=24] < min_accuracy 50%" in why


def test_verdict_is_undecided_rather_than_guessing_on_too_little_evidence() -> None:
    limits = Thresholds()
    # 0 of 2 parsed: the interval (0–66%) cannot rule out a 20% format rate.
    kept, why = verdict(estimate(0, 2, ""), _trial(n=2, parsed=0, correct=0), limits)
    assert kept and "format undecided: 0/2" in why
    # 16 is the fewest that can: 0/16 has a 95% upper bound of 19%.
    assert not verdict(None, _trial(n=16, parsed=0, correct=0), limits)[0]
    assert verdict(None, _trial(n=15, parsed=0, correct=0), limits)[0]
    # A flat loss over fewer than MIN_DECIDE_STEPS steps is noise, not a verdict.
    kept, why = verdict(None, _trial(steps=MIN_DECIDE_STEPS - 1, loss_drop=0.0), limits)
    assert kept and "loss trend undecided" in why


def test_loss_trend_averages_the_ends() -> None:
    first, last, drop = loss_trend([(1, 4.0), (2, 4.2), (3, 3.8), (4, 2.0), (5, 2.2), (6, 1.8)])
    assert (first, last) == pytest.approx((4.0, 2.0)) and drop == pytest.approx(0.5)
    assert loss_trend([]) == (None, None, None)


def test_choose_ranks_by_the_estimate() -> None:
    def cand(model: str, acc: float, few: float) -> StudentCandidate:
        return StudentCandidate(model=model, prescreen_accuracy=few,
                                estimate=AccuracyEstimate(accuracy=acc, n=24))

    best = choose([cand("a", 0.2, 0.9), cand("b", 0.5, 0.0)])
    assert best is not None and best.model == "b"


# --- the step, for real ---------------------------------------------------------------------


class SumTask(TaskPack):
    """Digit sums answered as `Answer: N`: a format a small model learns in a few steps."""

    name: ClassVar[str] = "test-sum"

    def examples(self, split: Split) -> list[Example]:
        return [Example(id=f"{a}{b}", question=f"{a}+{b}", answer=str(a + b))
                for a in range(10) for b in range(10)]

    def prompt(self, question: str) -> str:
        return question + "="

    def extract(self, output: str) -> str | None:
        words = (last_marker_text(output) or "").split()
        return words[0] if words and words[0].isdigit() else None

    def score(self, predicted: str | None, gold: str) -> float:
        return float(predicted == gold)


class SumPlugin:
    @hookimpl
    def stratos_tasks(self) -> list[type[TaskPack]]:
        return [SumTask]


def _ctx(tmp_path: Path, task: dict[str, Any], students: list[str],
         **args: Any) -> StepContext:
    ctx = StepContext(job_id="j", run_id="r", step="prescreen", workdir=tmp_path / "w",
                      inputs={}, min_interval_s=0.0,
                      args={"task": task, "offer": msgspec.to_builtins(CPU),
                            "students": [{"model": m} for m in students], **args})
    ctx.__dict__["plugins"] = Plugins(make_plugin_manager(autoload=False, extra=[SumPlugin()]))
    return ctx


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_default_prescreen_drops_a_student_that_cannot_learn_the_format(tmp_path: Path) -> None:
    from agents.steps import prescreen

    ctx = _ctx(tmp_path, {"name": "test-sum"}, [TOO_SMALL, CAN_LEARN], trainer="full-sft",
               train={"learning_rate": 3e-3})
    result = prescreen.run(ctx)
    stu = msgspec.convert(checked("select_student", result), SelectStudentResult)
    cands = {c.model: c for c in stu.candidates}
    bad, good = cands[TOO_SMALL], cands[CAN_LEARN]
    assert not bad.kept and bad.reason.startswith("dropped: cannot learn the format")
    assert bad.trial is not None and bad.trial.parsed == 0 and bad.trial.n == 24
    assert good.kept and good.trial is not None and good.trial.format_rate >= 0.5
    assert stu.chosen == CAN_LEARN and CAN_LEARN in stu.reason
    # defaults: 24 held-out examples, a 32-step trial, every estimate with its interval
    assert stu.settings["sample_size"] == 24 and stu.settings["probe_steps"] == 32
    for c in (bad, good):
        assert c.estimate is not None and c.estimate.n == 24
        assert c.estimate.ci_low <= c.estimate.accuracy <= c.estimate.ci_high
        assert c.prescreen_n == 24 and c.prescreen_ci_high is not None
        assert "95% CI" in c.reason
    assert stu.prediction == good.estimate
    assert stu.prediction is not None and "trial fine-tune (32 steps)" in stu.prediction.basis


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_default_prescreen_drops_a_random_init_student_on_mahjong(tmp_path: Path) -> None:
    """The Mahjong derivation is a format a random-init tiny model cannot produce within the
    trial: with the defaults it is dropped, and the step says why (the demo opts out)."""
    from agents.steps import prescreen

    task = {"name": "mahjong-winning-tiles", "params": {"difficulty": 1, "n_train": 48}}
    result = prescreen.run(_ctx(tmp_path, task, ["config:tiny"], trainer="full-sft"))
    (c,) = result["candidates"]
    assert not c["kept"] and "cannot learn the format: 0/24 held-out answers parse" in c["reason"]
    assert result["chosen"] is None and result["reason"].startswith("no student kept")


# --- the report -----------------------------------------------------------------------------


def _eval(correct: int, n: int) -> dict[str, Any]:
    e = estimate(correct, n, "")
    return {"n": n, "correct": correct, "accuracy": e.accuracy, "ci_low": e.ci_low,
            "ci_high": e.ci_high, "partial": e.accuracy, "latency_ms_mean": 1.0,
            "latency_ms_p95": 1.0, "tokens_per_s": 1.0, "completion_tokens": 1,
            "split": "test"}


def _run(prediction: AccuracyEstimate, after: tuple[int, int]) -> RunInfo:
    ts = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    cand = StudentCandidate(model="s", estimate=prediction, prescreen_accuracy=0.0)
    results = {
        "select_student": {"candidates": [msgspec.to_builtins(cand)], "chosen": "s",
                           "reason": "r", "prediction": msgspec.to_builtins(prediction)},
        "evaluate": {"before": _eval(0, 40), "after": _eval(*after)},
    }
    return msgspec.convert({
        "run_id": "01jzzzzzzzzzzzzzzzzzzzzzzz", "name": "p", "state": "running",
        "stage": "report", "created": ts, "updated": ts, "results": results,
        "spec": {"name": "p", "task": {"name": "gsm8k"},
                 "teachers": [{"backend": "hf", "model": "m"}],
                 "students": [{"model": "s"}]}}, RunInfo)


def test_report_shows_the_prediction_next_to_the_outcome() -> None:
    pred = estimate(6, 24, "trial fine-tune (32 steps), held-out train examples")  # 25% [12–45%]
    run = _run(pred, (12, 40))  # 30%: inside
    line = prediction_vs_outcome(run)
    assert line.startswith("predicted 25.0% [12.0%–44.9%, n=24] (trial fine-tune (32 steps)")
    assert "measured after training 30.0% [" in line and "n=40] on the test set" in line
    assert line.endswith("within the predicted interval: the prediction held")
    assert prediction_vs_outcome(_run(pred, (30, 40))).endswith(
        "above the predicted interval: training did better than the pre-screen predicted")
    md = "\n".join(_md_student(run))
    assert "Pre-screen prediction vs outcome: predicted 25.0%" in md
    assert "25.0% [12.0%–44.9%, n=24]" in md  # the candidate table's estimate column
    stu = stage_result(run, SelectStudentResult)
    assert stu is not None and stu.prediction == pred
