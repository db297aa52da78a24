"""Synthesis step against a real local HTTP teacher: kill/resume, dedupe, failures, counts.

The teacher is a small OpenAI-compatible server in this process whose answers come from
data (the task's worked solutions), so every call is counted where it is paid: at the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agents.stepctx import StepContext
from agents.steps import synthesize
from agents.steps.probe import run as run_probe
from plugins.tasks.gsm8k import Gsm8kTask
from schemas.specs import TaskSpec, TeacherScore
from stratosd.api import DataRow
from stratosd.errors import Infeasible

REPO = Path(__file__).resolve().parents[2]
# Reply = ("ok", text) | ("garbage", None) | ("hang", None) | ("status", code)
Brain = Callable[[str, int | None], tuple[str, Any]]


class TeacherServer:
    """An OpenAI-compatible chat endpoint whose answers come from a brain function.

    `answered` counts responses actually delivered (what an API bills); an optional gate
    holds requests after the first `gate_after` until released.
    """

    def __init__(self, brain: Brain, *, delay_s: float = 0.0) -> None:
        self.brain = brain
        self.delay_s = delay_s
        self.received = 0
        self.answered = 0
        self.lock = threading.Lock()
        self.gate_after: int | None = None
        self.gate = threading.Event()
        self.held = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.received += 1
                    n = outer.received
                if outer.gate_after is not None and n > outer.gate_after:
                    outer.held.set()
                    outer.gate.wait(30)
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                prompt = body["messages"][-1]["content"]
                kind, value = outer.brain(prompt, body.get("seed"))
                try:
                    if kind == "hang":
                        time.sleep(2.0)
                        return
                    if kind == "garbage":
                        self._send(200, b"<html>upstream exploded</html>")
                    elif kind == "status":
                        self._send(value, b'{"error": {"message": "nope"}}')
                    else:
                        text = str(value)
                        payload = {
                            "id": f"c{n}", "object": "chat.completion",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": len(prompt.split()),
                                      "completion_tokens": len(text.split()),
                                      "total_tokens": 0},
                        }
                        self._send(200, json.dumps(payload).encode())
                    with outer.lock:
                        outer.answered += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died: nothing delivered, nothing billed

            def _send(self, code: int, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> TeacherServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def gsm8k_brain(task: Gsm8kTask, *, wrong: Callable[[str, int | None], bool] | None = None,
                special: Callable[[str], str | None] | None = None) -> Brain:
    """Answers gsm8k prompts (forward or injection) with the worked solution.

    `wrong(example_id, seed)` → a wrong final answer; `special(example_id)` → another reply
    kind (garbage, hang).
    """
    by_prompt: dict[str, Any] = {}
    for ex in task.examples("train"):
        by_prompt[task.prompt(ex.question)] = ex
        by_prompt[task.injection_prompt(ex.question, ex.answer)] = ex

    def brain(prompt: str, seed: int | None) -> tuple[str, Any]:
        ex = by_prompt[prompt]
        kind = special(ex.id) if special else None
        if kind:
            return kind, None
        if wrong is not None and wrong(ex.id, seed):
            return "ok", f"I am not sure.\n1 + 1 = 2\nAnswer: {int(ex.answer) + 1}"
        return "ok", f"{ex.meta['solution']}\nAnswer: {ex.answer}"

    return brain


def make_ctx(tmp: Path, args: dict[str, Any],
             stop_flag: Callable[[], bool] | None = None) -> StepContext:
    return StepContext(job_id="j1", run_id="r1", step="synthesize", args=args,
                       workdir=tmp / "work", inputs={}, state_dir=tmp / "state",
                       min_interval_s=0.0, stop_flag=stop_flag)


def synth_args(base_url: str, *, n_train: int, **extra: Any) -> dict[str, Any]:
    teacher_params = {"base_url": base_url, "max_retries": 0, "timeout_s": 10}
    teacher_params.update(extra.pop("teacher_params", {}))
    return {
        "task": {"name": "gsm8k", "params": {"synthetic": True, "n_train": n_train,
                                              "n_test": 5}},
        "teacher": {"backend": "openai", "model": "local-teacher", "params": teacher_params},
        "mode": "alignment", "tries": 2, "concurrency": 4, **extra,
    }


def read_rows(path: Path) -> list[DataRow]:
    return [msgspec.json.decode(line, type=DataRow)
            for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def task() -> Gsm8kTask:
    return Gsm8kTask({"synthetic": True, "n_train": 30, "n_test": 5})


def test_alignment_dataset_counts_and_provenance(tmp_path: Path, task: Gsm8kTask) -> None:
    with TeacherServer(gsm8k_brain(task)) as srv:
        ctx = make_ctx(tmp_path, synth_args(srv.base_url, n_train=30))
        result = synthesize.run(ctx)
    rows = read_rows(ctx.output("dataset.jsonl"))
    assert result["kept"] == len(rows) == 30
    assert result["tries_total"] == srv.answered == 30
    assert result["by_mode"] == {"alignment": 30}
    assert result["by_teacher"] == {"openai:local-teacher": 30}
    assert result["verified"] == 30  # gsm8k has a verifier and every solution passes it
    assert all(r.mode == "alignment" and r.tries == 1 and r.verified for r in rows)
    assert all(r.target.endswith(f"Answer: {r.answer}") for r in rows)
    final = [m for m in ctx.messages if m["kind"] == "progress"][-1]
    assert final["done"] == final["total"] == 30 and final["unit"] == "rows"
    assert {"rows_per_s", "eta_s"} <= set(final["metrics"])


def test_rejection_sampling_keeps_only_verified_rows(tmp_path: Path, task: Gsm8kTask) -> None:
    # Wrong on even seeds: the first greedy try is often wrong, a later sample may be right.
    def wrong(_eid: str, seed: int | None) -> bool:
        return seed is None or seed % 2 == 0

    with TeacherServer(gsm8k_brain(task, wrong=wrong)) as srv:
        ctx = make_ctx(tmp_path, synth_args(srv.base_url, n_train=30, tries=3))
        result = synthesize.run(ctx)
    rows = read_rows(ctx.output("dataset.jsonl"))
    assert 0 < len(rows) < 30 and result["dropped"] == 30 - len(rows)
    assert result["tries_total"] == srv.answered > 30
    assert any(r.tries > 1 for r in rows)
    for r in rows:  # nothing unverified slipped through
        assert task.verify(r.question, r.reasoning, r.answer) is True
        assert task.score(task.extract(r.target), r.answer) == 1.0


def test_injection_falls_back_to_reference(tmp_path: Path, task: Gsm8kTask) -> None:
    with TeacherServer(gsm8k_brain(task, wrong=lambda _e, _s: True)) as srv:
        ctx = make_ctx(tmp_path, synth_args(srv.base_url, n_train=10, mode="injection",
                                            tries=2))
        result = synthesize.run(ctx)
    rows = read_rows(ctx.output("dataset.jsonl"))
    assert len(rows) == 10 and srv.answered == 20
    assert result["by_teacher"] == {"reference": 10}
    assert all(r.teacher == "reference" and r.verified is True and r.tries == 3 for r in rows)


def test_garbage_and_timeouts_mark_rows_failed(tmp_path: Path, task: Gsm8kTask) -> None:
    bad = {"gsm8k-syn1-train-00002": "garbage", "gsm8k-syn1-train-00005": "hang"}
    with TeacherServer(gsm8k_brain(task, special=bad.get)) as srv:
        args = synth_args(srv.base_url, n_train=8, use_reference=False,
                          teacher_params={"timeout_s": 0.3})
        ctx = make_ctx(tmp_path, args)
        result = synthesize.run(ctx)
    rows = read_rows(ctx.output("dataset.jsonl"))
    assert result["failed"] == 2 and result["kept"] == 6 == len(rows)
    assert {r.example_id for r in rows}.isdisjoint(bad)
    journal = (tmp_path / "state" / synthesize.JOURNAL).read_text().splitlines()
    failed = {e["example_id"]: e["error"] for e in map(json.loads, journal)
              if e["status"] == "failed"}
    assert set(failed) == set(bad)
    assert "malformed" in failed["gsm8k-syn1-train-00002"]
    assert "timeout" in failed["gsm8k-syn1-train-00005"]


def test_stop_request_keeps_the_journal_and_a_rerun_finishes(
    tmp_path: Path, task: Gsm8kTask
) -> None:
    from stratosd.errors import JobFailed

    bad = {"gsm8k-syn1-train-00001": "garbage"}
    with TeacherServer(gsm8k_brain(task, special=bad.get)) as srv:
        args = synth_args(srv.base_url, n_train=30, concurrency=1, use_reference=False)
        journal = tmp_path / "state" / synthesize.JOURNAL
        ctx = make_ctx(tmp_path, args,
                       stop_flag=lambda: len(journal.read_text().splitlines()) >= 5)
        with pytest.raises(JobFailed, match="stopped at 5/30"):
            synthesize.run(ctx)
        assert srv.answered == 6  # 4 good examples + the garbage one tried twice
        bad.clear()  # the endpoint recovered: the failed example is retried, nothing else
        result = synthesize.run(make_ctx(tmp_path, args))
    assert result["kept"] == 30 and result["resumed"] == 4
    assert srv.answered == 6 + 26 and result["tries_total"] == 32


def test_dedupe_same_question_and_target(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "Capital of France?", "answer": "Paris"}] * 3 + [
        {"question": "Capital of Italy?", "answer": "Rome"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def brain(prompt: str, _seed: int | None) -> tuple[str, Any]:
        city = "Paris" if "France" in prompt else "Rome"
        return "ok", f"It is well known.\nAnswer: {city}"

    with TeacherServer(brain) as srv:
        args = synth_args(srv.base_url, n_train=0)
        args["task"] = {"name": "jsonl-qa", "params": {"train_path": str(data),
                                                       "test_path": str(data)}}
        ctx = make_ctx(tmp_path, args)
        result = synthesize.run(ctx)
    out = read_rows(ctx.output("dataset.jsonl"))
    assert result["rows"] == 4 and result["duplicates"] == 2 and len(out) == 2
    assert len({(r.question, r.target) for r in out}) == 2


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    j = synthesize.Journal(tmp_path, "fp")
    j.append(synthesize.Entry(example_id="a", status="dropped", calls=1))
    j.close()
    with open(tmp_path / synthesize.JOURNAL, "ab") as fh:
        fh.write(b'{"example_id": "b", "sta')  # killed mid-write
    j = synthesize.Journal(tmp_path, "fp")
    assert set(j.entries) == {"a"}
    j.append(synthesize.Entry(example_id="c", status="dropped"))
    j.close()
    assert set(synthesize.Journal(tmp_path, "fp").entries) == {"a", "c"}
    # Other arguments: the journal is set aside, not reused.
    assert synthesize.Journal(tmp_path, "other").entries == {}


_CHILD = """
import json, sys
from pathlib import Path
from agents.stepctx import StepContext
from agents.steps import synthesize
tmp = Path(sys.argv[1])
ctx = StepContext(job_id="j1", run_id="r1", step="synthesize", args=json.loads(sys.argv[2]),
                  workdir=tmp / "work", inputs={}, state_dir=tmp / "state")
