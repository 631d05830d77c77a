"""Synchronized BKN (normlayers.sync): 2 gloo processes on a split batch == one process on the whole batch."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlayers
from normlayers.sync import SyncBatchKalmanNorm, SyncKalmanChain, convert_sync

_WORKER_PATH = Path(__file__).with_name("_sync_worker.py")
_spec = importlib.util.spec_from_file_location("_normlayers_sync_worker", _WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TOL = {"atol": 1e-6, "rtol": 1e-6}


def _cases() -> dict[str, dict]:
    g = torch.Generator().manual_seed(7)
    dt = torch.float64
    c = 3

    def layer_case(split, prior_weight, momentum, steps, reference_bn=False):
        return {
            "kind": "layer", "split": split, "prior_weight": prior_weight, "momentum": momentum, "steps": steps,
            "reference_bn": reference_bn,
            "x": torch.randn(4, c, 5, 5, generator=g, dtype=dt) * 2.0 + 0.5,
            "gy": torch.randn(4, c, 5, 5, generator=g, dtype=dt),
            "gm": torch.randn(c, generator=g, dtype=dt), "gv": torch.randn(c, generator=g, dtype=dt),
            "weight": 1.0 + 0.3 * torch.randn(c, generator=g, dtype=dt),
            "bias": 0.2 * torch.randn(c, generator=g, dtype=dt),
            "prior_mean": torch.randn(c, generator=g, dtype=dt),
            "prior_var": 1.0 + torch.rand(c, generator=g, dtype=dt),
        }

    def chain_case(split, transition):
        state = worker.build_chain(transition).state_dict()
        for k, v in state.items():  # non-trivial affine so its gradients matter
            if k.endswith((".weight", ".bias")) and k.split(".")[0] in ("1", "4"):
                v.add_(0.2 * torch.randn(v.shape, generator=g, dtype=dt))
        return {
            "kind": "chain", "split": split, "transition": transition, "state": state,
            "x": torch.randn(4, 3, 6, 6, generator=g, dtype=dt),
            "gy": torch.randn(4, 5, 6, 6, generator=g, dtype=dt), "gm": torch.randn(5, generator=g, dtype=dt),
        }

    bn_state = {"weight": torch.rand(c, dtype=dt) + 0.5, "bias": torch.randn(c, dtype=dt),
                "running_mean": torch.randn(c, dtype=dt), "running_var": torch.rand(c, dtype=dt) + 0.5,
                "num_batches_tracked": torch.tensor(3)}
    return {
        "layer22": layer_case([2, 2], 0.7, 0.1, 2),
        "layer31": layer_case([3, 1], 0.7, None, 2),
        "layer40": layer_case([4, 0], 0.7, 0.1, 2),  # a rank with no samples still joins the collectives
        "layer13f32": {**layer_case([1, 3], 0.7, 0.1, 2), "dtype": torch.float32},
        "bn22": layer_case([2, 2], 0.0, 0.1, 1, reference_bn=True),
        "bn31": layer_case([3, 1], 0.0, None, 2, reference_bn=True),
        "chain22": chain_case([2, 2], "analytic"),
        "chain31": chain_case([3, 1], "analytic"),
        "mc31": chain_case([3, 1], "monte_carlo"),
        "eval31": {**layer_case([3, 1], 0.7, 0.1, 1), "kind": "eval", "state": bn_state},
        "ghost22": {**layer_case([2, 2], 0.7, 0.1, 1), "kind": "ghost"},
    }


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    cases = _cases()
    torch.save(cases, tmp / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(_WORKER_PATH), str(rank), "2", str(tmp / "init"), str(tmp / "inputs.pt"),
                          str(tmp / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rank in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        logs.append(out.decode(errors="replace"))
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n" + "\n".join(logs)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return cases, ranks


def _full(case: dict) -> dict:
    return worker.run_case(case, slice(None), sync=False, post_loss=True)


def _compare(full: dict, ranks: list[dict], tol: dict | None = None) -> None:
    tol = TOL if tol is None else tol
    assert set(full) == set(ranks[0]) == set(ranks[1])
    for key, ref in full.items():
        if ref is None:
            assert all(r[key] is None for r in ranks), key
            continue
        if key in ("y", "x_grad"):
            torch.testing.assert_close(torch.cat([r[key] for r in ranks]), ref, **tol, msg=key)
        elif key.startswith("grad.") or key == "prior_grad":
            got = [r[key] for r in ranks]
            if isinstance(ref, tuple):
                for i, part in enumerate(ref):
                    torch.testing.assert_close(got[0][i] + got[1][i], part, **tol, msg=f"{key}[{i}]")
            else:
                torch.testing.assert_close(got[0] + got[1], ref, **tol, msg=key)
        else:  # posterior, running buffers, counter: identical on every rank and equal to the whole batch's
            for r in ranks:
                if isinstance(ref, tuple):
                    for i, part in enumerate(ref):
                        torch.testing.assert_close(r[key][i], part, **tol, msg=f"{key}[{i}]")
                else:
                    torch.testing.assert_close(r[key], ref, **tol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layer22", "layer31", "layer40", "chain22", "chain31"])
def test_split_batch_matches_whole_batch(distributed_run, name):
    cases, ranks = distributed_run
    full = _full(cases[name])
    _compare(full, [r[name] for r in ranks])
    if name.startswith("layer"):  # the prior's gradient is really exercised
        assert full["prior_grad"][0].abs().sum() > 0 and full["prior_grad"][1].abs().sum() > 0
        assert int(ranks[0][name]["layer.num_batches_tracked"]) == cases[name]["steps"]


@pytest.mark.slow
def test_float32_split_batch(distributed_run):
    """float32 input: float32 statistics (merged in float64), compared with the fast single-process path."""
    cases, ranks = distributed_run
    full = _full(cases["layer13f32"])
    assert full["y"].dtype == torch.float32 and ranks[0]["layer13f32"]["layer.posterior"][0].dtype == torch.float32
    _compare(full, [r["layer13f32"] for r in ranks], tol={"atol": 1e-4, "rtol": 1e-4})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bn22", "bn31"])
def test_prior_weight_zero_matches_batchnorm(distributed_run, name):
    cases, ranks = distributed_run
    case = cases[name]
    full = _full(case)  # nn.BatchNorm2d on the whole batch
    synced = [{k: v for k, v in r[name].items() if k not in ("prior_grad",)} for r in ranks]
    for r in ranks:
        assert all(t is None or t.abs().max() == 0 for t in r[name]["prior_grad"])  # p = 0: no prior gradient
    full = {k: v for k, v in full.items() if k != "prior_grad" and not k.endswith(".posterior")}
    synced = [{k: v for k, v in r.items() if not k.endswith(".posterior")} for r in synced]
    _compare(full, synced)


@pytest.mark.slow
def test_monte_carlo_prior_identical_on_every_rank(distributed_run):
    _, ranks = distributed_run
    a, b = ranks[0]["mc31"], ranks[1]["mc31"]  # the ranks' global RNGs were seeded differently
    for key in ("4.posterior", "4.running_mean", "4.running_var"):
        for u, v in zip(a[key] if isinstance(a[key], tuple) else (a[key],),
                        b[key] if isinstance(b[key], tuple) else (b[key],)):
            assert torch.equal(u, v), key


@pytest.mark.slow
def test_eval_is_local_batchnorm_and_ghost_groups_refused(distributed_run):
    cases, ranks = distributed_run
    ref = _full(cases["eval31"])["y"]
    torch.testing.assert_close(torch.cat([r["eval31"]["y"] for r in ranks]), ref, **TOL)
    for r in ranks:
        assert "group_size" in r["ghost22"]["error"]


def _pair(prior_weight=0.7):
    torch.manual_seed(3)
    plain = normlayers.BatchKalmanNorm2d(3, prior_weight=prior_weight).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
    synced = SyncBatchKalmanNorm(3, prior_weight=prior_weight).double()
    synced.load_state_dict(plain.state_dict())  # strict: same keys
    return plain, synced


def _same_step(plain, synced):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    prior = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 1.0)
    for mode in (True, False):
        plain.train(mode)
        synced.train(mode)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = plain(xa, prior=prior), synced(xb, prior=prior)
        assert torch.equal(ya, yb)
        (ya * ya).sum().backward()
        (yb * yb).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(plain, name), getattr(synced, name))
    back = normlayers.BatchKalmanNorm2d(3).double()
    back.load_state_dict(synced.state_dict())


def test_not_initialized_is_plain_bkn():
    assert not (dist.is_available() and dist.is_initialized())
    _same_step(*_pair())


def test_world_size_one_is_plain_bkn(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        _same_step(*_pair())
    finally:
        dist.destroy_process_group()


def test_convert_sync_keeps_parameters_buffers_and_chain():
    model = worker.build_chain("analytic")
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    plan = dict(model.kalman_chain.plan)
    out = convert_sync(model)
    assert out is model and isinstance(model.kalman_chain, SyncKalmanChain) and model.kalman_chain.plan == plan
    assert all(isinstance(model[i], SyncBatchKalmanNorm) for i in (1, 4))
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects (optimizers)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # no process group: plain chained BKN
    assert model[4].posterior is not None and torch.equal(model[4].posterior[1], ref[4].posterior[1])
    assert isinstance(convert_sync(nn.Sequential(normlayers.BatchKalmanNorm1d(4)))[0], SyncBatchKalmanNorm)
    assert isinstance(convert_sync(normlayers.BatchKalmanNorm3d(4)), SyncBatchKalmanNorm)
