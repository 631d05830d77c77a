"""Tasks, the distillation loss (EfficientBERT / TinyBERT) and plain training loops for the FFN search.

Loss (student s, teacher t, ``fit_dense``: a trainable linear d_s -> d_t, uniform layer map ``m(i) = (i+1) * Lt/Ls``):

    hidden = MSE(fit(h_s[0]), h_t[0]) + sum_i MSE(fit(h_s[i+1]), h_t[m(i)])          (embeddings + layer outputs)
    attn   = sum_i MSE(A_s[i], A_t[m(i)-1])     (pre-softmax scores; a padded key's score (<= -100) counts as 0)
    pred   = soft cross-entropy  -sum softmax(z_t / T) log_softmax(z_s / T), batch mean
    total  = hidden_ratio * (hidden + attn) + pred_ratio * pred

The loops are plain torch (AdamW, linear decay, in-memory batches from a seeded generator): a search runs hundreds
of sub-second trainings, where a Lightning ``Trainer`` per run would cost more than the training itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.data.listops import LISTOPS_SIZE
from nas.ffn.transformer import FFNArch, TinyTransformer

__all__ = [
    "TASKS",
    "Task",
    "load_task",
    "build_model",
    "soft_cross_entropy",
    "distill_losses",
    "batches",
    "train",
    "accuracy",
    "ArchSampler",
]

Splits = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Task:
    name: str
    input_dim: int | None
    vocab_size: int | None
    max_len: int
    num_classes: int
    loader: Callable[..., Splits]
    data: dict | None = None  # generator settings of a procedural task (recorded in ground-truth headers)


def _seqdigits(**kw) -> Splits:
    from nas.data.seqdigits import load_seqdigits_split

    return load_seqdigits_split(**kw)


def _listops(**kw) -> Splits:
    from nas.data.listops import load_listops_split

    return load_listops_split(**kw)


TASKS = {
    "seqdigits": Task("seqdigits", 8, None, 8, 10, _seqdigits),
    "listops": Task("listops", None, 16, LISTOPS_SIZE["max_len"], 10, _listops, dict(LISTOPS_SIZE)),
}


def load_task(name: str, seed: int = 0, fold: int | None = None, num_folds: int = 5,
              val_fraction: float = 0.2) -> tuple[Task, Splits]:
    """The task and its train/val/test tensors (test = ``fold`` of ``num_folds`` when given)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    return task, task.loader(seed=seed, fold=fold, num_folds=num_folds, val_fraction=val_fraction)


def build_model(task: Task, d: int, heads: int, layers: int, max_width: int, max_stack: int = 1) -> TinyTransformer:
    return TinyTransformer(d, heads, layers, task.num_classes, task.max_len, max_width, max_stack,
                           input_dim=task.input_dim, vocab_size=task.vocab_size)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``mean_b -sum_c softmax(t/T) log_softmax(s/T)`` for logits (B, C)."""
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return -(p * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def distill_losses(
    student_out: tuple[Tensor, list[Tensor], list[Tensor]],
    teacher_out: tuple[Tensor, list[Tensor], list[Tensor]],
    fit_dense: nn.Module,
    hidden_ratio: float = 1.0,
    pred_ratio: float = 1.0,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """The loss of the module docstring from ``(logits, hiddens, scores)`` of both models."""
    s_logits, s_hid, s_att = student_out
    t_logits, t_hid, t_att = teacher_out
    ls, lt = len(s_att), len(t_att)
    if lt % ls:
        raise ValueError(f"teacher layers {lt} must be a multiple of student layers {ls}")
    step = lt // ls
    zero = lambda a: torch.where(a <= -1e2, torch.zeros_like(a), a)  # padded keys  # noqa: E731
    hidden = F.mse_loss(fit_dense(s_hid[0]), t_hid[0])
    attn = s_logits.new_zeros(())
    for i in range(ls):
        m = (i + 1) * step
        hidden = hidden + F.mse_loss(fit_dense(s_hid[i + 1]), t_hid[m])
        attn = attn + F.mse_loss(zero(s_att[i]), zero(t_att[m - 1]))
    pred = soft_cross_entropy(s_logits, t_logits, temperature)
    total = hidden_ratio * (hidden + attn) + pred_ratio * pred
    return {"total": total, "hidden": hidden, "attn": attn, "pred": pred}


def batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches in a random order (``generator``) or in order (None)."""
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]


ArchSampler = Callable[[int], FFNArch]  # step -> the arch trained at that step


def train(
    model: TinyTransformer,
    arch: FFNArch | ArchSampler,
    data: tuple[Tensor, Tensor],
    epochs: float,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    teacher: tuple[TinyTransformer, FFNArch] | None = None,
    fit_dense: nn.Module | None = None,
    hidden_ratio: float = 1.0,
    pred_ratio: float = 1.0,
    weight_decay: float = 1e-4,
) -> float:
    """Train ``model`` (and ``fit_dense``) in place: cross-entropy, or distillation from ``teacher`` (frozen,
    eval). ``arch`` may be a function of the step (a supernet's path sampler). ``epochs`` may be fractional.
    Returns the mean loss of the last epoch."""
    x, y = data
    steps_per_epoch = -(-len(y) // batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    params = list(model.parameters()) + (list(fit_dense.parameters()) if fit_dense is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total_steps)
    gen = torch.Generator().manual_seed(seed)
    if teacher is not None:
        if fit_dense is None:
            raise ValueError("distillation needs fit_dense (student d -> teacher d)")
        teacher[0].eval()
    model.train()
    step, last = 0, []
    while step < total_steps:
        last = []
        for xb, yb in batches(x, y, batch_size, gen):
            a = arch(step) if callable(arch) else arch
            if teacher is None:
                loss = F.cross_entropy(model(xb, a), yb)
            else:
                with torch.no_grad():
                    t_out = teacher[0](xb, teacher[1], return_all=True)
                loss = distill_losses(model(xb, a, return_all=True), t_out, fit_dense, hidden_ratio,
                                      pred_ratio)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last.append(float(loss.detach()))
            step += 1
            if step >= total_steps:
                break
    model.eval()
    return sum(last) / max(1, len(last))


@torch.no_grad()
def accuracy(model: TinyTransformer, arch: FFNArch, data: tuple[Tensor, Tensor], batch_size: int = 512) -> float:
    model.eval()
    x, y = data
    correct = sum(int((model(xb, arch).argmax(-1) == yb).sum()) for xb, yb in batches(x, y, batch_size, None))
    return correct / len(y)
