"""Transfer to dense prediction: digit scenes, feature taps, the dense head/system (mIoU vs numpy) and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nas.data.digits import digits_split_indices
from nas.data.scenes import BACKGROUND, NUM_CLASSES, SPLITS, DigitScenesDataModule
from nas.export import block_strings, build_network, build_network_from_strings
from nas.search.groundtruth import sample_architectures
from nas.spaces.hytra import build_hytra_network, hytra_digits
from nas.transfer import (
    DNA_DIGITS_ARCH,
    DenseModel,
    SegConfig,
    SegmentationSystem,
    load_backbone,
    load_space,
    transfer_seg,
)
from nas.transfer.__main__ import main as transfer_main


def _scenes(**kw) -> DigitScenesDataModule:
    args = dict(num_scenes=(12, 6, 6), canvas=32, min_digits=2, max_digits=3, scales=(1, 2), seed=3)
    args.update(kw)
    dm = DigitScenesDataModule(**args)
    dm.setup()
    return dm


def test_scene_labels_match_pasted_digits():
    digits = load_digits()
    dm = _scenes()
    for split in SPLITS:
        scenes = dm.scenes[split]
        for image, labels, placements in zip(scenes.images, scenes.labels, scenes.placements):
            assert 2 <= len(placements) <= 3
            want_x = np.zeros_like(image)
            want_y = np.full(labels.shape, BACKGROUND)
            for p in placements:
                assert p.label == digits.target[p.source]
                big = digits.images[p.source].repeat(p.scale, 0).repeat(p.scale, 1)  # independent upscaling
                box = (slice(p.top, p.top + 8 * p.scale), slice(p.left, p.left + 8 * p.scale))
                assert not want_x[box].any() and (want_y[box] == BACKGROUND).all()  # boxes never overlap
                want_x[box] = big
                want_y[box] = np.where(big >= 4.0, p.label, BACKGROUND)
            np.testing.assert_array_equal(image, want_x)
            np.testing.assert_array_equal(labels, want_y)
            # every pasted digit's stroke carries its class, and nothing else is labelled
            assert set(np.unique(labels)) == {BACKGROUND} | {p.label for p in placements}
    # the standardized tensors are the images on the digits classifier's scale
    x, y = dm.tensors["test"]
    assert x.shape == (6, 1, 32, 32) and y.shape == (6, 32, 32) and y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy() * dm.std + dm.mean, dm.scenes["test"].images, atol=1e-4)


def test_scenes_deterministic_by_seed():
    a, b, c = _scenes(), _scenes(), _scenes(seed=4)
    for split in SPLITS:
        np.testing.assert_array_equal(a.scenes[split].images, b.scenes[split].images)
        np.testing.assert_array_equal(a.scenes[split].labels, b.scenes[split].labels)
    assert not np.array_equal(a.scenes["train"].images, c.scenes["train"].images)


def test_splits_share_no_source_image():
    dm = _scenes(num_scenes=(200, 100, 100))
    parts = digits_split_indices(0)
    used = {s: {p.source for scene in dm.scenes[s].placements for p in scene} for s in SPLITS}
    for s in SPLITS:
        assert used[s] <= set(parts[s].tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    assert len(used["train"]) > 300  # many distinct digits, not a handful reused


def test_bad_scene_settings_rejected():
    with pytest.raises(ValueError, match="scales"):
        _scenes(canvas=16, scales=(3,))
    with pytest.raises(ValueError, match="min_digits"):
        _scenes(min_digits=3, max_digits=2)


def _numpy_iou(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (truth.ravel(), pred.ravel()), 1)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    return np.array([tp[c] / union[c] if union[c] else np.nan for c in range(k)])


class _Echo(nn.Module):
    """Returns the one-hot logits of the prediction carried in the input (x: (B, 1, H, W) class ids)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, K, H, W)
        return nn.functional.one_hot(x[:, 0].long(), NUM_CLASSES).permute(0, 3, 1, 2).float()


def test_miou_equals_numpy_confusion_matrix():
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, NUM_CLASSES, (10, 9, 7), generator=gen)
    truth[truth == 3] = BACKGROUND  # class 3 absent from the truth...
    pred = torch.where(torch.rand(truth.shape, generator=gen) < 0.6, truth,
                       torch.randint(0, NUM_CLASSES, truth.shape, generator=gen))
    pred[pred == 3] = 4  # ...and from the prediction: NaN, left out of the means
    pred[pred == 7] = 5  # class 7 never predicted: IoU 0, counted
    system = SegmentationSystem(_Echo(), NUM_CLASSES, BACKGROUND)
    loader = DataLoader(TensorDataset(pred[:, None].float(), truth), batch_size=3)  # 4 batches, accumulated
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.test(system, dataloaders=loader, verbose=False)
    want = _numpy_iou(pred.numpy(), truth.numpy(), NUM_CLASSES)
    got = np.array(system.test_summary["iou"])
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    assert math.isnan(want[3]) and want[7] == 0
    assert system.test_summary["miou"] == pytest.approx(np.nanmean(want), rel=1e-6)
    assert system.test_summary["miou_fg"] == pytest.approx(np.nanmean(want[:BACKGROUND]), rel=1e-6)
    assert system.test_summary["pixel_acc"] == pytest.approx((pred == truth).float().mean().item(), rel=1e-6)


