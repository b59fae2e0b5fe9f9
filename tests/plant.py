"""A deviation planted in a command-line run, to show that the checks can fail (tests only).

:func:`install` patches the runs of :mod:`launch.cli.runs`: after iteration ``step`` (from 0) of
the run named ``run`` (serial | colocated | torch | mpi), ``size`` is added to every parameter of
agent ``agent`` where it lives.  ``python tests/plant.py SPEC_JSON MODULE ARGS...`` installs the
plant in this process and runs ``python -m MODULE ARGS...`` (``launch`` or ``launch.equivalence``),
so that torchrun can start it on every rank.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from launch.cli.runs import SerialRun, SimulationRun  # noqa: E402


def install(plant: dict, patch=None) -> None:
    """Plant ``{run, agent, step, size}`` (keys as in the module docstring; defaults colocated,
    0, 0, 1e-6).  ``patch(obj, name, value)`` sets the attributes (a pytest ``monkeypatch.setattr``
    undoes them after the test; default: setattr)."""
    run, agent, step, size = (plant.get("run", "colocated"), plant.get("agent", 0), plant.get("step", 0),
                              plant.get("size", 1e-6))
    patch = patch or setattr

    def planted(original):
        def step_(self, before_sync=None):
            losses = original(self, before_sync)
            done = self.t if isinstance(self, SerialRun) else self.engine.t
            if self.name == run and done == step + 1:
                _perturb(self, agent, size)
            return losses
        return step_

    for cls in (SerialRun, SimulationRun):
        patch(cls, "step", planted(cls.step))


@torch.no_grad()
def _perturb(run, agent: int, size: float) -> None:
    if isinstance(run, SerialRun):   # its columns are copies: perturb the tensors they are made of
        for p in (run.params if agent == 0 else run.optimizer.slow_params(agent)):
            p.add_(size)
    elif agent in run.columns():
        run.columns()[agent].add_(size)


if __name__ == "__main__":
    spec, module, *args = sys.argv[1:]
    install(json.loads(spec))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
