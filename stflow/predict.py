"""``python -m stflow.predict``: forecasts of a checkpoint in original units, with their timestamps, written to a file.

The history is read from ``--data-dir`` (the dataset's flow files, as the data layer keeps them); the external
vectors are built from the timestamps, holidays and meteorology exactly as in training
(:class:`stflow.forecast.Forecaster`). ``--start``/``--end`` (slot starts, inclusive) default to the data's test
period (a direct head: the test slots whose K forecast slots all lie in the test period, the origins
``stflow.evaluate`` scores). ``--out`` by extension: ``.h5`` (the DeepST layout of the input files: ``data``
(N, 2, H, W), ``date``), ``.npz`` or ``.csv`` (:func:`stflow.forecast.write_forecast`). A checkpoint with a direct
multi-step head (``stflow.train --horizon K``, direct mode) writes one K-step forecast from each slot of the period:
all K steps (``data``/``flows`` (N, K, 2, H, W); the CSV gets a ``step`` column).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from stflow.config import parse_cli, run_cli
from stflow.forecast import Forecaster, write_forecast

__all__ = ["PredictConfig", "main", "predict"]


@dataclass(frozen=True)
class PredictConfig:
    """``python -m stflow.predict`` options (also YAML keys through ``--config``)."""

    checkpoint: str  # a stflow .ckpt, or the authors' .pt with --model
    out: str  # .h5 | .npz | .csv
    model: str | None = None  # for the authors' state dict: acfm_reference_bikenyc|acfm_reference_taxibj
    data_dir: str | None = None  # the history (flow files; holidays/meteorology); default: the checkpoint's
    dataset: str | None = None  # default: the checkpoint's
    start: str | None = None  # first forecast slot, e.g. "2014-09-21 00:00" (default: the first test target)
    end: str | None = None  # last forecast slot (default: the last test target)

    def validate(self) -> None:
        if not self.out.lower().endswith((".h5", ".hdf5", ".npz", ".csv")):
            raise ValueError(f"--out must end with .h5, .npz or .csv, got {self.out!r}")
        import pandas as pd

        times = {}
        for key in ("start", "end"):
            value = getattr(self, key)
            if value is not None:
                try:
                    times[key] = pd.Timestamp(value)
                except ValueError:
                    raise ValueError(f"--{key}: cannot read {value!r} as a time (e.g. 2014-09-21T08:00)") from None
        if len(times) == 2 and times["start"] > times["end"]:
            raise ValueError(f"--start {times['start']} is after --end {times['end']}")


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Run ``cfg``; returns ``out``, ``slots``, ``first``, ``last`` and the forecaster's dataset."""
    import numpy as np

    from stflow.data import load_crowd_flow, origin_samples
    from stflow.forecast import model_horizon

    forecaster = Forecaster.from_checkpoint(cfg.checkpoint, cfg.model, cfg.data_dir, cfg.dataset)
    if forecaster.data_dir is None:
        raise ValueError("--data-dir is required (the checkpoint records no data folder)")
    data = load_crowd_flow(forecaster.spec, forecaster.data_dir, forecaster.options)
    test = data.split("test")
    steps = model_horizon(forecaster.model)
    origins = origin_samples(test, data.timestamps, data.slots_per_day, np.arange(len(test)), steps,
                             int(test.target[-1]))  # every test target at one step
    if not len(origins):
        raise ValueError(f"no test slot has {steps} consecutive forecast slots inside the test period")
    start = cfg.start or str(data.timestamps[test.target[0]])
    end = cfg.end or (str(data.timestamps[test.target[origins[-1]]]) if cfg.start is None else None)
    forecast = forecaster.predict(data.flows, data.timestamps, start=start, end=end or start)
    path = write_forecast(forecast, cfg.out)
    result = {"out": str(path), "dataset": forecaster.spec.name, "slots": len(forecast.timestamps),
              "first": str(forecast.timestamps[0]), "last": str(forecast.timestamps[-1]),
              "grid": list(forecast.values.shape[-2:]), "units": "original (counts per slot)"}
    if forecast.steps > 1:
        result["steps"] = forecast.steps  # slots per forecast (a direct head); "first"/"last": forecast starts
    return result


def _json_flag(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object only")


def main(args: list[str] | None = None) -> dict[str, Any]:
    cfg, extras = parse_cli(PredictConfig, args, prog="python -m stflow.predict",
                            description=__doc__.split("\n\n")[0], extra=_json_flag)
    result = predict(cfg)
    if not extras.get("json"):
        steps = f" of {result['steps']} steps each" if result.get("steps", 1) > 1 else ""
        print(f"wrote {result['slots']} forecasts{steps} ({result['first']} .. {result['last']}, grid "
              f"{result['grid'][0]}x{result['grid'][1]}, original units) to {result['out']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