print(json.dumps(synthesize.run(ctx)))
"""


@pytest.fixture
def child_env() -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH")) if x)
    yield env


def test_resume_after_sigkill_pays_each_call_once(
    tmp_path: Path, task: Gsm8kTask, child_env: dict[str, str]
) -> None:
    with TeacherServer(gsm8k_brain(task)) as srv:
        srv.gate_after = 12  # the 13th request is held until the child is dead
        args = json.dumps(synth_args(srv.base_url, n_train=30, concurrency=1))
        log_path = tmp_path / "child.log"
        with open(log_path, "wb") as log_fh:  # a file, not a pipe: a full pipe would block it
            child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), args],
                                     cwd=REPO, env=child_env, stdout=log_fh,
                                     stderr=subprocess.STDOUT)
        journal = tmp_path / "state" / synthesize.JOURNAL
        try:
            assert srv.held.wait(50), log_path.read_text()[-2000:]
            # Held request in flight and 12 rows journaled: kill without any cleanup.
            assert len(journal.read_text().splitlines()) == 12
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        srv.gate.set()
        srv.gate_after = None
        ctx = make_ctx(tmp_path, json.loads(args))
        result = synthesize.run(ctx)
        time.sleep(0.05)  # let the held handler notice its client is gone
    rows = read_rows(ctx.output("dataset.jsonl"))
    assert [r.example_id for r in rows] == [ex.id for ex in task.examples("train")]
    assert len({(r.question, r.target) for r in rows}) == 30
    assert result["resumed"] == 12 and result["kept"] == 30
    assert srv.answered == 30  # no call paid twice
    assert result["tries_total"] == 30


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    from stratosd.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        synthesize.run(make_ctx(tmp_path, synth_args("http://127.0.0.1:9/v1", n_train=1,
                                                     tries=0)))
    assert err.value.field == "tries"
    with pytest.raises(ConfigError, match="unknown mode"):
        synthesize.run(make_ctx(tmp_path, synth_args("http://127.0.0.1:9/v1", n_train=1,
                                                     mode="telepathy")))


# --- probe and the strategy it drives ----------------------------------------------------


def probe_ctx(tmp: Path, args: dict[str, Any]) -> StepContext:
    return StepContext(job_id="j2", run_id="r1", step="probe", args=args,
                       workdir=tmp / "probe", inputs={}, min_interval_s=0.0)


def write_qa(path: Path, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    return {"name": "jsonl-qa", "params": {"train_path": str(path), "test_path": str(path)},
            "probe_size": 10}


def kb_brain(kb: dict[str, str]) -> Brain:
    """A teacher that knows exactly the facts in kb and guesses otherwise."""

    def brain(prompt: str, _seed: int | None) -> tuple[str, Any]:
        question = prompt.splitlines()[0]
        if question in kb:
            return "ok", f"I recall this fact.\nAnswer: {kb[question]}"
        return "ok", "I have never heard of it.\nAnswer: Atlantis"

    return brain


def test_probe_accuracy_comes_from_the_data_and_drives_the_mode(tmp_path: Path) -> None:
    from stratosd.plugins import get_plugins

    known = [(f"What is the code of item {i}?", f"K{i * 7}") for i in range(12)]
    unknown = [(f"What is the code of gadget {i}?", f"G{i * 3}") for i in range(12)]
    plugins = get_plugins()
    with TeacherServer(kb_brain(dict(known))) as srv:
        teacher = {"backend": "openai", "model": "kb", "name": "kb",
                   "params": {"base_url": srv.base_url, "max_retries": 0}}
        chosen = {}
        for label, pairs in (("known", known), ("unknown", unknown)):
            task = write_qa(tmp_path / f"{label}.jsonl", pairs)
            out = run_probe(probe_ctx(tmp_path / label, {"task": task, "teachers": [teacher],
                                                         "seed": 1}))
            [score] = out["scores"]
            assert score["n"] == 10 and out["best"] == "kb"
            ts = msgspec.convert(score, TeacherScore)
            chosen[label] = (ts.accuracy, plugins.choose_mode(
                msgspec.convert(task, TaskSpec), ts, 0.5))
    assert chosen == {"known": (1.0, "alignment"), "unknown": (0.0, "injection")}


def test_probe_ranks_by_accuracy_within_budget(tmp_path: Path, task: Gsm8kTask) -> None:
    spec = {"name": "gsm8k", "params": {"synthetic": True, "n_train": 30, "n_test": 5},
            "probe_size": 8}
    wrong_half = gsm8k_brain(task, wrong=lambda eid, _s: int(eid[-1]) % 2 == 0)
    with TeacherServer(gsm8k_brain(task)) as good, TeacherServer(wrong_half) as meh:
        def teacher(name: str, srv: TeacherServer, price: float) -> dict[str, Any]:
            return {"backend": "openai", "model": name, "name": name,
                    "params": {"base_url": srv.base_url, "max_retries": 0,
                               "price_in_per_mtok": price, "price_out_per_mtok": price}}

        teachers = [teacher("pricey", good, 1000.0), teacher("cheap", meh, 1.0),
                    {"backend": "openai", "model": "down", "name": "down",
                     "params": {"base_url": "http://127.0.0.1:1/v1", "max_retries": 0}},
                    {"backend": "reference", "model": "gsm8k", "name": "ref"}]
        out = run_probe(probe_ctx(tmp_path, {"task": spec, "teachers": teachers}))
        scores = {s["name"]: s for s in out["scores"]}
        assert scores["pricey"]["accuracy"] == 1.0 and out["best"] == "pricey"
        assert 0.0 < scores["cheap"]["accuracy"] < 1.0
        for broken in ("down", "ref"):  # errors on everything: a score, not a crash
            assert scores[broken]["accuracy"] == 0.0 and scores[broken]["error"]
        assert "known answers" in scores["ref"]["error"]
        budget = (out["projected_cost_usd"]["pricey"] + out["projected_cost_usd"]["cheap"]) / 2
        out = run_probe(probe_ctx(tmp_path, {"task": spec, "teachers": teachers[:2],
                                             "budget_usd": budget}))
        assert out["best"] == "cheap"
        with pytest.raises(Infeasible, match="budget_usd"):
            run_probe(probe_ctx(tmp_path, {"task": spec, "teachers": teachers[:2],
                                           "budget_usd": 0.0}))


@pytest.mark.slow
@pytest.mark.timeout(180)  # a child process imports torch: slow on a loaded host
def test_random_tiny_hf_teacher_probes_at_zero_and_gets_injection(tmp_path: Path) -> None:
    from stratosd.plugins import get_plugins

    spec = {"name": "gsm8k", "params": {"synthetic": True, "n_train": 20, "n_test": 5},
            "probe_size": 4}
    ctx = probe_ctx(tmp_path, {"task": spec, "max_new_tokens": 12, "teachers": [
        {"backend": "hf", "model": "config:tiny", "name": "tiny"}]})
    out = run_probe(ctx)
    ts = msgspec.convert(out["scores"][0], TeacherScore)
    assert ts.error is None and ts.accuracy == 0.0 and ts.tokens_out > 0
    assert get_plugins().choose_mode(TaskSpec(name="gsm8k"), ts, 0.5) == "injection"
    progress = [m for m in ctx.messages if m["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 4
    assert "tiny" in progress[-1]["message"]
