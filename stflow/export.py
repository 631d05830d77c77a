"""``python -m stflow.export``: a checkpoint's network as ONNX or TorchScript, with a JSON sidecar of its inputs.

Every registered network takes the batch dict; the exported graph takes its tensors as positional inputs in the
order of :data:`INPUT_ORDER`, restricted to the groups the model's window uses (``closeness (B, lc, 2, H, W)``,
``period``, ``trend``, ``ext_closeness (B, lc, D)``, ..., ``ext_target (B, D)``; no ``ext_*`` when D = 0), all
float32 and SCALED to [-1, 1] (``x -> 2 (x - min) / (max - min) - 1`` with the sidecar's ``scaler``); the output is
the scaled prediction ``(B, 2, H, W)``. A direct multi-step head (model option ``horizon`` K > 1, in the
checkpoint's model keywords) takes ``ext_target (B, K, D)`` (the vector of each target slot) and outputs
``(B, K, 2, H, W)``. The batch axis is dynamic. ``<out>.json`` records the inputs, their shapes,
the scaler and the model name. ONNX needs the optional extra ``pip install "stflow[export]"`` (``onnx``;
``onnxruntime`` to run it); the legacy TorchScript-based ONNX exporter is used (no ``onnxscript`` needed).

The historical average (a table indexed by the target slot) has no graph to export: it is refused.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from stflow.config import parse_cli, run_cli

__all__ = ["ExportConfig", "INPUT_ORDER", "export_model", "input_spec", "main", "example_inputs"]

INPUT_ORDER = ("closeness", "period", "trend", "ext_closeness", "ext_period", "ext_trend", "ext_target")


class _Positional(nn.Module):
    """``forward(*tensors)`` -> ``model(dict(zip(names, tensors)))`` (tracing and ONNX need positional inputs)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(dict(zip(self.names, tensors)))


