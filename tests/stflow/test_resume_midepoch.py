"""A run stopped in the middle of an epoch (Ctrl-C) resumes bit for bit: same weights, same weight average, same
CSV rows (the resumed epoch's metrics cover all its samples), with 0 and 2 loader workers; the Ctrl-C message
names the command that continues the run, and the CLI exits with 130."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from stflow import train
from stflow.data import CrowdFlowDataModule
from stflow.runner import RunConfig, TrainingInterrupted, fit
from stflow.system import ForecastingSystem

EPOCHS = 2


def _args(city: Path, out: Path, *extra: str) -> list[str]:
    """ACFM (dropout) with weight averaging, 9 batches of 32 per epoch, every step logged."""
    return ["--data-dir", str(city), "--test-days", "2", "--batch-size", "32", "--no-progress-bar", "--out-dir",
            str(out), "--json", "--epochs", str(EPOCHS), "--ema-decay", "0.9", "--run.log_every_n_steps", "1", *extra]


class RaiseAt(pl.Callback):
    """A programmatic stop: ``KeyboardInterrupt`` from ``on_train_batch_end`` of (epoch, batch)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            raise KeyboardInterrupt


class CtrlCAt(pl.Callback):
    """A real Ctrl-C: SIGINT sent to this process in the middle of the step of (epoch, batch), after its loss."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """Ctrl-C handled as in a terminal (default_int_handler), even where the test runner ignores SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _with_callback(monkeypatch: pytest.MonkeyPatch, callback: pl.Callback) -> None:
    """Make ``stflow.train`` fit with ``callback`` too."""
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda system, dm, cfg, callbacks=(): real_fit(system, dm, cfg,
                                                                                       [*callbacks, callback]))


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def _assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights (model, weight average, its update count) and identical CSV rows."""
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys() and any(k.startswith("ema_model.") for k in wa)
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"{len(differing)} of {len(wa)} tensors differ: {differing[:5]}"
    rows_a, rows_b = _rows(a), _rows(b)
    epoch_rows = [r for r in rows_b if r["train_loss_epoch"]]
    assert len(epoch_rows) == EPOCHS and all(r["train_samples"] == "259.0" for r in epoch_rows)  # every sample
    assert rows_b == rows_a  # step rows, epoch rows (train_loss_epoch, train_rmse, ...), validation and test rows


def test_stop_from_a_callback_resumes_bit_exactly(tiny_city: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A: 2 epochs. Run B: stopped at the end of batch 3 of epoch 1 (Lightning saves last.ckpt on the
    exception), then resumed. Before the resumable loader this replayed/missed samples (epoch 1's row covered 160
    of 259 samples, train_loss_epoch 0.4878 vs 0.5367; 153 of 161 tensors differed)."""
    a, b = tmp_path / "a", tmp_path / "b"
    straight = train.main(_args(tiny_city, a))
    with monkeypatch.context() as patch:
        _with_callback(patch, RaiseAt(1, 3))
        with pytest.raises(TrainingInterrupted) as stop:
            train.main(_args(tiny_city, b))
    assert (stop.value.epoch, stop.value.batch, stop.value.batches) == (1, 4, 9)
    assert stop.value.checkpoint == b / "checkpoints" / "last.ckpt"
    saved = torch.load(stop.value.checkpoint, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 4}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train.main(_args(tiny_city, b, "--resume"))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    _assert_same_run(a, b)
    assert resumed["test"] == straight["test"]


