"""``python tests/bn_app.py OVERRIDES``: ``python -m launch`` with one more problem registered,
``teacher_student_bn``: the teacher-student regression with a BatchNorm layer in the student, so
that the agents have buffers (running statistics) that P_t does not mix.  Used by
tests/test_results.py, also under torchrun (every process registers it the same way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.base import Problem  # noqa: E402
from experiments.problems import PROBLEMS, teacher_student  # noqa: E402


def teacher_student_bn(dim: int = 6, hidden: int = 8, batch_size: int = 16, noise: float = 0.1, seed: int = 0,
                       dtype=torch.float64) -> Problem:
    """:func:`experiments.problems.teacher_student`'s data; the student ``Linear, BatchNorm1d, Tanh,
    Linear``; evaluated in ``eval()`` mode (the running statistics)."""
    base = teacher_student(dim=dim, hidden=hidden, batch_size=batch_size, noise=noise, seed=seed, dtype=dtype)

    def model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)

    def evaluate(module) -> dict:
        was_training = module.training
        module.eval()
        try:
            return base.evaluate(module)
        finally:
            module.train(was_training)

    return Problem("teacher_student_bn", model, base.loss_fn, base.batches, evaluate)


def register() -> None:
    PROBLEMS["teacher_student_bn"] = teacher_student_bn


if __name__ == "__main__":
    register()
    from launch.cli.app import main

    sys.exit(main())
