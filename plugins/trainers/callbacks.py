"""The Stratos TrainerCallback: a transformers Trainer loop reported through the step context.

Progress (loss, learning rate, tokens/s, ETA) every few seconds, a checkpoint upload after each
save, a graceful stop (save, then leave the loop) when the agent asks, and each step's wall time.
Built lazily so importing this module does not import transformers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stratosd.api import TrainContext

if TYPE_CHECKING:
    from transformers import Trainer as HFTrainer

MAX_STEP_TIMES = 1000  # per-step durations kept in the metrics (bounded: they travel on the bus)


def _transformers_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


def make_callback(ctx: TrainContext, *, interval_s: float = 2.0) -> Any:
    """A transformers TrainerCallback reporting to ctx (built lazily: no import at module top)."""
    base = _transformers_callback_base()

    class StratosCallback(base):  # type: ignore[misc, valid-type]
        """Progress every interval_s, ctx.checkpoint after each save, stop on ctx.should_stop()."""

        def __init__(self) -> None:
            self.first_loss: float | None = None
            self.last_loss: float | None = None
            self.learning_rate: float | None = None
            self.first_reward: float | None = None
            self.last_reward: float | None = None
            self.logged_tokens = 0
            self.losses: list[tuple[int, float]] = []
            self.stopped = False
            self.checkpoints: list[str] = []
            self._t0 = time.monotonic()
            self._last_report = 0.0
            self._start_step = 0
            self._start_tokens = 0
            self._last_step_end = self._t0
            self.train_time_s = 0.0
            self.step_times: list[float] = []

        def tokens(self, state: Any) -> int:
            return max(int(state.num_input_tokens_seen or 0), self.logged_tokens)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = self._last_step_end = time.monotonic()
            self._start_step = state.global_step
            self._start_tokens = self.tokens(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "num_tokens" in logs:
                self.logged_tokens = int(logs["num_tokens"])
            if "reward" in logs:
                self.last_reward = float(logs["reward"])
                if self.first_reward is None:
                    self.first_reward = self.last_reward
            if "learning_rate" in logs:
                self.learning_rate = float(logs["learning_rate"])
            if "loss" in logs and math.isfinite(float(logs["loss"])):
                loss = float(logs["loss"])
                if self.first_loss is None:
                    self.first_loss = loss
                self.last_loss = loss
                self.losses.append((int(state.global_step), loss))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.monotonic()
            self.train_time_s = now - self._t0
            if len(self.step_times) < MAX_STEP_TIMES:
                self.step_times.append(now - self._last_step_end)
            self._last_step_end = now
            if ctx.should_stop():
                # Save at this step, then leave the loop: the resume continues from here.
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            # The final report comes from run_hf_trainer, after the last loss is logged.
            if now - self._last_report >= interval_s and state.global_step < state.max_steps:
                self._last_report = now
                self.report(state)

        def report(self, state: Any, *, force: bool = False) -> None:
            done_steps = state.global_step - self._start_step
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            tokens = self.tokens(state) - self._start_tokens
            eta = (state.max_steps - state.global_step) * elapsed / done_steps if done_steps else 0
            metrics: dict[str, float] = {"tokens_per_s": tokens / elapsed, "eta_s": eta,
                                         "elapsed_s": elapsed}
            if self.last_loss is not None:
                metrics["loss"] = self.last_loss
            if self.learning_rate is not None:
                metrics["learning_rate"] = self.learning_rate
            if self.last_reward is not None:
                metrics["reward"] = self.last_reward
            ctx.progress(done=state.global_step, total=state.max_steps, unit="step",
                         message=f"step {state.global_step}/{state.max_steps}",
                         force=force, **metrics)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                self.checkpoints.append(str(path))
                ctx.checkpoint(path)

    return StratosCallback()


def drop_printer(trainer: HFTrainer) -> None:
    """Remove transformers' PrinterCallback: logs travel as progress events, not stdout."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
