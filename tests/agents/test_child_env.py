"""A job's child gets none of the agent's bus credentials: not in its environment, and the
agent's password file is unreadable to it (Landlock), while the rest of the disk is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.runner import worker_env
from agents.worker import HIDDEN_PATHS_ENV, credential_files
from stratosd.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"STRATOS_NATS_PASSWORD": "pw-in-env", "STRATOS_NATS_PASSWORD_FILE": "/x/pw",
           "STRATOS_NATS_USER": "agent-gpu-1", "STRATOS_NATS_CREDS": "/x/a.creds",
           "NATS_TOKEN": "tok", "NATS_PASSWORD": "pw2", "STRATOS_S3_SECRET": "s3"}
KEPT = {"OPENAI_API_KEY": "sk-teacher", "STRATOS_HOME": "/var/lib/stratos",
        "STRATOS_JOB_THREADS": "2"}

# A step that tries to steal the agent's credentials, run by the real worker entry point
# (agents.worker.main hides the files first); what it finds comes back as its result.
THIEF = """
import os, sys, types
def run(ctx):
    def read(path):
        try:
            with open(path) as fh:
                return fh.read()
        except OSError as exc:
            return type(exc).__name__
    env = {k: v for k, v in os.environ.items()
           if "NATS" in k or "PASSWORD" in k or "CREDS" in k
           or k.endswith(("TOKEN", "SECRET"))}
    return {"env": env, "password": read(sys.argv[2]), "sibling": read(sys.argv[3]),
            "teacher_key": os.environ.get("OPENAI_API_KEY"),
            "hidden_paths_env": os.environ.get("HIDDEN_ENV")}
mod = types.ModuleType("agents.steps.probe")
mod.run = run
sys.modules["agents.steps.probe"] = mod
from agents.worker import main
sys.exit(main([sys.argv[1]]))
""".replace("HIDDEN_ENV", HIDDEN_PATHS_ENV)


def test_child_env_leaves_out_the_bus_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(k, v)
    env = worker_env(2, ["/etc/stratos/agent-gpu-1.password"])
    assert not set(SECRETS) & set(env)
    assert not any(v in env.values() for v in SECRETS.values())
    assert {k: env[k] for k in KEPT} == KEPT
    assert env[HIDDEN_PATHS_ENV] == "/etc/stratos/agent-gpu-1.password"
    assert HIDDEN_PATHS_ENV not in worker_env(0)


def test_credential_files_come_from_the_agents_config() -> None:
    cfg = AgentConfig(agent_id="gpu-1", nats_password_file="/etc/stratos/agent-gpu-1.password",
                      nats_creds="~/a.creds")
    assert credential_files(cfg)[0] == "/etc/stratos/agent-gpu-1.password"
    assert credential_files(cfg)[1].endswith("/a.creds") and "~" not in credential_files(cfg)[1]
    assert credential_files(AgentConfig(agent_id="gpu-1")) == []


def _landlock() -> bool:
    probe = "from agents.worker import hide_paths; import sys; " \
            "sys.exit(0 if hide_paths([sys.argv[1]]) else 1)"
    return subprocess.run([sys.executable, "-c", probe, __file__], cwd=ROOT,
                          check=False).returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="Landlock is Linux only")
def test_a_job_cannot_read_the_agents_credentials(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if not _landlock():
        pytest.skip("this kernel has no Landlock")
    etc = tmp_path / "etc-stratos"
    etc.mkdir()
    password = etc / "agent-gpu-1.password"
    password.write_text("s3cret-password\n")
    sibling = etc / "agent-gpu-1.env"  # beside it, readable: only the secret is hidden
    sibling.write_text("STRATOS_AGENT_ID=gpu-1\n")
    for k, v in {**SECRETS, **KEPT, "STRATOS_NATS_PASSWORD_FILE": str(password)}.items():
        monkeypatch.setenv(k, v)
    work = tmp_path / "job"
    work.mkdir()
    job = work / "job.json"
    job.write_text(json.dumps({"job_id": "thief-1", "run_id": "r1", "step": "probe",
                               "args": {}, "inputs": {}, "workdir": str(work),
                               "state_dir": str(tmp_path / "state")}))
    cfg = AgentConfig(agent_id="gpu-1", nats_password_file=str(password))
    proc = subprocess.run([sys.executable, "-c", THIEF, str(job), str(password), str(sibling)],
                          cwd=ROOT, env=worker_env(1, credential_files(cfg)),
                          capture_output=True, text=True, timeout=60, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result = next((m["result"] for m in lines if m.get("kind") == "result"), None)
    assert result is not None, (proc.returncode, proc.stdout, proc.stderr)
    assert result["env"] == {}
    assert result["password"] == "PermissionError"
    assert result["sibling"] == "STRATOS_AGENT_ID=gpu-1\n"
    assert result["teacher_key"] == "sk-teacher"  # what steps need stays
    assert result["hidden_paths_env"] is None
    # the agent itself still reads it
    assert password.read_text() == "s3cret-password\n"
