"""Helper for test_normlayers_sync.py: the scenarios, run either on the whole batch in one process or as
one rank of a gloo group (``python _sync_worker.py RANK WORLD INIT_FILE INPUTS OUT``)."""

from __future__ import annotations

import sys

import torch
from torch import nn

import normlayers
from normlayers.sync import SyncBatchKalmanNorm, convert_sync


def build_chain(transition: str) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU, converted to a 2-layer Kalman chain (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
    ).double()
    return normlayers.convert(model, prior_weight=0.6, transition=transition)


def _bkn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (normlayers.BatchKalmanNorm, nn.BatchNorm2d))]


def _record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: dict | None = None) -> dict:
    out = {"y": y.detach().clone(), "x_grad": None if x.grad is None else x.grad.clone()}
    for name, layer in _bkn_layers(model):
        key = name or "layer"
        post = getattr(layer, "posterior", None)
        out[key + ".posterior"] = None if post is None else tuple(t.detach().clone() for t in post)
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            out[f"{key}.{buf}"] = getattr(layer, buf).clone()
    for name, param in model.named_parameters():
        out["grad." + name] = None if param.grad is None else param.grad.clone()
    out.update(extra or {})
    return out


def run_layer(case: dict, rows: slice, sync: bool, post_loss: bool) -> dict:
    """A standalone 2d layer with a fixed prior whose mean/var require grad."""
    cls = SyncBatchKalmanNorm if sync else (nn.BatchNorm2d if case.get("reference_bn") else
                                             normlayers.BatchKalmanNorm2d)
    dtype = case.get("dtype", torch.float64)
    if cls is nn.BatchNorm2d:
        layer = cls(case["x"].shape[1], momentum=case["momentum"]).to(dtype)
    else:
        layer = cls(case["x"].shape[1], prior_weight=case["prior_weight"], momentum=case["momentum"]).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(case["weight"])
        layer.bias.copy_(case["bias"])
    x = case["x"][rows].to(dtype).requires_grad_(True)
    pm = case["prior_mean"].to(dtype).requires_grad_(True)
    pv = case["prior_var"].to(dtype).requires_grad_(True)
    loss_y = 0.0
    for step in range(case["steps"]):
        xi = x * (1.0 + 0.5 * step) + 0.25 * step  # a different batch at each step (one graph)
        y = layer(xi) if cls is nn.BatchNorm2d else layer(xi, prior=(pm, pv))
        loss_y = loss_y + (y * case["gy"][rows].to(dtype)).sum()
        if post_loss and not case.get("reference_bn"):  # nn.BatchNorm2d has no posterior
            mean, var = layer.posterior
            loss_y = loss_y + (mean * case["gm"].to(mean.dtype)).sum() + (var * case["gv"].to(var.dtype)).sum()
    loss_y.backward()
    return _record(layer, x, y, {"prior_grad": (pm.grad, pv.grad)})


def run_chain(case: dict, rows: slice, sync: bool, post_loss: bool) -> dict:
    model = build_chain(case["transition"])
    model.load_state_dict(case["state"])
    if sync:
        model = convert_sync(model)
    x = case["x"][rows].clone().requires_grad_(True)
    y = model(x)
    loss = (y * case["gy"][rows]).sum()
    if post_loss:
        last = _bkn_layers(model)[-1][1]
        loss = loss + (last.posterior[0] * case["gm"]).sum()
    loss.backward()
    return _record(model, x, y)


def run_eval(case: dict, rows: slice, sync: bool) -> dict:
    cls = SyncBatchKalmanNorm if sync else normlayers.BatchKalmanNorm2d
    layer = cls(case["x"].shape[1]).double()
    layer.load_state_dict(case["state"])
    layer.eval()
    x = case["x"][rows]
    return {"y": layer(x, prior=(case["prior_mean"], case["prior_var"]))}


def run_ghost(case: dict, rows: slice) -> dict:
    layer = SyncBatchKalmanNorm(case["x"].shape[1], group_size=1).double()
    try:
        layer(case["x"][rows], prior=(case["prior_mean"], case["prior_var"]))
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def run_case(case: dict, rows: slice, sync: bool, post_loss: bool = True) -> dict:
    kind = case["kind"]
    if kind == "layer":
        return run_layer(case, rows, sync, post_loss)
    if kind == "chain":
        return run_chain(case, rows, sync, post_loss)
    if kind == "eval":
        return run_eval(case, rows, sync)
    if kind == "ghost":
        return run_ghost(case, rows)
    raise ValueError(kind)


def main() -> None:
    rank, world, init_file, inputs, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cases = torch.load(inputs, weights_only=False)
        results = {}
        for name, case in cases.items():
            torch.manual_seed(1000 + rank)  # ranks' global RNGs differ: Monte-Carlo priors must come from the seed
            sizes = case["split"]
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            results[name] = run_case(case, rows, sync=True, post_loss=rank == 0)
        torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
