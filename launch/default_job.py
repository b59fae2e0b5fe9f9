"""The default job: LA-2 co-located on a built-in problem, checked against the serial reference.

``python -m launch`` runs multilayer Lookahead with two slow levels (ks = (5, 2), alphas =
(0.5, 0.5), SGD with momentum inside) on the teacher-student regression of
:mod:`experiments.problems`, in float64, and at every step compares every agent with the serial
:class:`agents.reference.MultilayerLookahead` fed the same batches.  It prints each agent's final
held-out loss and its largest deviation from the reference.
"""

from __future__ import annotations

import copy
import time

import torch
from tqdm import tqdm

import topology
from agents.flat import load_flat_
from agents.reference import MultilayerLookahead
from experiments.problems import teacher_student
from launch.simulation import Simulation


def run_default_job(steps: int = 600, ks=(5, 2), alphas=(0.5, 0.5), lr: float = 0.05,
                    momentum: float = 0.9, state_policy: str = "maintain") -> dict:
    problem = teacher_student()
    schedule = topology.multilayer(ks, alphas)

    def inner(params):
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    sim = Simulation(problem.model(), problem.loss_fn, problem.batches(0), schedule, inner,
                     state_policy=state_policy)

    reference_model = problem.model()
    reference = MultilayerLookahead(inner(list(reference_model.parameters())), ks, alphas,
                                    state_policy=state_policy)
    reference_data = problem.batches(0)

    def reference_columns():
        columns = [torch.cat([p.detach().reshape(-1) for p in reference_model.parameters()])]
        for level in range(1, schedule.depth + 1):
            columns.append(torch.cat([s.reshape(-1) for s in reference.slow_params(level)]))
        return columns

    deviation = [0.0] * schedule.num_agents
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"LA-{schedule.depth} co-located", unit="step")
    for t in bar:
        losses = sim.step()
        reference.zero_grad()
        problem.loss_fn(reference_model, next(reference_data)).backward()
        reference.step()
        for i, ref in enumerate(reference_columns()):
            scale = ref.abs().max().item()
            deviation[i] = max(deviation[i], (sim.agents[i].params - ref).abs().max().item() / scale)
        if t % 50 == 0 or t == steps - 1:
            rate = (t + 1) / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[0].item():.4f}", steps_per_s=f"{rate:.0f}")
    bar.close()

    template = copy.deepcopy(problem.model())
    rows = []
    for i in range(schedule.num_agents):
        role = "fast (worker)" if i == 0 else f"slow level {i}"
        loss = problem.evaluate(load_flat_(template, sim.agents[i].params))["loss"]
        rows.append({"agent": i, "role": role, "loss": loss, "deviation": deviation[i]})
    return {"rows": rows, "steps": steps, "schedule": repr(schedule)}


def print_report(report: dict) -> None:
    print(f"\n{report['schedule']}, {report['steps']} steps, float64, co-located vs serial reference")
    print(f"{'agent':>5}  {'role':<14}  {'held-out loss':>13}  {'max rel. deviation':>18}")
    for row in report["rows"]:
        print(f"{row['agent']:>5}  {row['role']:<14}  {row['loss']:>13.6f}  {row['deviation']:>18.3e}")


def main() -> int:
    # The problem is tiny: intra-op threads cost more than they give (and much more when the
    # cores are shared).
    torch.set_num_threads(1)
    report = run_default_job()
    print_report(report)
    worst = max(row["deviation"] for row in report["rows"])
    return 0 if worst <= 1e-12 else 1
