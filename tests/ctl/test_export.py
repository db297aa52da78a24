"""`stratosctl export`: a really trained tiny LoRA adapter, stored as a run's model artifact on a
real daemon's bus, exported by the real CLI; the merged model must compute what base + adapter
compute, and the exported adapter must load with peft."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.base import new_id, utc_now
from schemas.commands import RunInfo
from schemas.specs import RunSpec
from schemas.subjects import artifact_key
from stratosd.ctl import main
from tests.conftest import ROOT
from tests.plugins.test_trainers import AddTask, ctx_for, write_rows

BASE = "config:qwen2-tiny"  # a BPE tokenizer with a ChatML chat template
HEAVY = ("torch", "transformers", "peft", "nats", "numpy")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A LoRA adapter really trained by the lora-sft plugin (a few steps: B must be non-zero)."""
    from stratosd.plugins import get_plugins

    tmp = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRATOS_HOME", str(tmp / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        task = AddTask()
        data = write_rows(tmp / "data.jsonl", task, task.examples("train")[:32])
        trainer = get_plugins().trainers.get("lora-sft")()
        trainer.train(ctx_for(tmp, data, task, {
            "max_steps": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 8,
            "save_steps": 1000, "cpu_threads": 1}, model=BASE))
    yield tmp / "out"


def spec() -> RunSpec:
    return msgspec.convert({"name": "export-test", "task": {"name": "test-add"},
                            "teachers": [{"backend": "reference", "model": "reference"}],
                            "students": [{"model": BASE}]}, RunSpec)


async def add_run(daemon: Any, state: str, stage: str,
                  results: dict[str, Any] | None = None) -> str:
    """A run in the daemon's store, as the pipeline leaves it."""
    now = utc_now()
    run = RunInfo(run_id=new_id(), name="export-test", state=state,  # type: ignore[arg-type]
                  stage=stage, created=now, updated=now, spec=spec(), results=results or {})
    await daemon.store.create(run)
    return run.run_id


async def add_trained_run(daemon: Any, model_dir: Path, tmp_path: Path) -> str:
    """A completed run whose train stage uploaded model_dir as `<run_id>/model.tar`."""
    run_id = new_id()
    tar = tmp_path / "model.tar"
    with tarfile.open(tar, "w") as fh:  # as agents.runner packs a directory output
        fh.add(model_dir, arcname=".")
    key = artifact_key(run_id, "model.tar")
    await daemon.bus.put_artifact(key, tar)
    now = utc_now()
    await daemon.store.create(RunInfo(
        run_id=run_id, name="export-test", state="completed", stage="report", created=now,
        updated=now, spec=spec(), results={"train": {
            "artifact": key, "trainer": "lora-sft", "model": BASE, "final_loss": 1.0}}))
    return run_id


