"""`stratosctl export RUN --to DIR`: a run's trained student as files transformers and vLLM load.

The run's model artifact (`<run_id>/model.tar`, written by the train stage) comes over the bus
like everything else stratosctl reads; the merge runs here (plugins.models.export), so torch,
transformers and peft load only when a merge is asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stratosd.ctl.common import add_common, config_from, dump_json

if TYPE_CHECKING:
    from schemas.commands import RunInfo

DESCRIPTION = """\
Fetch a run's trained student from the daemon's artifact store and write it to DIR:

  DIR/adapter/      the LoRA adapter as trained (LoRA runs): adapter_config.json,
                    adapter_model.safetensors, tokenizer, stratos_train.json
  DIR/model/        a standard Hugging Face model: config.json (architectures),
                    model.safetensors, tokenizer + chat template, generation_config.json.
                    LoRA runs: base + adapter merged (peft merge_and_unload);
                    full-SFT runs: the model as trained
  DIR/export.json   what was written, from which run, base model and dtype

The merge runs on this machine and needs `stratos[train]` (torch, transformers, peft) and
the base model (a config: model is rebuilt here; a hub id must be in the local cache or
reachable). It holds the base in float32 while merging: plan RAM for 4 bytes per parameter."""

EPILOG = """\
examples:
  stratosctl export 01jq6x8k2m --to ./student
  stratosctl export 01jq6x8k2m --to ./student --dtype bfloat16 --force
  stratosctl export 01jq6x8k2m --to ./adapter-only --adapter-only

then:
  AutoModelForCausalLM.from_pretrained("student/model")    # transformers (+ AutoTokenizer)
  vllm serve student/model                                  # the merged model
  vllm serve BASE --enable-lora --lora-modules mine=student/adapter --max-lora-rank R
                       # the adapter (R: its rank rounded up to one vLLM accepts, printed
                       # below; BASE a local dir); requests send "model": "mine"
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the subcommand."""
    p = sub.add_parser("export", help="write a run's trained student: adapter and merged model",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("id", metavar="RUN", help="run id (see `stratosctl jobs`)")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="output directory (created; must be empty unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR, replacing its adapter/, model/ and "
                   "export.json (other files are left alone)")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: write the adapter only, no merge (needs no torch)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights of the merged model (auto: the base model's dtype)")
    add_common(p)
    p.set_defaults(func=main)


def check_target(dest: Path, *, force: bool) -> None:
    """Refuse a file, or a non-empty directory without --force, before anything is fetched."""
    from stratosd.errors import ConfigError

    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--to {dest} is a file, not a directory",
                          hint="pass a directory path (it is created)", field="to")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ConfigError(f"--to {dest} is not empty",
                          hint="choose an empty or new directory, or pass --force to replace "
                          "its adapter/, model/ and export.json", field="to")


def trained_artifact(run: RunInfo) -> tuple[str, str]:
    """(artifact key, trainer) of the run's train stage; Conflict when there is none yet."""
    from stratosd.errors import Conflict

    train: Any = run.results.get("train")
    key = str(train.get("artifact") or "") if isinstance(train, dict) else ""
    if key:
        return key, str(train.get("trainer") or "")
    if run.state in ("queued", "running"):
        hint = f"wait for its train stage to finish: stratosctl watch {run.run_id}"
    elif run.state == "completed":
        hint = "this run finished without a model artifact; its train stage log says why"
    else:
        hint = (f"it {run.state} at stage {run.stage}: go on with "
                f"`stratosctl resume {run.run_id}`, then export")
    raise Conflict(f"run {run.run_id} is not trained yet (state {run.state}, stage {run.stage})",
                   hint=hint)