def test_taps_one_map_per_block_with_documented_strides():
    space = load_space("digits-mbconv")
    x = torch.randn(2, 1, 32, 32)
    nets = [load_backbone(DNA_DIGITS_ARCH)] + [build_network(space, a, 10) for a in sample_architectures(space, 4, 1)]
    nets.append(build_network_from_strings(block_strings(space, json.loads(DNA_DIGITS_ARCH)), 10, 1, 8))
    for net in nets:
        net.eval()
        feats = net.forward_features(x)
        assert len(feats) == len(space.blocks) == len(net.feature_info)
        assert [f["stride"] for f in net.feature_info] == [1, 2, 4]  # documented for the digits space
        for f, info in zip(feats, net.feature_info):
            assert f.shape == (2, info["channels"], 32 // info["stride"], 32 // info["stride"])
        torch.testing.assert_close(net(x), net.head(feats[-1].mean((2, 3))))  # taps are the classifier's features
    hspace = hytra_digits()
    enc = [(0, 1, 2), (2, 3, 4), (4, 5, 5)]  # levels 0,1,1 | 1,2,2 | 2,3,3 (resatt at 1 and 2)
    hnet = build_hytra_network(hspace, enc, 10).eval()
    feats = hnet.forward_features(x)
    assert [f["stride"] for f in hnet.feature_info] == [2, 4, 8]  # 2**exit level
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
    torch.testing.assert_close(hnet(x), hnet.head(feats[-1].mean((2, 3))))


def test_dense_model_shapes_and_frozen_backbone():
    net = load_backbone(DNA_DIGITS_ARCH)
    frozen = DenseModel(net, NUM_CLASSES, "fpn", 8, freeze=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 1, 24, 24), torch.randint(0, NUM_CLASSES, (4, 24, 24))
    logits = frozen(x)
    assert logits.shape == (4, NUM_CLASSES, 24, 24)
    nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in frozen.head.parameters())
    for k, v in net.state_dict().items():  # running statistics untouched: the backbone stays in eval mode
        torch.testing.assert_close(v, before[k])
    fcn = DenseModel(load_backbone(DNA_DIGITS_ARCH), NUM_CLASSES, "fcn", 8)
    assert fcn.taps == [2] and fcn(x).shape == (4, NUM_CLASSES, 24, 24)


def test_load_backbone_from_architecture_json(tmp_path):
    space = load_space("digits-mbconv")
    enc = json.loads(DNA_DIGITS_ARCH)
    (tmp_path / "a.json").write_text(json.dumps({"encoding": enc}))
    (tmp_path / "b.json").write_text(json.dumps({"block_strings": block_strings(space, enc)}))
    n = [sum(p.numel() for p in load_backbone(str(tmp_path / f)).parameters()) for f in ("a.json", "b.json")]
    assert n == [19186, 19186]  # docs/nas.md: the DNA-searched net has 19,186 parameters
    with pytest.raises(ValueError, match="--arch"):
        load_backbone("not an arch")


def test_cli_end_to_end_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["seg", "--out-dir", str(out), "--epochs", "1", "--pretrain-epochs", "1", "--num-train", "16",
            "--num-val", "8", "--num-test", "8", "--canvas", "16", "--scales", "1", "--max-digits", "2",
            "--num-pictures", "2", "--no-progress"]
    assert transfer_main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "predictions.png").stat().st_size > 1000
    assert len(result["test_iou"]) == NUM_CLASSES and 0 <= result["test_miou"] <= 1
    assert result["backbone_params"] == 19186 - (32 * 10 + 10)
    assert "test mIoU" in capsys.readouterr().out
    assert transfer_main(args) == 0  # finished: result.json is returned as is
    study = tmp_path / "study"  # checkpoint=False (benchmark studies): same protocol, nothing left on disk
    tiny = dict(epochs=1, pretrain_epochs=1, num_train=16, num_val=8, num_test=8, canvas=16, scales=[1],
                max_digits=2, progress=False)
    res = transfer_seg(SegConfig(out_dir=str(study), checkpoint=False, **tiny))
    assert not study.exists() and 0 <= res["test_miou"] <= 1 and res["best_val_miou"] is not None
    assert transfer_main(["seg", "--head", "unet"]) == 2
    assert transfer_main(["seg", "--bogus", "1"]) == 2
    assert transfer_main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "head must be one of fpn, fcn" in err


def test_cli_transfers_a_hytra_network_on_48px_scenes_of_four_digits(tmp_path):
    """The issue's other example: a HyTra architecture through the CLI, on 48x48 canvases of up to 4 digits."""
    out = tmp_path / "hytra"
    enc = [[0, 1, 2], [2, 3, 4], [4, 5, 5]]
    args = ["seg", "--space", "hytra-digits", "--arch", json.dumps(enc), "--out-dir", str(out), "--epochs", "1",
            "--pretrain-epochs", "1", "--num-train", "8", "--num-val", "4", "--num-test", "4", "--canvas", "48",
            "--min-digits", "4", "--max-digits", "4", "--num-pictures", "1", "--no-progress"]
    assert transfer_main(args) == 0
    result = json.loads((out / "result.json").read_text())
    hnet = build_hytra_network(hytra_digits(), enc, 10)
    want = sum(p.numel() for p in hnet.parameters()) - sum(p.numel() for p in hnet.head.parameters())
    assert result["backbone_params"] == want  # the HyTra backbone was transferred, not the default MBConv net
    assert len(result["test_iou"]) == NUM_CLASSES and 0 <= result["test_miou"] <= 1
    dm = SegConfig(canvas=48, min_digits=4, max_digits=4, num_train=8, num_val=4, num_test=4).datamodule()
    dm.setup()
    assert dm.scenes["test"].images.shape[1:] == (48, 48)
    assert all(len(p) == 4 for p in dm.scenes["test"].placements)