async def ctl(daemon: Any, *args: str) -> tuple[int, str, str]:
    """The real stratosctl against the daemon's bus: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stratosd.ctl", "--nats", daemon.url, *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    return int(proc.returncode or 0), out.decode(), err.decode()


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_lora_run_exports_adapter_and_an_equivalent_merged_model(
        daemon: Any, trained_adapter: Path, tmp_path: Path) -> None:
    run_id = await add_trained_run(daemon, trained_adapter, tmp_path)
    out = tmp_path / "student"
    rc, stdout, stderr = await ctl(daemon, "export", run_id, "--to", str(out))
    assert rc == 0, stderr
    assert f"fetched run {run_id}'s model" in stderr and "merged on this machine" in stderr
    assert f"exported run {run_id} (lora-sft adapter on {BASE})" in stdout
    assert f"adapter: {out / 'adapter'}" in stdout and f"model:   {out / 'model'}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "export.json", "model"]

    # the adapter as trained, byte for byte
    for f in trained_adapter.iterdir():
        assert (out / "adapter" / f.name).read_bytes() == f.read_bytes(), f.name
    manifest = json.loads((out / "export.json").read_text())
    assert manifest == {"run_id": run_id, "kind": "adapter", "trainer": "lora-sft",
                        "base_model": BASE, "adapter": "adapter", "model": "model",
                        "merged": True, "dtype": "float32",
                        "architectures": ["Qwen2ForCausalLM"]}

    # a standard HF directory: what vLLM reads to pick and load the model
    from plugins.models.export import layout_problems

    model_dir = out / "model"
    assert layout_problems(model_dir) == []
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("adapter_*"))

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from plugins.models.hf import load_model, resolve_model

    merged: Any = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    trained_tok = AutoTokenizer.from_pretrained(str(trained_adapter))
    assert tok.chat_template and tok.chat_template == trained_tok.chat_template
    base_dir = resolve_model(BASE)
    assert GenerationConfig.from_pretrained(str(model_dir)).eos_token_id == \
        GenerationConfig.from_pretrained(base_dir).eos_token_id  # the chat eos ids survive

    messages = [{"role": "user", "content": "3+4"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == trained_tok.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids

    # the reference: base + the exported adapter, loaded with peft
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = logits(base, ids)
    peft_model: Any = PeftModel.from_pretrained(base, str(out / "adapter"))
    ref = logits(peft_model.eval(), ids)
    got = logits(merged.eval(), ids)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(ref, base_logits, atol=1e-3)  # the adapter changes something
    # and the project's own loader (adapter dir on its config: base) agrees
    own, _ = load_model(str(out / "adapter"))
    assert torch.allclose(logits(own, ids), ref, atol=1e-5, rtol=1e-4)

    # --force writes over it; --adapter-only drops the stale merged model, strays stay
    (out / "NOTES.txt").write_text("mine")
    rc, stdout, stderr = await ctl(daemon, "export", run_id, "--to", str(out), "--force",
                                   "--adapter-only", "--json")
    assert rc == 0, stderr
    assert json.loads(stdout)["model"] is None
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt", "adapter", "export.json"]


def test_full_model_is_exported_as_trained(tmp_path: Path) -> None:
    import shutil

    from transformers import AutoModelForCausalLM

    from plugins.models.export import export_model, layout_problems
    from plugins.models.hf import resolve_model

    full = tmp_path / "full"  # what full-sft writes: a model dir and its train card
    shutil.copytree(resolve_model(BASE), full)
    (full / "stratos_train.json").write_text(json.dumps(
        {"base_model": BASE, "kind": "full", "metrics": {"trainer": "full-sft"}}))
    manifest = export_model(full, tmp_path / "out", run_id="r1")
    assert (manifest.kind, manifest.trainer, manifest.base_model) == ("full", "full-sft", BASE)
    assert manifest.adapter is None and manifest.model == "model" and not manifest.merged
    model_dir = tmp_path / "out" / "model"
    assert not (tmp_path / "out" / "adapter").exists()
    assert (model_dir / "model.safetensors").read_bytes() == \
        (full / "model.safetensors").read_bytes()
    assert layout_problems(model_dir) == []
    AutoModelForCausalLM.from_pretrained(str(model_dir))
    from stratosd.errors import ConfigError

    with pytest.raises(ConfigError, match="exported as trained"):
        export_model(full, tmp_path / "again", dtype="bfloat16")


@pytest.mark.slow
def test_merge_can_cast_to_bfloat16(trained_adapter: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from plugins.models.export import export_model

    manifest = export_model(trained_adapter, tmp_path / "bf16", dtype="bfloat16")
    assert manifest.dtype == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16" / "model"), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_not_an_artifact_of_a_train_stage_is_named(tmp_path: Path) -> None:
    from plugins.models.export import export_model
    from stratosd.errors import ConfigError

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dataset.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="neither a LoRA adapter") as err:
        export_model(tmp_path / "src", tmp_path / "out")
    assert "dataset.jsonl" in err.value.message and err.value.hint


async def test_missing_untrained_and_lost_runs_are_refused_with_a_hint(
        daemon: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "x")
    rc, _, err = await ctl(daemon, "export", "01jnosuchrun00000000000000", "--to", out)
    assert rc == 4 and "error: no run with id '01jnosuchrun00000000000000'" in err
    assert "stratosctl jobs" in err and "Traceback" not in err

    running = await add_run(daemon, "running", "synthesize")
    rc, _, err = await ctl(daemon, "export", running, "--to", out)
    assert rc == 4
    assert f"error: run {running} is not trained yet (state running, stage synthesize)" in err
    assert f"hint: wait for its train stage to finish: stratosctl watch {running}" in err

    failed = await add_run(daemon, "failed", "train")
    rc, _, err = await ctl(daemon, "export", failed, "--to", out)
    assert rc == 4 and f"stratosctl resume {failed}" in err

    lost = await add_run(daemon, "completed", "report", {"train": {
        "artifact": "01jlost0000000000000000000/model.tar", "trainer": "lora-sft"}})
    rc, _, err = await ctl(daemon, "export", lost, "--to", out)
    assert rc == 4 and "is gone from the artifact store" in err
    assert not (tmp_path / "x").exists()  # a failed export leaves nothing behind


def test_a_non_empty_dir_is_refused_before_the_bus_is_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kept.txt").write_text("x")
    # no NATS listens on port 9: a bus call would fail with exit 3, not 2
    rc = main(["--nats", "nats://127.0.0.1:9", "export", "01jrun", "--to", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: --to {tmp_path} is not empty" in err and "--force" in err
    rc = main(["--nats", "nats://127.0.0.1:9", "export", "01jrun",
               "--to", str(tmp_path / "kept.txt")])
    assert rc == 2 and "is a file" in capsys.readouterr().err


def test_help_teaches_and_imports_nothing_heavy() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stratosd.ctl", "export",
                           "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    text = proc.stdout
    for needle in ("--to DIR", "--force", "--adapter-only", "--dtype", "DIR/adapter/",
                   "DIR/model/", "merge_and_unload", "vllm serve", "--lora-modules",
                   "stratos[train]"):
        assert needle in text, needle
