"""A job that trains QLoRA on a GPU server, pre-screened on a host without 4-bit kernels: the
trial trains unquantized and says so, the memory fit stays 4-bit, and training stays refused."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agents.stepctx import StepContext
from plugins.students.candidates import fit
from plugins.students.screen import trial_train_params
from schemas.specs import ServerOffer
from schemas.stages import SelectStudentResult
from stratosd.errors import ConfigError
from stratosd.plugins import Plugins, get_plugins, make_plugin_manager
from stratosd.results import checked
from tests.plugins.test_prescreen_policy import SumPlugin
from tests.plugins.test_trainers import AddTask, ctx_for, write_rows

# The server the job will train on: one GPU, where QLoRA's 4-bit base is what fits.
GPU = ServerOffer(id="gpu", gpu_model="T4", gpu_count=1, gpu_mem_mib=16384, ram_mib=65536)
# Big enough that its 4-bit base is visibly smaller than the bf16 one, small enough to trial.
STUDENT = "config:tiny?hidden_size=128&intermediate_size=256&num_hidden_layers=2"
QLORA = {"quantization": "4bit", "lora_r": 4, "lora_alpha": 8, "learning_rate": 3e-3}


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


no_cuda = pytest.mark.skipif(_cuda(), reason="about a host without CUDA")


def test_the_trial_drops_only_a_4bit_base_this_host_cannot_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    same, note = trial_train_params(QLORA, cuda=False)
    assert same == {**QLORA, "quantization": "none"}  # same rank, alpha, rate: only the base
    assert note == "trial ran without 4-bit quantization: no CUDA here"
    assert trial_train_params({"lora_r": 4}, cuda=False) == ({"lora_r": 4}, "")
    assert trial_train_params({**QLORA, "quantization": "none"}, cuda=False)[1] == ""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as when missing
    params, note = trial_train_params(QLORA, cuda=True)
    assert params["quantization"] == "none" and "bitsandbytes" in note
    assert "stratos[qlora]" in note


@no_cuda
def test_training_4bit_on_this_cpu_host_is_still_refused(tmp_path: Path) -> None:
    task = AddTask()
    data = write_rows(tmp_path / "d.jsonl", task, task.examples("train")[:4])
    with pytest.raises(ConfigError) as err:
        get_plugins().trainers.get("lora-sft")().train(ctx_for(tmp_path, data, task, QLORA))
    assert err.value.field == "train.quantization"
    assert "pip install stratos[qlora]" in err.value.hint


def _ctx(tmp_path: Path, **args: Any) -> StepContext:
    ctx = StepContext(job_id="j", run_id="r", step="prescreen", workdir=tmp_path / "w",
                      inputs={}, min_interval_s=0.0,
                      args={"task": {"name": "test-sum"}, "offer": msgspec.to_builtins(GPU),
                            "students": [{"model": STUDENT}], **args})
    ctx.__dict__["plugins"] = Plugins(make_plugin_manager(autoload=False, extra=[SumPlugin()]))
    return ctx


@no_cuda
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_4bit_job_is_prescreened_on_this_cpu_host_and_says_so(tmp_path: Path) -> None:
    from agents.steps import prescreen

    result = prescreen.run(_ctx(tmp_path, trainer="lora-sft", train=QLORA, probe_steps=8,
                                sample_size=16, n_shots=2, min_format_rate=0.0))
    stu = msgspec.convert(checked("select_student", result), SelectStudentResult)
    (c,) = stu.candidates
    assert c.trial is not None and c.trial.error is None and c.trial.steps == 8
    assert c.trial.trainer == "lora-sft" and c.trial.n == 16
    assert "trial ran without 4-bit quantization: no CUDA here" in c.reason
    assert stu.settings["trial_quantization"] == "none"
    # the memory fit is the target server's, with the 4-bit base the job will train on there
    (four,) = fit([STUDENT], GPU, trainer="lora-sft", seq_len=512, batch_size=8, lora_r=4,
                  quantization="4bit")
    (full,) = fit([STUDENT], GPU, trainer="lora-sft", seq_len=512, batch_size=8, lora_r=4)
    assert c.est_train_mem_mib == four.est_train_mem_mib < full.est_train_mem_mib
    assert "(4-bit base)" in c.reason
