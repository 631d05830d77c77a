"""CrowdFlowDataModule on a small synthetic city: the batch contract, splits, index mapping, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stflow.data import CrowdFlowDataModule, DataFormatError, generate_synthetic_city, synthetic_cache_dir


@pytest.fixture(scope="module")
def city_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("city")
    generate_synthetic_city(out, seed=3, days=30)
    return out


@pytest.fixture(scope="module")
def dm(city_dir: Path) -> CrowdFlowDataModule:
    module = CrowdFlowDataModule("synthetic", str(city_dir), len_closeness=3, len_period=2, len_trend=1,
                                 test_days=3, val_fraction=0.2, batch_size=16)
    module.setup("fit")
    return module


def test_batch_contract(dm: CrowdFlowDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    D = 7 + 1 + 24 + 1 + 1 + 19
    assert dm.ext_dim == D and dm.grid_shape == (16, 8) and dm.slots_per_day == 24
    shapes = {
        "closeness": (16, 3, 2, 16, 8), "period": (16, 2, 2, 16, 8), "trend": (16, 1, 2, 16, 8),
        "ext_closeness": (16, 3, D), "ext_period": (16, 2, D), "ext_trend": (16, 1, D),
        "ext_target": (16, D), "target": (16, 2, 16, 8), "index": (16,),
    }
    assert set(batch) == set(shapes)
    for key, shape in shapes.items():
        assert tuple(batch[key].shape) == shape, key
        assert batch[key].dtype == (torch.int64 if key == "index" else torch.float32), key
    for key in ("closeness", "period", "trend", "target"):
        assert batch[key].min() >= -1 - 1e-6
    assert isinstance(dm.timestamps, pd.DatetimeIndex) and dm.flows.dtype == np.float64
    assert dm.flows.shape == (30 * 24, 2, 16, 8)


def test_splits_are_time_ordered_without_overlap(dm: CrowdFlowDataModule) -> None:
    idx = {name: ds.windows.target for name, ds in
           (("train", dm.train_dataset), ("val", dm.val_dataset), ("test", dm.test_dataset))}
    assert len(idx["test"]) == 3 * 24
    n_trainval = len(idx["train"]) + len(idx["val"])
    assert len(idx["val"]) == round(0.2 * n_trainval)
    assert idx["train"].max() < idx["val"].min() and idx["val"].max() < idx["test"].min()
    for v in idx.values():
        assert (np.diff(v) > 0).all()
    # The validation split is the END of the training samples: the test block follows right after it.
    assert idx["test"][0] == idx["val"][-1] + 1
    # Training slots end right before the first validation target; no sample of val/test touches the scaler.
    mask = dm.train_slot_mask
    assert mask.sum() == idx["val"][0] and mask[: idx["val"][0]].all()
    assert dm.scaler.max == dm.flows[mask].max() and dm.scaler.min == dm.flows[mask].min()


def test_index_maps_back_to_raw_slots(dm: CrowdFlowDataModule) -> None:
    batch = next(iter(dm.test_dataloader()))
    index = batch["index"].numpy()
    np.testing.assert_allclose(batch["target"].numpy(), dm.scaler.transform(dm.flows[index]), atol=1e-6)
    # Closeness most recent first, period one day back, trend one week back.
    for k in range(3):
        np.testing.assert_allclose(
            batch["closeness"][:, k].numpy(), dm.scaler.transform(dm.flows[index - 1 - k]), atol=1e-6
        )
    np.testing.assert_allclose(batch["period"][:, 1].numpy(), dm.scaler.transform(dm.flows[index - 48]), atol=1e-6)
    np.testing.assert_allclose(batch["trend"][:, 0].numpy(), dm.scaler.transform(dm.flows[index - 168]), atol=1e-6)
    restored = dm.scaler.inverse_transform(batch["target"].double())
    np.testing.assert_allclose(restored.numpy(), dm.flows[index], atol=1e-3)
    # Frame vectors use the frame's own slot: the slot one-hot of closeness k is the target's hour - 1 - k.
    hours = dm.timestamps[index].hour.to_numpy()
    got = batch["ext_closeness"][:, 0, 8:32].argmax(dim=1).numpy()
    np.testing.assert_array_equal(got, (hours - 1) % 24)


def test_shuffled_train_loader_is_deterministic(city_dir: Path) -> None:
    def first_indices(seed: int) -> list[int]:
        module = CrowdFlowDataModule("synthetic", str(city_dir), test_days=3, batch_size=8, seed=seed)
        module.setup()
        return next(iter(module.train_dataloader()))["index"].tolist()

    assert first_indices(0) == first_indices(0) != first_indices(1)


def test_no_features_and_default_cache(city_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = CrowdFlowDataModule("synthetic", str(city_dir), features="none", test_days=3, val_fraction=0.0)
    module.setup()
    batch = next(iter(module.test_dataloader()))
    assert batch["ext_target"].shape == (64, 0) and batch["ext_closeness"].shape == (64, 4, 0)
    assert batch["trend"].shape == (64, 0, 2, 16, 8) and len(module.val_dataset) == 0
    assert module.info()["samples"]["val"] == 0

    monkeypatch.setenv("STFLOW_CACHE", str(tmp_path / "cache"))
    default = CrowdFlowDataModule()
    default.prepare_data()
    default.setup()
    assert synthetic_cache_dir(0) == tmp_path / "cache" / "synthetic-0"
    assert (tmp_path / "cache" / "synthetic-0" / "SYN_M16x8_T60_InOut.h5").is_file()
    info = default.info()
    assert info["samples"]["test"] == 7 * 24 and info["slots_kept"] == 60 * 24


def test_bad_configuration(city_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs data_dir"):
        CrowdFlowDataModule("bikenyc")
    with pytest.raises(DataFormatError, match="unknown dataset 'nyc'"):
        CrowdFlowDataModule("nyc", str(city_dir))
    with pytest.raises(ValueError, match="unknown features 'fancy'"):  # refused before any file is read
        CrowdFlowDataModule("synthetic", str(city_dir), features="fancy")
    with pytest.raises(ValueError, match=r"unknown data option\(s\) \['len_closness'\]"):
        CrowdFlowDataModule("synthetic", str(city_dir), len_closness=3)
