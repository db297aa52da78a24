"""The vLLM deployer's command line and adapter naming: several LoRA adapters on one base,
each answering to its own `model` name. Nothing here needs vLLM, torch or a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugins.deployers.vllm import VllmDeployer, lora_modules, vllm_lora_rank
from stratosd.api import DeployContext
from stratosd.errors import ConfigError, MissingDependency


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A local base model directory (only its path matters to the command line)."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    return path


def adapter(tmp_path: Path, name: str, base: Path | str, r: int = 8,
            rank_pattern: dict[str, int] | None = None) -> Path:
    """An adapter directory as lora-sft writes it (its config is all the command reads)."""
    path = tmp_path / name
    path.mkdir()
    cfg = {"base_model_name_or_path": str(base), "r": r, "rank_pattern": rank_pattern or {}}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def ctx(model: str, adapter_dir: Path | None = None, **params: object) -> DeployContext:
    return DeployContext(model=model, adapter=adapter_dir, host="127.0.0.1", port=0,
                         served_name="student", params=dict(params))


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def lora_args(cmd: list[str]) -> list[str]:
    """The values after --lora-modules (up to the next flag)."""
    start = cmd.index("--lora-modules") + 1
    end = next(i for i in range(start, len(cmd)) if cmd[i].startswith("--"))
    return cmd[start:end]


def test_several_adapters_share_one_base_each_under_its_name(tmp_path: Path, base: Path) -> None:
    own = adapter(tmp_path, "own", base, r=16)
    support = adapter(tmp_path, "support", base, r=8)
    sales = adapter(tmp_path, "sales", base, r=32)
    cmd = VllmDeployer().command(
        ctx(str(base), own, adapters={"support": str(support), "sales-v2": str(sales)}), 8000)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == str(base)
    # requests pick by `model`: the run's adapter is the served name, the base NAME-base
    assert flag(cmd, "--served-model-name") == "student-base"
    assert "--enable-lora" in cmd
    assert lora_args(cmd) == [f"student={own}", f"support={support}", f"sales-v2={sales}"]
    assert flag(cmd, "--max-lora-rank") == "32"  # the largest of 16, 8, 32
    assert flag(cmd, "--max-loras") == "3"
    assert flag(cmd, "--port") == "8000"


def test_adapters_without_a_run_adapter_leave_the_base_under_the_served_name(
        tmp_path: Path, base: Path) -> None:
    a = adapter(tmp_path, "a", base)
    b = adapter(tmp_path, "b", base)
    cmd = VllmDeployer().command(ctx(str(base), None, adapters=[f"alpha={a}", f"beta={b}"],
                                     max_loras=1, dtype="bfloat16"), 8000)
    assert flag(cmd, "--served-model-name") == "student"
    assert lora_args(cmd) == [f"alpha={a}", f"beta={b}"]
    assert flag(cmd, "--max-loras") == "1" and flag(cmd, "--dtype") == "bfloat16"
    assert "--enforce-eager" not in cmd
    eager = VllmDeployer().command(ctx(str(base), None, enforce_eager=True), 8000)
    assert eager[-1] == "--enforce-eager"


def test_no_adapter_serves_the_model_without_lora(base: Path) -> None:
    cmd = VllmDeployer().command(ctx(str(base)), 8000)
    assert "--enable-lora" not in cmd and "--lora-modules" not in cmd
    assert flag(cmd, "--served-model-name") == "student"


@pytest.mark.parametrize(("rank", "flag_value"), [(1, 8), (8, 8), (12, 16), (64, 64),
                                                  (200, 256), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts(rank: int, flag_value: int) -> None:
    assert vllm_lora_rank(rank) == flag_value


def test_rank_pattern_counts_and_too_large_a_rank_is_refused(tmp_path: Path,
                                                             base: Path) -> None:
    big = adapter(tmp_path, "big", base, r=8, rank_pattern={"q_proj": 48})
    assert flag(VllmDeployer().command(ctx(str(base), big), 1), "--max-lora-rank") == "64"
    huge = adapter(tmp_path, "huge", base, r=1024)
    with pytest.raises(ConfigError, match="above vLLM's largest") as err:
        VllmDeployer().command(ctx(str(base), huge), 1)
    assert "merged model" in err.value.hint


@pytest.mark.parametrize("adapters", [
    {"bad name": "x"}, {"a=b": "x"}, {"-dash": "x"}, {"x" * 65: "x"},
    ["no-equals-sign"], ["=path"], "support=/x",
])
def test_bad_adapter_names_and_shapes_are_refused(tmp_path: Path, base: Path,
                                                   adapters: object) -> None:
    with pytest.raises(ConfigError) as err:
        lora_modules(ctx(str(base), None, adapters=adapters))
    assert err.value.field == "params.adapters" and err.value.hint


def test_names_must_be_unique_and_not_the_runs_own(tmp_path: Path, base: Path) -> None:
    own = adapter(tmp_path, "own", base)
    other = adapter(tmp_path, "other", base)
    for clash in ("student", "student-base"):
        with pytest.raises(ConfigError, match="used twice"):
            lora_modules(ctx(str(base), own, adapters={clash: str(other)}))
    with pytest.raises(ConfigError, match="used twice"):  # the base's name without own
        lora_modules(ctx(str(base), None, adapters={"student": str(other)}))
    assert list(lora_modules(ctx(str(base), own, adapters={"other": str(other)}))) == \
        ["student", "other"]


def test_a_directory_that_is_not_an_adapter_is_named(tmp_path: Path, base: Path) -> None:
    with pytest.raises(ConfigError, match="not a LoRA adapter") as err:
        lora_modules(ctx(str(base), None, adapters={"x": str(tmp_path / "missing")}))
    assert "stratosctl export" in err.value.hint


def test_an_adapter_of_another_base_is_refused(tmp_path: Path, base: Path) -> None:
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    own = adapter(tmp_path, "own", base)
    foreign = adapter(tmp_path, "foreign", other_base)
    with pytest.raises(ConfigError, match="trained on") as err:
        VllmDeployer().command(ctx(str(base), own, adapters={"foreign": str(foreign)}), 1)
    assert "own endpoint" in err.value.hint


def test_bad_max_loras_is_refused(tmp_path: Path, base: Path) -> None:
    own = adapter(tmp_path, "own", base)
    for bad in (0, "4", True):
        with pytest.raises(ConfigError) as err:
            VllmDeployer().command(ctx(str(base), own, max_loras=bad), 1)
        assert err.value.field == "params.max_loras"


def test_without_vllm_serve_raises_missing_dependency(tmp_path: Path, base: Path) -> None:
    deployer = VllmDeployer()
    reason = deployer.unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a CUDA GPU are here: tests/gpu serves for real")
    with pytest.raises(MissingDependency) as err:
        deployer.serve(ctx(str(base), adapter(tmp_path, "own", base)))
    assert reason in err.value.message
    assert "stratos[vllm]" in err.value.hint and "builtin" in err.value.hint
