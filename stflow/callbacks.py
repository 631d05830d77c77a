"""Lightning callbacks shared by the studies (they know nothing of the domain)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import pytorch_lightning as pl

__all__ = ["EpochRecorder", "GracefulInterrupt"]


class GracefulInterrupt(pl.Callback):
    """The first Ctrl-C while training stops the run at the next batch boundary, a second one at once.

    A ``KeyboardInterrupt`` raised wherever the signal lands (inside the optimiser step, between the step and the
    weight average...) leaves a checkpoint no resumed run can continue exactly. This callback only records the
    first Ctrl-C and raises ``KeyboardInterrupt`` at the next ``on_train_batch_start`` (or at the end of
    training), where the previous batch is complete; Lightning then saves ``last.ckpt`` as on any Ctrl-C. Only
    in a single-process run started from the main thread: DDP ranks would stop at different batches.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after the current batch (press Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = False
        main = threading.current_thread() is threading.main_thread()
        # SIGINT ignored (a background job of a script): keep ignoring it, as Python itself does.
        if trainer.world_size == 1 and main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        if self.requested:  # Ctrl-C during the last validation: stop before testing
            raise KeyboardInterrupt

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()


class EpochRecorder(pl.Callback):
    """Records, per epoch, the validation-loop metrics ``val_keys``, the epoch-level ``train_keys`` and the training
    wall time (without validation).

    The row of an epoch is written at ``on_validation_end``, before the checkpoint callbacks (Lightning runs them
    last), so every checkpoint holds the history up to its own epoch and a resumed run keeps its earlier epochs.
    Epoch-level training metrics only exist after validation; they complete the row at ``on_train_epoch_end``.
    The history is restored from a checkpoint only into an empty recorder: ``trainer.test(ckpt_path=best)`` after
    ``fit`` must not roll it back to the best epoch.
    """

    def __init__(self, val_keys: Sequence[str], train_keys: Sequence[str] = ()) -> None:
        self.val_keys, self.train_keys = tuple(val_keys), tuple(train_keys)
        self.history: list[dict[str, float]] = []
        self._t0: float | None = None
        self._train_s: float = float("nan")

    def _metric(self, trainer: pl.Trainer, key: str) -> float:
        v = trainer.callback_metrics.get(key)
        return float(v) if v is not None else float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()  # a run resumed mid-epoch has no on_train_epoch_start for that epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            self._train_s = time.perf_counter() - self._t0
            self._t0 = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        row = {"epoch": float(trainer.current_epoch), "train_s": self._train_s}
        row.update({k: self._metric(trainer, k) for k in self.val_keys})
        self.history.append(row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1]["epoch"] != trainer.current_epoch:  # no validation this epoch
            train_s = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
            self.history.append({"epoch": float(trainer.current_epoch), "train_s": train_s})
        self._t0 = None
        self.history[-1].update({k: self._metric(trainer, k) for k in self.train_keys})

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.history:
            self.history = [dict(h) for h in state_dict.get("history", [])]
