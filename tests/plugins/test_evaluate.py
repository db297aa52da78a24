"""Evaluation: scoring, intervals, local and endpoint generators, run_eval, the evaluate step."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec
import pytest

from agents.stepctx import StepContext
from plugins.deployers.http_builtin import OpenAIServer
from plugins.models import hf
from plugins.models.evaluate import (
    EndpointGen,
    endpoint_generator,
    evaluate,
    local_generator,
    run_eval,
    wilson_interval,
)
from stratosd.api import Example, Split, TaskPack
from stratosd.errors import ConfigError

MAHJONG = {"name": "mahjong-winning-tiles", "params": {"n_train": 0, "n_test": 4}}


class LastWordTask(TaskPack):
    """The answer is the text after `Answer:`; half credit for the right first letter."""

    name: ClassVar[str] = "last-word"

    def examples(self, split: Split) -> list[Example]:
        return [Example(id=f"q{i}", question=f"Say w{i}", answer=f"w{i}") for i in range(6)]

    def extract(self, output: str) -> str | None:
        _, sep, rest = output.rpartition("Answer:")
        return rest.strip() or None if sep else None

    def score(self, predicted: str | None, gold: str) -> float:
        return float(predicted == gold)

    def partial_score(self, predicted: str | None, gold: str) -> float:
        if predicted == gold:
            return 1.0
        return 0.5 if predicted and predicted[0] == gold[0] else 0.0


def oracle(prompts: list[str]) -> list[EndpointGen]:
    """Answers even-numbered questions right and odd ones with a near miss."""
    outs = []
    for p in prompts:
        word = p.split("\n")[0].removeprefix("Say ")
        good = int(word[1:]) % 2 == 0
        outs.append(EndpointGen(text=f"ok\nAnswer: {word if good else 'wrong'}",
                                completion_tokens=5))
    return outs


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STRATOS_HOME", str(tmp_path / "home"))
    return hf.resolve_model("config:tiny")


def test_wilson_interval() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_evaluate_scores_and_reports_progress() -> None:
    task = LastWordTask()
    seen: list[tuple[float, float | None]] = []
    result = evaluate(task, task.examples("test"), oracle, batch_size=4,
                      progress=lambda done, total, **_: seen.append((done, total)))
    assert (result.n, result.correct, result.accuracy) == (6, 3, 0.5)
    assert result.partial == pytest.approx((3 * 1.0 + 3 * 0.5) / 6)
    assert result.ci_low < 0.5 < result.ci_high
    assert result.completion_tokens == 30 and result.errors == 0
    assert seen == [(4, 6), (6, 6)]
    assert [r.correct for r in result.records] == [True, False] * 3
    assert result.records[1].predicted == "wrong" and result.records[1].gold == "w1"
    assert msgspec.json.decode(msgspec.json.encode(result))["accuracy"] == 0.5


def test_records_are_limited() -> None:
    task = LastWordTask()
    result = evaluate(task, task.examples("test"), oracle, max_records=2)
    assert len(result.records) == 2 and result.n == 6


def test_local_tiny_model_end_to_end(tiny: str) -> None:
    task = LastWordTask()
    gen = local_generator("config:tiny", max_new_tokens=6)
    result = evaluate(task, task.examples("test"), gen, batch_size=4)
    assert result.n == 6 and 0.0 <= result.accuracy <= 1.0
    assert 0 < result.completion_tokens <= 36
    assert result.latency_ms_mean > 0 and result.tokens_per_s > 0


def test_endpoint_generator_matches_local_generation(tiny: str) -> None:
    task = LastWordTask()
    examples = task.examples("test")
    local = evaluate(task, examples, local_generator(tiny, max_new_tokens=6))
    with OpenAIServer(tiny, served_name="tiny") as srv:
        remote = evaluate(task, examples, endpoint_generator(srv.url, "tiny", 6, concurrency=3),
                          batch_size=3)
        auto = endpoint_generator(srv.url.removesuffix("/v1"), "", 6)  # model from /v1/models
        assert auto(["Say w0"])[0].error is None
    assert [r.output for r in remote.records] == [r.output for r in local.records]
    assert remote.completion_tokens == local.completion_tokens
    assert remote.prompt_tokens == local.prompt_tokens


@pytest.mark.parametrize("ref", ["config:qwen2-tiny", "config:llama3-tiny-tied"])
def test_endpoint_and_local_agree_for_chat_template_students(ref: str) -> None:
    task = LastWordTask()
    examples = task.examples("test")[:4]
    path = hf.resolve_model(ref)
    local = evaluate(task, examples, local_generator(path, max_new_tokens=6))
    with OpenAIServer(path, served_name="student") as srv:
        remote = evaluate(task, examples, endpoint_generator(srv.url, "student", 6,
                                                             concurrency=2))
    assert remote.errors == 0
    assert [r.output for r in remote.records] == [r.output for r in local.records]
    # The same rendered prompt on both sides (the chat template, Llama-3's BOS once).
    assert remote.prompt_tokens == local.prompt_tokens > 0
    assert remote.completion_tokens == local.completion_tokens


def test_endpoint_failures_count_as_errors(tiny: str) -> None:
    task = LastWordTask()
    with OpenAIServer(tiny, served_name="tiny", faults={500: 1.0}) as srv:
        gen = endpoint_generator(srv.url, "tiny", 4, retries=1)
        result = evaluate(task, task.examples("test")[:2], gen)
    assert result.errors == 2 and result.correct == 0
    assert "HTTP 500" in (result.records[0].error or "")


def test_run_eval_with_a_real_task_pack(tiny: str) -> None:
    out = run_eval(MAHJONG["name"], MAHJONG["params"], model="config:tiny", limit=3,
                   batch_size=2, max_new_tokens=8)
    assert out["n"] == 3 and out["task"] == MAHJONG["name"] and out["split"] == "test"
    assert len(out["records"]) == 3


def test_run_eval_needs_exactly_one_target() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        run_eval(MAHJONG["name"], MAHJONG["params"])


def test_evaluate_step(tiny: str, tmp_path: Path) -> None:
    from agents.steps import evaluate as step

    ctx = StepContext(job_id="j1", run_id="r1", step="evaluate", workdir=tmp_path / "w",
                      inputs={"model": Path(tiny)},
                      args={"task": MAHJONG, "model": "config:base", "limit": 3,
                            "batch_size": 2, "max_new_tokens": 8})
    result = step.run(ctx)
    assert result["n"] == 3 and result["model"] == tiny  # the input replaced args.model
    assert len(result["records"]) <= 20
    msgspec.json.encode(result)
    progress = [m for m in ctx.messages if m["kind"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 3


def test_evaluate_step_rejects_unknown_args(tmp_path: Path) -> None:
    from agents.steps import evaluate as step

    ctx = StepContext(job_id="j1", run_id="r1", step="evaluate", workdir=tmp_path,
                      inputs={}, args={"task": MAHJONG, "model": "config:tiny", "batchsize": 2})
    with pytest.raises(ConfigError) as info:
        step.run(ctx)
    assert info.value.field == "args.batchsize"
