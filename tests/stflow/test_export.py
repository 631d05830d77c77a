"""``stflow.export``: every registered network exported to ONNX and TorchScript gives eager's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stflow import export
from stflow.models.registry import build_model, list_models

# (grid, ext_dim): the reference ACFMs need the authors' vectors (33 BikeNYC, 77 TaxiBJ).
KEYWORDS = {"grid_shape": (6, 4), "ext_dim": 33, "len_closeness": 4, "len_period": 2, "len_trend": 1,
            "slots_per_day": 24}
NETWORKS = [m for m in list_models() if m != "historical_average"]


def _keywords(name: str) -> dict:
    kw = dict(KEYWORDS)
    if name.startswith("acfm_reference"):
        kw["len_trend"] = 0
    if name == "acfm_reference_taxibj":
        kw.update(ext_dim=77, slots_per_day=48)
    return kw


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", NETWORKS)
def test_exported_equals_eager(name: str, fmt: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    kw = _keywords(name)
    model = build_model(name, **kw).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so eval-mode BN is really exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    out = tmp_path / f"{name}.{fmt}"
    sidecar = export.export_model(model, kw, fmt, out, {"model": name})
    assert json.loads(Path(str(out) + ".json").read_text())["inputs"] == sidecar["inputs"]
    assert export.check_export(out, fmt, model, kw, batch=3) < 1e-4  # another batch size than the traced 2
    assert export.check_export(out, fmt, model, kw, batch=1) < 1e-4


def test_historical_average_is_refused(tmp_path: Path) -> None:
    model = build_model("historical_average", **KEYWORDS)
    with pytest.raises(ValueError, match="lookup table indexed by the target slot"):
        export.export_model(model, KEYWORDS, "onnx", tmp_path / "ha.onnx")


def test_cli_exports_the_authors_checkpoint(shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "acfm.onnx"
    sidecar = export.main(["--checkpoint", str(shared / "checkpoints" / "atfm" / "bikenyc.pt"), "--model",
                           "acfm_reference_bikenyc", "--out", str(out)])
    assert sidecar["max_abs_diff_vs_eager"] < 1e-4
    assert sidecar["inputs"]["closeness"] == ["batch", 4, 2, 16, 8] and sidecar["inputs"]["ext_target"] == ["batch", 33]
    assert sidecar["scaler"] == {"min": 0.0, "max": 267.0}
    assert "max |diff|" in capsys.readouterr().out
    code = export.run_cli(export.main, ["--checkpoint", str(shared / "checkpoints" / "atfm" / "bikenyc.pt"),
                                        "--out", str(out), "--format", "tflite"])
    assert code == 2