async def fetch_model(args: argparse.Namespace, tar: Path) -> tuple[RunInfo, str]:
    """The run (from the daemon) and its model artifact downloaded to tar; (run, trainer)."""
    import nats.errors

    from schemas import subjects
    from schemas.commands import GetRun
    from stratosd.bus import Bus, connect
    from stratosd.errors import BusUnavailable, NotFound

    cfg = config_from(args)
    # the config names the external artifact store (and its credentials), if any
    bus = Bus(await connect(cfg, "stratosctl"), cfg)
    try:
        try:
            reply = await bus.request(subjects.daemon_cmd("run"), GetRun(run_id=args.id),
                                      timeout=10.0)
        except NotFound as exc:
            raise BusUnavailable(
                "the daemon is not running on this bus",
                hint="start it with `stratosd` (or check --nats / STRATOS_NATS_URL)") from exc
        run: RunInfo = reply.run
        key, trainer = trained_artifact(run)
        try:
            await bus.get_artifact(key, tar)
        except NotFound as exc:
            raise NotFound(f"run {run.run_id}'s model artifact {key!r} is gone from the "
                           "artifact store",
                           hint="it was deleted or its store is not reachable from here; "
                           f"retrain with `stratosctl resume {run.run_id}`") from exc
        except nats.errors.Error as exc:  # a JetStream refusal or timeout, e.g. permissions
            raise BusUnavailable(
                f"could not read artifact {key!r} from the bus: {exc or type(exc).__name__}",
                hint="on a secured bus the NATS user needs read access to the artifact store "
                "(the `operator` user of `stratosctl auth init` has none): export with a user "
                "that has it, e.g. --config naming the daemon's credentials") from exc
        return run, trainer
    finally:
        await bus.close()


def main(args: argparse.Namespace) -> int:
    """Fetch, unpack, export; print where everything went."""
    import asyncio
    import shutil
    import sys
    import tarfile
    import tempfile

    dest = Path(args.to).expanduser()
    check_target(dest, force=args.force)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=dest))
    done = False
    try:
        tar = staging / "model.tar"
        run, trainer = asyncio.run(fetch_model(args, tar))
        note = "" if args.adapter_only else " (a LoRA adapter is merged on this machine)"
        print(f"fetched run {run.run_id}'s model ({tar.stat().st_size / 2**20:.1f} MiB); "
              f"writing {dest}{note}", file=sys.stderr)
        src = staging / "src"
        with tarfile.open(tar) as fh:
            fh.extractall(src, filter="data")  # "data": no absolute paths or ../ escapes
        tar.unlink()
        from plugins.models.export import ADAPTER_DIR, MANIFEST, MODEL_DIR, export_model

        out = staging / "out"
        manifest = export_model(src, out, run_id=run.run_id, trainer=trainer,
                                merge=not args.adapter_only, dtype=args.dtype,
                                seed=run.spec.seed)
        for name in (ADAPTER_DIR, MODEL_DIR, MANIFEST):
            target = dest / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            if (out / name).exists():
                (out / name).rename(target)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done and not any(dest.iterdir()):
            dest.rmdir()  # a failed export leaves no trace
    if args.json:
        dump_json(manifest)
        return 0
    what = f"{manifest.trainer or 'trained'} {manifest.kind}"
    print(f"exported run {run.run_id} ({what} on {manifest.base_model or 'its base'}) "
          f"to {dest}")
    if manifest.adapter:
        print(f"  adapter: {dest / manifest.adapter}   (peft: PeftModel.from_pretrained(base, "
              f"this dir); vllm: --enable-lora --lora-modules NAME=this dir"
              f"{_vllm_rank_flag(dest / manifest.adapter)})")
    if manifest.model:
        how = "merged, " + manifest.dtype if manifest.merged else "as trained"
        print(f"  model:   {dest / manifest.model}   ({how}; "
              "AutoModelForCausalLM.from_pretrained(this dir); vllm serve this dir)")
    print(f"  about:   {dest / MANIFEST}")
    return 0


def _vllm_rank_flag(adapter: Path) -> str:
    """` --max-lora-rank R` for an adapter above vLLM's default rank (16), else nothing."""
    from plugins.deployers.vllm import adapter_rank, vllm_lora_rank
    from stratosd.errors import ConfigError

    try:
        rank = vllm_lora_rank(adapter_rank(adapter))
    except ConfigError as exc:
        return f"; {exc.message}"
    return f" --max-lora-rank {rank}" if rank > 16 else ""
