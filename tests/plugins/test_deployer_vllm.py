"""The vLLM deployer's command line and adapter naming: several LoRA adapters on one base,
each answering to its own `model` name. Nothing here needs vLLM, torch or a GPU.

The command line is checked against vLLM 0.34's own parser rules (copied below from
vllm/entrypoints/common/cli_args.py and vllm/engine/arg_utils.py; 0.27 has the same)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from plugins.deployers.vllm import (
    VllmDeployer,
    check_servable,
    engine_flags,
    lora_modules,
    stop_process_group,
    vllm_lora_rank,
)
from stratosd.api import DeployContext
from stratosd.errors import ConfigError, MissingDependency

# Every option the deployer may emit, as `vllm serve` registers it (vLLM 0.34: FrontendArgs
# host/port/lora_modules in cli_args.py; the rest in EngineArgs.add_cli_args).
VLLM_SERVE_FLAGS = {
    "--host", "--port", "--served-model-name", "--enable-lora", "--lora-modules",
    "--max-lora-rank", "--max-loras", "--max-cpu-loras", "--max-model-len",
    "--gpu-memory-utilization", "--dtype", "--enforce-eager",
}
# vllm/config/lora.py MaxLoRARanks (0.27 and 0.34)
VLLM_MAX_LORA_RANK_CHOICES = {1, 8, 16, 32, 64, 128, 256, 320, 512}
# vllm/entrypoints/openai/models/protocol.py LoRAModulePath fields
LORA_MODULE_PATH_FIELDS = {"name", "path", "base_model_name", "is_3d_lora_weight"}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A local base model directory (only its path matters to the command line)."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    return path


def adapter(tmp_path: Path, name: str, base: Path | str, r: int = 8,
            rank_pattern: dict[str, int] | None = None, weights: bool = True,
            **extra: object) -> Path:
    """An adapter directory as peft's save_pretrained writes it (config + weights file)."""
    path = tmp_path / name
    path.mkdir()
    cfg = {"base_model_name_or_path": str(base), "r": r, "lora_alpha": 2 * r,
           "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
           "modules_to_save": None, "rank_pattern": rank_pattern or {}, "alpha_pattern": {},
           **extra}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def ctx(model: str, adapter_dir: Path | None = None, **params: object) -> DeployContext:
    return DeployContext(model=model, adapter=adapter_dir, host="127.0.0.1", port=0,
                         served_name="student", params=dict(params))


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def lora_args(cmd: list[str]) -> list[dict[str, object]]:
    """The --lora-modules items (up to the next flag), read as vLLM's LoRAParserAction does:
    `name=path` when the item has `=` and no `,`, else JSON into LoRAModulePath."""
    start = cmd.index("--lora-modules") + 1
    end = next(i for i in range(start, len(cmd)) if cmd[i].startswith("--"))
    out = []
    for item in cmd[start:end]:
        if "=" in item and "," not in item:
            name, path = item.split("=", 1)
            out.append({"name": name, "path": path})
        else:
            parsed = json.loads(item)
            assert set(parsed) <= LORA_MODULE_PATH_FIELDS, parsed  # LoRAModulePath(**parsed)
            assert {"name", "path"} <= set(parsed)
            out.append(parsed)
    return out


def assert_vllm_accepts(cmd: list[str]) -> None:
    """`python -m vllm.entrypoints.cli.main serve MODEL --flag ...` as vLLM 0.34 parses it."""
    assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    # FlexibleArgumentParser: with --served-model-name the model must be the first positional
    assert not cmd[4].startswith("-")
    flags = {a for a in cmd[5:] if a.startswith("--")}
    assert flags <= VLLM_SERVE_FLAGS, flags - VLLM_SERVE_FLAGS
    assert "--model" not in cmd  # deprecated with `vllm serve`: "will be removed"
    if "--max-lora-rank" in cmd:
        assert int(flag(cmd, "--max-lora-rank")) in VLLM_MAX_LORA_RANK_CHOICES


