"""BKN inside DNA block supernets: every BKN of a sampled path gets a prior in training."""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from nas.methods.dna import BlockDistillSystem, DNAConfig, build_teacher, train_block
from nas.ops import make_norm
from nas.spaces import SearchSpace
from nas.supernet import BlockSupernet
from normlayers import BatchKalmanNorm

SPACE = {
    "name": "tiny-digits-bkn",
    "stem_channels": 4,
    "ops": [{"kind": "skip"}, {"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}],
    "blocks": [
        {"out_channels": 4, "stride": 1, "layers": 3},
        {"out_channels": 6, "stride": 2, "layers": 2},
    ],
}


def _record_priors(module: torch.nn.Module) -> dict[str, bool]:
    """name -> whether the last call of that BKN received a prior."""
    received: dict[str, bool] = {}
    for name, m in module.named_modules():
        if isinstance(m, BatchKalmanNorm):
            m.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: received.__setitem__(name, kwargs.get("prior") is not None),
                with_kwargs=True,
            )
    return received


def _path_norms(student: BlockSupernet, cand: tuple[int, ...]) -> list[str]:
    """Names of the BKN layers on the candidate's path, in forward order."""
    names = {id(m): n for n, m in student.named_modules()}
    out = []
    for op in student.path(cand):
        out += [names[id(m)] for m in op.modules() if isinstance(m, BatchKalmanNorm)]
    return out


def test_bkn_supernet_chains_priors_along_every_path_during_training():
    cfg = replace(DNAConfig(space=SearchSpace.from_dict(SPACE)), norm="bkn", teacher_layers=1)
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    student = BlockSupernet(cfg.space.blocks[0], make_norm("bkn"))
    ops = [op for layer in student.cells[0] for op in layer if not isinstance(op, torch.nn.Identity)]
    assert student.kalman_chained == len(ops) and all(hasattr(op, "kalman_chain") for op in ops)
    received = _record_priors(student)
    system = BlockDistillSystem(teacher, student, 0, seed=3)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    x = torch.randn(32, 1, 8, 8)
    rng = random.Random(0)
    checked = 0
    for _step in range(12):
        cand = student.sample(rng)
        received.clear()
        x_in, target = system.teacher.block_outputs(x)[0:2]
        loss = torch.nn.functional.mse_loss(student(x_in, cand), target)
        if loss.requires_grad:
            opt.zero_grad()
            loss.backward()
            opt.step()
        names = _path_norms(student, cand)
        assert set(received) == set(names)
        # the first from the block input's measured moments, every later one from the op before it
        assert all(received[n] for n in names)
        checked += len(names)
    assert checked >= 12
    # eval: plain BatchNorm with running statistics, no priors
    student.eval()
    received.clear()
    with torch.no_grad():
        student(torch.randn(4, 4, 8, 8), (2, 1, 2))
    assert received and not any(received.values())


def test_bn_supernet_is_not_touched():
    student = BlockSupernet(SearchSpace.from_dict(SPACE).blocks[0], make_norm("bn"))
    assert student.kalman_chained == 0 and not hasattr(student.cells[0][0][1], "kalman_chain")


def test_dna_train_block_with_bkn_uses_priors(tmp_path, monkeypatch):
    """train_block (the DNA stage, through the shared runner) trains a chained BKN supernet."""
    cfg = replace(
        DNAConfig(space=SearchSpace.from_dict(SPACE)), norm="bkn", teacher_layers=1, block_epochs=1, batch_size=128,
        progress=False,
    )
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    counts = {"with": 0, "without": 0}
    original = BatchKalmanNorm.forward

    def counting_forward(self, x, prior=None):
        if self.training and torch.is_grad_enabled():
            counts["with" if prior is not None else "without"] += 1
        return original(self, x, prior=prior)

    monkeypatch.setattr(BatchKalmanNorm, "forward", counting_forward)
    student = train_block(cfg, teacher, 1, tmp_path)
    assert student.kalman_chained > 0
    assert counts["with"] > 0 and counts["without"] == 0