def _runner_fit(city: Path, out: Path, workers: int, callbacks: list[pl.Callback], resume: bool = False,
                epochs: int = EPOCHS) -> None:
    """The runner directly (stflow.train has no workers option): ACFM, EMA, a data module with ``workers``."""
    dm = CrowdFlowDataModule(data_dir=str(city), test_days=2, batch_size=32, seed=7, num_workers=workers)
    dm.setup("fit")
    pl.seed_everything(7, verbose=False)
    system = ForecastingSystem.from_datamodule("acfm_bikenyc", dm, ema_decay=0.9, lr_milestones={})
    cfg = RunConfig(out_dir=str(out), max_epochs=epochs, seed=7, accelerator="cpu", devices=1, progress_bar=False,
                    loggers=("csv",), log_every_n_steps=1, gradient_clip_val=0.1, resume=resume, test=False)
    fit(system, dm, cfg, callbacks=callbacks)


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_mid_step_stops_at_the_next_batch_and_resumes_bit_exactly(
        tiny_city: Path, tmp_path: Path, workers: int, capsys: pytest.CaptureFixture, terminal_sigint: None) -> None:
    """A SIGINT landing inside batch 2's step of epoch 1 lets that batch finish and stops before batch 3; the
    resumed run (worker processes draw indices ahead: those are not consumed) equals the uninterrupted one."""
    a, b = tmp_path / "a", tmp_path / "b"
    _runner_fit(tiny_city, a, workers, [])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        _runner_fit(tiny_city, b, workers, [CtrlCAt(1, 2)])
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's "ignore Ctrl-C" does not outlive fit
    assert (stop.value.epoch, stop.value.batch) == (1, 3)
    assert "stopping after the current batch" in capsys.readouterr().err
    _runner_fit(tiny_city, b, workers, [], resume=True)
    _assert_same_run(a, b)


def test_end_of_epoch_resume_with_workers_keeps_the_epoch_order(tiny_city: Path, tmp_path: Path) -> None:
    """Worker processes draw a loader's indices when its iterator is created, which a resumed Lightning run does
    before ``set_epoch``: the resumed epoch 1 used to replay epoch 0's order (152 of 161 tensors differed)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _runner_fit(tiny_city, a, 2, [])
    _runner_fit(tiny_city, b, 2, [], epochs=1)
    _runner_fit(tiny_city, b, 2, [], resume=True)
    _assert_same_run(a, b)


def _cli(argv: list[str], callback: pl.Callback | None, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with monkeypatch.context() as patch:
        if callback is not None:
            _with_callback(patch, callback)
        code = train.cli(argv)
    return code, capsys.readouterr().err


def test_ctrl_c_message_names_the_command_that_continues(tiny_city: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, terminal_sigint: None) -> None:
    out = tmp_path / "run"
    argv = _args(tiny_city, out, "--overwrite", "--limit-train-batches", "3")
    code, err = _cli(argv, CtrlCAt(0, 1), monkeypatch, capsys)
    assert code == 130 and "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("interrupted at")]
    assert len(last) == 1, err[-2000:]
    message = last[0]
    prefix = f"interrupted at epoch 0 (batch 2 of 3); state saved to {out / 'checkpoints' / 'last.ckpt'}; "
    assert message.startswith(prefix + "continue with: python -m stflow.train ")
    command = shlex.split(message.split("continue with: ", 1)[1])
    expected = [a for a in argv if a != "--overwrite"] + ["--resume"]
    assert command[3:] == expected
    code, err = _cli(command[3:], None, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]) == 3 * EPOCHS


@pytest.mark.parametrize(("argv", "expected"), [
    (["--epochs", "3"], ["--epochs", "3", "--resume"]),
    (["--resume", "old.ckpt", "--epochs", "3"], ["--epochs", "3", "--resume"]),
    (["--run.resume=old.ckpt", "--overwrite=true", "--json"], ["--json", "--resume"]),
    (["--overwrite", "--out-dir", "x"], ["--out-dir", "x", "--resume"]),
    (["--resume"], ["--resume"]),
])
def test_resume_arguments(argv: list[str], expected: list[str]) -> None:
    assert train.resume_arguments(argv) == expected


def test_interrupt_without_a_checkpoint_says_nothing_was_saved() -> None:
    stop = TrainingInterrupted(0, 0, 9, None)
    assert train.interrupt_message(stop, []) == "interrupted at epoch 0 (batch 0 of 9); no checkpoint was saved, " \
                                                "nothing to resume"