def test_several_adapters_share_one_base_each_under_its_name(tmp_path: Path, base: Path) -> None:
    own = adapter(tmp_path, "own", base, r=16)
    support = adapter(tmp_path, "support", base, r=8)
    sales = adapter(tmp_path, "sales", base, r=32)
    cmd = VllmDeployer().command(
        ctx(str(base), own, adapters={"support": str(support), "sales-v2": str(sales)}), 8000)
    assert_vllm_accepts(cmd)
    assert cmd[4] == str(base)
    # requests pick by `model`: the run's adapter is the served name, the base NAME-base
    assert flag(cmd, "--served-model-name") == "student-base"
    assert "--enable-lora" in cmd
    assert lora_args(cmd) == [
        {"name": "student", "path": str(own), "base_model_name": "student-base"},
        {"name": "support", "path": str(support), "base_model_name": "student-base"},
        {"name": "sales-v2", "path": str(sales), "base_model_name": "student-base"}]
    assert flag(cmd, "--max-lora-rank") == "32"  # the largest of 16, 8, 32
    assert flag(cmd, "--max-loras") == "3"
    assert "--max-cpu-loras" not in cmd  # every adapter fits in one batch
    assert flag(cmd, "--port") == "8000" and flag(cmd, "--host") == "127.0.0.1"


def test_adapters_without_a_run_adapter_leave_the_base_under_the_served_name(
        tmp_path: Path, base: Path) -> None:
    a = adapter(tmp_path, "a", base)
    b = adapter(tmp_path, "b", base)
    cmd = VllmDeployer().command(ctx(str(base), None, adapters=[f"alpha={a}", f"beta={b}"],
                                     max_loras=1, dtype="bfloat16"), 8000)
    assert_vllm_accepts(cmd)
    assert flag(cmd, "--served-model-name") == "student"
    assert [m["name"] for m in lora_args(cmd)] == ["alpha", "beta"]
    assert flag(cmd, "--max-loras") == "1" and flag(cmd, "--dtype") == "bfloat16"
    assert flag(cmd, "--max-cpu-loras") == "2"  # the one not in the batch stays in RAM
    assert "--enforce-eager" not in cmd
    eager = VllmDeployer().command(ctx(str(base), None, enforce_eager=True), 8000)
    assert eager[-1] == "--enforce-eager"


