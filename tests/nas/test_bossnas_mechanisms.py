"""BossNAS mechanisms pinned so that a wrong implementation fails (not only a crash).

* The ensemble target is computed by the TARGET network (stem, searched prefix and block k of the
  target, target projector) from the paths sampled for the step, and each view's prediction is
  paired with the OTHER view's ensemble target: every per-path loss is recomputed by hand from the
  modules, with online and target made different first.
* The EMA really moves the target towards the online weights at the configured momentum, step by step
  during a real training run (through the shared runner), including the earlier blocks' searched path
  when they keep training (``earlier_blocks: train``, the authors'), and not them when frozen.
* A short run lowers the bootstrapping loss measured on fixed views and paths.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas.data.views import ViewConfig, make_view
from nas.methods.bossnas import BossNAS, BossNASBlockSystem, BossNASConfig, SiameseSupernet, momentum_at
from nas.methods.bossnas_adapters import MBConvAdapter
from nas.spaces import BlockSpec, SearchSpace, mbconv
from nas.spaces.base import SKIP
from stflow.runner import RunConfig, fit

OPS = (SKIP, mbconv(3, 1), mbconv(3, 2))
VIEWS = ViewConfig(pad=1, rotate_deg=10.0, scale=0.1, noise_std=0.1, cutout=2, cutout_prob=0.5)


def tiny_space() -> SearchSpace:
    blocks = (
        BlockSpec.uniform(4, 8, 1, 2, OPS, first_ops=OPS[1:]),
        BlockSpec.uniform(8, 8, 2, 2, OPS, first_ops=OPS[1:]),
    )
    return SearchSpace(blocks, input_channels=1, input_size=8, stem_channels=4, name="boss-mech")


def tiny_cfg(tmp: Path | None = None, **changes) -> BossNASConfig:
    base = dict(
        space="mbconv", sampling="random", num_paths=3, views=VIEWS, proj_hidden=16, proj_dim=8, batch_size=32,
        epochs_per_block=1, limit_train_batches=4, limit_val_batches=0, recal_batches=1, rate_views=1,
        progress=False, out_dir=str(tmp or "unused"), base_momentum=0.9,
    )
    base.update(changes)
    return BossNASConfig(**base)


def perturb(module: nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_ensemble_target_is_the_target_networks_paths_and_views_cross_paired():
    torch.manual_seed(0)
    adapter = MBConvAdapter(tiny_space())
    model = SiameseSupernet(adapter, nn.BatchNorm2d, 16, 8)
    perturb(model.target, seed=1)  # online and target differ everywhere, prefix included
    perturb(model.target_proj, seed=2)
    prefix = [(1, 2)]
    cfg = tiny_cfg()
    system = BossNASBlockSystem(model, adapter, 1, prefix, cfg)
    system._set_modes()
    x = torch.randn(8, 1, 8, 8)
    paths = [(0, 1), (1, 2), (0, 0)]
    losses = system.bootstrap_losses(x, paths, torch.Generator().manual_seed(5), backward=False)

    gen = torch.Generator().manual_seed(5)  # the same view draws, in the same order (per path: v1, v2)
    views = [(make_view(x, VIEWS, gen), make_view(x, VIEWS, gen)) for _ in paths]
    on, tg = model.online, model.target
    with torch.no_grad():
        def target_proj(v: torch.Tensor, p) -> np.ndarray:
            return model.target_proj[1](tg.blocks[1](tg.blocks[0](tg.stem(v), prefix[0]), p)).numpy()

        def online_pred(v: torch.Tensor, p) -> np.ndarray:
            h = on.blocks[1](on.blocks[0](on.stem(v), prefix[0]), p)
            return model.predictor[1](model.online_proj[1](h)).numpy()

        b = x.shape[0]
        t = [target_proj(torch.cat(v), p) for v, p in zip(views, paths)]  # (2B, D): both views in one batch
        z = [online_pred(torch.cat(v), p) for v, p in zip(views, paths)]
    t1 = np.mean([unit(a[:b]) for a in t], 0)  # ensemble target of view 1 over the sampled paths
    t2 = np.mean([unit(a[b:]) for a in t], 0)

    def sym(zi: np.ndarray, ta: np.ndarray, tb: np.ndarray) -> float:  # view 1 against ta, view 2 against tb
        d1 = (2 - 2 * (unit(zi[:b]) * unit(ta)).sum(1)).mean()
        return float(d1 + (2 - 2 * (unit(zi[b:]) * unit(tb)).sum(1)).mean())

    for zi, loss in zip(z, losses):
        expected = sym(zi, t2, t1)
        assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        # the wrong variants give other numbers (so the equality above pins them): same-view pairing ...
        assert abs(sym(zi, t1, t2) - expected) > 1e-3
    # ... and an ensemble made by the ONLINE network
    with torch.no_grad():
        t_online = [model.online_proj[1](on.blocks[1](on.blocks[0](on.stem(torch.cat(v)), prefix[0]), p)).numpy()
                    for v, p in zip(views, paths)]
    assert np.abs(np.mean([unit(a[:b]) for a in t_online], 0) - t1).max() > 1e-2


class _Recording(BossNASBlockSystem):
    """Records, around every optimizer step, the target before and online/target after."""

    def on_train_batch_start(self, batch, batch_idx):
        self.before = [p.detach().clone() for p in self._ema_modules()[0].parameters()]
        self.online_before = [p.detach().clone() for p in self._ema_modules()[1].parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        targets, onlines = self._ema_modules()
        m = momentum_at(self.global_step - 1, self.total_steps, self.cfg.base_momentum)
        self.records.append(
            (m, self.before, self.online_before, [p.detach().clone() for p in onlines.parameters()],
             [p.detach().clone() for p in targets.parameters()])
        )

    def _ema_modules(self):
        return self.model.block_pairs(self.k, earlier=True)  # stem + block 0 + block 1 + projector 1


def _train_block1(tmp_path: Path, earlier_blocks: str) -> _Recording:
    cfg = tiny_cfg(tmp_path / earlier_blocks, earlier_blocks=earlier_blocks)
    method = BossNAS(cfg, MBConvAdapter(tiny_space()), log=lambda s: None)
    method.prepare()
    method.prefix = [(1, 2)]
    system = _Recording(method.model, method.adapter, 1, method.prefix, cfg)
    system.records = []
    run_cfg = RunConfig(out_dir=cfg.out_dir, max_epochs=1, seed=0, progress_bar=False, loggers=(), test=False,
                        checkpoint=False, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", devices=1)
    fit(system, method.datamodule, run_cfg)
    return system


def test_ema_moves_target_towards_online_at_the_configured_momentum(tmp_path: Path):
    system = _train_block1(tmp_path, "train")
    assert len(system.records) == 3
    prefix_path = nn.ModuleList([system.model.online.stem, *system.model.online.blocks[0].path((1, 2))])
    n_prefix = len(list(prefix_path.parameters()))  # stem + the searched path come first in block_pairs
    moved_prefix = False
    for m, t_before, o_before, o_after, t_after in system.records:
        assert 0.9 <= m < 1.0
        for tb, oa, ta in zip(t_before, o_after, t_after):
            torch.testing.assert_close(ta, m * tb + (1 - m) * oa, rtol=1e-5, atol=1e-6)
        # the online earlier blocks keep training along their searched path (gradients reach them)
        moved_prefix |= any(not torch.equal(a, b) for a, b in zip(o_before[:n_prefix], o_after[:n_prefix]))
        # and the target really moves where online and target differ
        assert any(not torch.equal(a, b) for a, b in zip(t_before, t_after))
    assert moved_prefix


def test_frozen_earlier_blocks_stay_fixed(tmp_path: Path):
    system = _train_block1(tmp_path, "frozen")
    n_prefix = len(list(system.model.online.stem.parameters())) + len(list(system.model.online.blocks[0].parameters()))
    for _, t_before, o_before, o_after, t_after in system.records:
        for a, b in zip(o_before[:n_prefix] + t_before[:n_prefix], o_after[:n_prefix] + t_after[:n_prefix]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_short_run_lowers_the_bootstrap_loss(tmp_path: Path):
    cfg = tiny_cfg(tmp_path / "run", epochs_per_block=3, limit_train_batches=12, lr=5e-3, base_momentum=0.99)
    method = BossNAS(cfg, MBConvAdapter(tiny_space()), log=lambda s: None)
    method.prepare()
    system = BossNASBlockSystem(method.model, method.adapter, 0, [], cfg)
    x = method.datamodule.splits["val"][0][:128]
    paths = [random.Random(i).choice(system.candidates) for i in range(6)]

    def loss() -> float:
        system._set_modes()
        with torch.no_grad():
            return float(torch.stack(
                system.bootstrap_losses(x, paths, torch.Generator().manual_seed(0), backward=False)).mean())

    before = loss()
    run_cfg = RunConfig(out_dir=cfg.out_dir, max_epochs=cfg.epochs_per_block, seed=0, progress_bar=False,
                        loggers=(), test=False, checkpoint=False, limit_train_batches=cfg.limit_train_batches,
                        limit_val_batches=0, accelerator="cpu", devices=1)
    fit(system, method.datamodule, run_cfg)
    after = loss()
    assert after < 0.7 * before, (before, after)
