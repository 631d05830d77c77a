"""The pool's workers keep their heap (``stflow.pool.keep_heap``): a small convolutional training step in a fresh
process with glibc's defaults faults its buffers in again at every step; in a pool worker it does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from stflow.pool import init_worker
torch.set_num_threads(1)
if sys.argv[1] == "worker":
    init_worker(1)
m = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.SiLU(),
                        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.SiLU())
opt = torch.optim.SGD(m.parameters(), 0.01)
x = torch.randn(64, 16, 16, 16)
def step():
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_a_pool_worker_keeps_its_heap_so_training_steps_do_not_fault_buffers_in_again():
    default = _faults_per_step("plain")
    if default < 500:
        pytest.skip(f"this C library already keeps the heap ({default:.0f} minor faults per step)")
    worker = _faults_per_step("worker")
    assert worker < default / 20, (worker, default)  # measured here: ~5,000 vs ~50 per step