def test_an_adapter_path_with_a_comma_or_relative_reaches_vllm_whole(
        tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM reads `name=path` as JSON when the item holds a comma: the deployer sends JSON.
    odd = adapter(tmp_path, "v1,final", base)
    monkeypatch.chdir(tmp_path)
    cmd = VllmDeployer().command(ctx(str(base), None, adapters={"odd": "v1,final"}), 8000)
    assert lora_args(cmd)[0]["path"] == str(odd)  # absolute: vLLM tries the Hub otherwise


def test_a_tenant_whose_weights_never_changed_is_the_base_under_its_name(
        tmp_path: Path, base: Path) -> None:
    # tenants' deploy passes adapters = {tenant: ref}, ref being the student itself when the
    # tenant's weights never moved: vLLM cannot load a model as an adapter, so the base
    # answers to that name too (--served-model-name takes several names).
    tuned = adapter(tmp_path, "tuned", base)
    cmd = VllmDeployer().command(ctx(str(base), None, adapters={
        "acme": str(tuned), "globex": str(base)}), 8000)
    assert_vllm_accepts(cmd)
    start = cmd.index("--served-model-name") + 1
    assert cmd[start:start + 3] == ["student", "globex", "--enable-lora"]
    assert [m["name"] for m in lora_args(cmd)] == ["acme"]
    only_base = VllmDeployer().command(ctx(str(base), None, adapters={"globex": str(base)}), 1)
    assert "--enable-lora" not in only_base
    assert only_base[only_base.index("--served-model-name") + 2] == "globex"


def test_no_adapter_serves_the_model_without_lora(base: Path) -> None:
    cmd = VllmDeployer().command(ctx(str(base), max_model_len=2048,
                                     gpu_memory_utilization=0.5), 8000)
    assert_vllm_accepts(cmd)
    assert "--enable-lora" not in cmd and "--lora-modules" not in cmd
    assert cmd[4] == str(base) and flag(cmd, "--served-model-name") == "student"
    assert flag(cmd, "--max-model-len") == "2048"
    assert flag(cmd, "--gpu-memory-utilization") == "0.5"


@pytest.mark.parametrize(("key", "value"), [
    ("max_model_len", 0), ("max_model_len", "4k"), ("max_model_len", True),
    ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5),
    ("gpu_memory_utilization", "0.9"), ("dtype", "fp16"), ("dtype", "bf16"),
])
def test_engine_params_vllm_would_refuse_fail_with_their_field(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        engine_flags({key: value})
    assert err.value.field == f"params.{key}" and err.value.hint


@pytest.mark.parametrize(("rank", "flag_value"), [(1, 1), (2, 8), (8, 8), (12, 16), (64, 64),
                                                  (200, 256), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts(rank: int, flag_value: int) -> None:
    assert vllm_lora_rank(rank) == flag_value
    assert flag_value in VLLM_MAX_LORA_RANK_CHOICES


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


def test_a_plain_lora_adapter_is_servable(tmp_path: Path, base: Path) -> None:
    for weights in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"):
        path = adapter(tmp_path, weights, base, weights=False)
        (path / weights).write_bytes(b"")
        check_servable({"a": path})


@pytest.mark.parametrize(("extra", "named"), [
    ({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "bias="),
    ({"lora_bias": True}, "lora_bias"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapters_vllm_cannot_load_are_refused_before_it_starts(
        tmp_path: Path, base: Path, extra: dict[str, object], named: str) -> None:
    # the features vLLM's PEFTHelper.validate_legal refuses (vllm/lora/peft_helper.py)
    path = adapter(tmp_path, "x", base, **extra)
    with pytest.raises(ConfigError, match=named) as err:
        check_servable({"x": path})
    assert err.value.field == "params.adapters" and "merged model" in err.value.hint


def test_an_adapter_without_weights_is_refused(tmp_path: Path, base: Path) -> None:
    path = adapter(tmp_path, "x", base, weights=False)
    with pytest.raises(ConfigError, match="no weights") as err:
        check_servable({"x": path})
    assert "save_pretrained" in err.value.hint


def test_per_module_ranks_need_a_vllm_that_reads_them(tmp_path: Path, base: Path) -> None:
    # vLLM 0.27's PEFTHelper drops rank_pattern/alpha_pattern: it would scale by lora_alpha/r
    path = adapter(tmp_path, "x", base, rank_pattern={"q_proj": 16})
    check_servable({"x": path}, lambda: True)
    with pytest.raises(ConfigError, match="rank_pattern") as err:
        check_servable({"x": path}, lambda: False)
    assert "upgrade vllm" in err.value.hint
    plain = adapter(tmp_path, "plain", base)
    check_servable({"plain": plain}, lambda: pytest.fail("asked without a pattern"))


def test_stopping_takes_the_servers_children_with_it() -> None:
    # vLLM's API server runs its engine in child processes: a SIGTERM'd leader that dies
    # first must not leave them holding the GPU.
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    stop_process_group(proc, grace_s=5)
    assert proc.returncode is not None
    for _ in range(100):  # SIGKILL is delivered, not waited for
        if not alive(child):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {child} outlived its server")


def alive(pid: int) -> bool:
    """A running process (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_without_vllm_serve_raises_missing_dependency(tmp_path: Path, base: Path) -> None:
    deployer = VllmDeployer()
    reason = deployer.unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a CUDA GPU are here: tests/gpu serves for real")
    with pytest.raises(MissingDependency) as err:
        deployer.serve(ctx(str(base), adapter(tmp_path, "own", base)))
    assert reason in err.value.message
    assert "stratos[vllm]" in err.value.hint and "builtin" in err.value.hint
