"""Decentralized cases shared by the multi-process worker and the tests: schedules from JSON-able
specs, and one run of a case recording every local agent's whole flat buffer at every step."""

from __future__ import annotations

import torch

from launch.engine.readout import consensus_distance
from launch.engine.simulation import Simulation
from tests import problems
from topology import decentralized


def build_schedule(build):
    """``[name, args, kwargs]`` -> ``topology.decentralized.SCHEDULES[name](*args, **kwargs)``."""
    name, args, kwargs = build
    # {period: group_size} mappings come from JSON with string keys.
    def periods(v):
        return {int(p): g for p, g in v.items()} if isinstance(v, dict) else v

    args = [periods(a) for a in args]
    kwargs = {k: periods(v) for k, v in kwargs.items()}
    return decentralized.SCHEDULES[name](*args, **kwargs)


def run_case(case: dict, comm=None) -> dict:
    """Run ``case`` (build, agents_per_rank, steps, mode, optimizer, policy) on ``comm``.

    mode ``train``: inner steps and syncs.  mode ``hand``: before each sync every local agent's
    parameters are set to its agent index, so every mixed value is known in closed form.
    Returns the local agents, their flat buffers (steps, local agents, buffer size), the
    communication counted per step and, in ``train`` mode, the consensus distance per step.
    """
    schedule = build_schedule(case["build"])
    sim = Simulation(
        problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
        problems.OPTIMIZERS[case.get("optimizer", "sgd")], state_policy=case.get("policy", "maintain"),
        comm=comm, agents_per_rank=case.get("agents_per_rank"),
    )
    stats = sim.comm.stats
    rows, counts, distances = [], [], []
    for t in range(case["steps"]):
        before = (stats.all_reduces, stats.all_reduce_bytes, stats.sends, stats.send_bytes)
        if case.get("mode", "train") == "hand":
            with torch.no_grad():
                for i, agent in sim.agents.items():
                    agent.params.fill_(float(i))
            sim.engine.end_step({})
        else:
            sim.step()
        after = (stats.all_reduces, stats.all_reduce_bytes, stats.sends, stats.send_bytes)
        counts.append([b - a for a, b in zip(before, after)])
        if case.get("mode", "train") == "train":
            distances.append(consensus_distance(sim))
        rows.append(torch.stack([sim.agents[i].flat.buffer.clone() for i in sorted(sim.agents)]))
    return {"agents": sorted(sim.agents), "buffers": torch.stack(rows), "counts": counts,
            "distances": distances, "world_size": sim.comm.world_size}