def input_spec(keywords: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Input name -> shape without the batch axis, from the data keywords (grid_shape, ext_dim, len_*) and the
    model's ``horizon`` when it has a direct head."""
    h, w = (int(v) for v in keywords["grid_shape"])
    ext_dim = int(keywords["ext_dim"])
    spec: dict[str, tuple[int, ...]] = {}
    lengths = {k: int(keywords[f"len_{k}"]) for k in ("closeness", "period", "trend")}
    for key, n in lengths.items():
        if n > 0:
            spec[key] = (n, 2, h, w)
    if ext_dim > 0:
        for key, n in lengths.items():
            if n > 0:
                spec[f"ext_{key}"] = (n, ext_dim)
        steps = int(keywords.get("horizon", 1))
        spec["ext_target"] = (ext_dim,) if steps == 1 else (steps, ext_dim)  # a direct head: one per target slot
    return {k: spec[k] for k in INPUT_ORDER if k in spec}


def example_inputs(spec: dict[str, tuple[int, ...]], batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Random float32 inputs of ``spec`` (frames in [-1, 1], external vectors in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(batch, *shape, generator=g) * (2 if not k.startswith("ext") else 1)
                - (1 if not k.startswith("ext") else 0)) for k, shape in spec.items()}


def export_model(model: nn.Module, keywords: dict[str, Any], fmt: str, out: str | Path,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``out`` as ``onnx`` or ``torchscript``; writes ``<out>.json``; returns it."""
    from stflow.models.baselines import HistoricalAverage

    if isinstance(model, HistoricalAverage):
        raise ValueError("historical_average is a lookup table indexed by the target slot, not a network: "
                         "nothing to export (use stflow.predict)")
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown format {fmt!r}; choose onnx or torchscript")
    model = model.eval()
    spec = input_spec(keywords)
    names = tuple(spec)
    wrapper = _Positional(model, names).eval()
    inputs = tuple(example_inputs(spec).values())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / legacy-exporter notices
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, inputs, check_trace=False)
            traced.save(str(out))
        else:
            try:
                import onnx  # noqa: F401
            except ImportError as err:
                raise ValueError('ONNX export needs the onnx package: pip install "stflow[export]"') from err
            torch.onnx.export(wrapper, inputs, str(out), input_names=list(names), output_names=["prediction"],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "prediction": {0: "batch"}},
                              opset_version=17, dynamo=False)
    steps = int(keywords.get("horizon", 1))
    output = ["batch", *([steps] if steps > 1 else []), 2, *[int(v) for v in keywords["grid_shape"]]]
    sidecar = {"format": fmt, "inputs": {k: ["batch", *v] for k, v in spec.items()}, "output": {"prediction": output},
               "layout": "frames most recent first, scaled to [-1, 1]; output scaled to [-1, 1]", **(meta or {})}
    Path(str(out) + ".json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def load_for_export(checkpoint: str | Path, model: str | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """(network, data keywords, metadata) of a stflow checkpoint or the authors' state dict."""
    import dataclasses

    from stflow.evaluate import load_checkpoint
    from stflow.system import ForecastingSystem

    loaded, data = load_checkpoint(checkpoint, model)
    options = dict(data.get("options") or {})
    meta: dict[str, Any] = {"checkpoint": str(checkpoint), "dataset": data.get("dataset"),
                            "scaler": {"min": options.get("scale_min"), "max": options.get("scale_max")}}
    if isinstance(loaded, ForecastingSystem):
        keywords = dict(loaded.hparams.get("model_kwargs") or {})
        meta["model"] = loaded.hparams.get("model")
        return loaded.eval_model, keywords, meta
    cfg = dataclasses.asdict(loaded.config)
    meta["model"] = model
    return loaded, {k: cfg[k] for k in ("grid_shape", "ext_dim", "len_closeness", "len_period", "len_trend")}, meta


@dataclass(frozen=True)
class ExportConfig:
    """``python -m stflow.export`` options (also YAML keys through ``--config``)."""

    checkpoint: str  # a stflow .ckpt, or the authors' .pt with --model
    out: str  # the exported file (.onnx / .pt); <out>.json describes its inputs
    format: Literal["onnx", "torchscript"] = "onnx"
    model: str | None = None  # for the authors' state dict: acfm_reference_bikenyc|acfm_reference_taxibj
    check: bool = True  # run the exported model once and compare with eager (onnxruntime for ONNX, when installed)


def check_export(path: str | Path, fmt: str, model: nn.Module, keywords: dict[str, Any], batch: int = 3) -> float:
    """Max |exported - eager| on random inputs of batch ``batch`` (another batch size than the traced one)."""
    import numpy as np

    spec = input_spec(keywords)
    inputs = example_inputs(spec, batch=batch, seed=1)
    with torch.no_grad():
        eager = model.eval()(dict(inputs)).numpy()
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(*inputs.values()).numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}  # unused inputs are pruned from the graph
        got = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in wanted})[0]
    return float(np.abs(got - eager).max())


def main(args: list[str] | None = None) -> dict[str, Any]:
    cfg, _ = parse_cli(ExportConfig, args, prog="python -m stflow.export", description=__doc__.split("\n\n")[0])
    model, keywords, meta = load_for_export(cfg.checkpoint, cfg.model)
    sidecar = export_model(model, keywords, cfg.format, cfg.out, meta)
    print(f"exported {meta['model']} ({cfg.format}) to {cfg.out}; inputs "
          + ", ".join(f"{k} {tuple(v)}" for k, v in sidecar["inputs"].items()))
    if cfg.check:
        try:
            diff = check_export(cfg.out, cfg.format, model, keywords)
        except ImportError:
            print("check skipped: onnxruntime is not installed")
        else:
            sidecar["max_abs_diff_vs_eager"] = diff
            print(f"exported vs eager on a batch of 3 random inputs: max |diff| {diff:.2e}")
    print(json.dumps({"out": cfg.out, **sidecar}))
    return sidecar


if __name__ == "__main__":
    sys.exit(run_cli(main))
