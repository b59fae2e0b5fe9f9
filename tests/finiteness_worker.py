"""One rank of the finiteness tests: runs several cases in one process group, each with the check
on, the check off, or a NaN / Inf planted, and saves what every rank saw.

Usage: python tests/finiteness_worker.py SPEC_JSON.  SPEC: backend (torch | mpi), out (a folder),
cases ({name: case}).  A case: schedule (``["multilayer", ks, alphas]``, ``["with_slow_agent",
W, k, alpha]``, ``["phases", [[steps, schedule], ..., [None, schedule]]]`` or ``[decentralized
name, args...]``), steps, optionally overlap (default False), agents_per_rank, optimizer (a name
of ``tests.problems.OPTIMIZERS``, default sgd), trajectory (True: the local agents' buffers
after every step are kept), check_finite (default True), exact ("chain", "gather" or "shard": every
sync compiled with ``exact=True``, its blocks spanning ranks chained, gathered or sharded; default:
not exact),
state ("host" | "device": where MarkerCheck keeps its knowledge; default by the device), plant
({agent, t, kind: "param" | "loss" | "inf"}: the rank holding the agent writes NaN (``param``) or
-Inf (``inf``) into its parameter 3 at iteration t -- a worker's after its loss (a finite one) is
computed, a passive agent's before the iteration -- or the agent's loss of iteration t is +Inf
with a finite gradient (``loss``)).

Writes ``out/rank{R}.pt``: {name: {"error": None or {"step", "stopped", "parameters", "losses",
"message"}, "t": the counter when it ended, "counts": per step, the communicator's counts
(all_reduces, sends, reduces, block_broadcasts, chains, gathers, flag_reduces), "trajectory": per
step {agent: flat buffer} (empty unless asked), "buffers": the local agents' final flat buffers}}.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import topology  # noqa: E402
from launch.engine.guard import finiteness  # noqa: E402
from launch.engine.guard.health import NonFiniteError  # noqa: E402
from launch.engine.sync import ordered  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402
from tests.dist_worker import make_comm  # noqa: E402
from topology import decentralized  # noqa: E402
from topology.slow import with_slow_agent  # noqa: E402

_MARKER_CHECK = finiteness.MarkerCheck
COUNTS = ("all_reduces", "sends", "reduces", "block_broadcasts", "chains", "gathers", "flag_reduces")


def make_schedule(spec):
    name, *args = spec
    args = [{int(k): v for k, v in a.items()} if isinstance(a, dict) else a for a in args]   # JSON's keys
    if name == "multilayer":
        return topology.multilayer(*args)
    if name == "with_slow_agent":
        return with_slow_agent(*args)
    if name == "phases":
        return topology.phases([(steps, make_schedule(phase)) for steps, phase in args[0]])
    return decentralized.SCHEDULES[name](*args)


def force_state(state: str | None) -> None:
    """Where MarkerCheck keeps its knowledge: "host" or "device" forced (CUDA's way runs on CPU
    too), or None: by the device (the engine's own choice)."""
    forced = None if not state else state == "host"
    finiteness.MarkerCheck = _MARKER_CHECK if forced is None else _forced_marker_check(forced)


def _forced_marker_check(host: bool):
    class Forced(_MARKER_CHECK):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, host=host, **kwargs)

    return Forced


def choose_exact_strategy(case: dict) -> None:
    """``case["exact"]`` ("chain", "gather" or "shard"): the exact blocks spanning ranks chained,
    gathered or sharded (the Simulation runs with ``exact=True``), by moving gloo's thresholds."""
    if case.get("exact"):
        ordered.GATHER_MAX_BYTES = {"gloo": 1 << 40 if case["exact"] == "gather" else 0}
        ordered.SHARD_MIN_BYTES = {"gloo": 0} if case["exact"] == "shard" else {}


def run_case(case: dict, comm) -> dict:
    choose_exact_strategy(case)
    schedule = make_schedule(case["schedule"])
    plant = case.get("plant")
    modules = {}

    def loss_fn(module, batch):
        loss = problems.loss_fn(module, batch)
        if plant and modules.get(id(module)) == plant["agent"] and sim.t == plant["t"]:
            if plant["kind"] == "loss":
                loss = loss + float("inf")       # +inf loss, the usual (finite) gradient
            else:
                poison(sim.agents[plant["agent"]])
        return loss

    def poison(agent):
        with torch.no_grad():
            agent.params[3] = float("nan") if plant["kind"] == "param" else -float("inf")

    force_state(case.get("state"))
    sim = Simulation(problems.make_model(0), loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS[case.get("optimizer", "sgd")], comm=comm, agents_per_rank=case.get("agents_per_rank"),
                     overlap=case.get("overlap", False), check_finite=case.get("check_finite", True),
                     exact=bool(case.get("exact")))
    modules.update({id(a.module): i for i, a in sim.agents.items() if a.module is not None})
    counts, error, trajectory = [], None, []
    try:
        for t in range(case["steps"]):
            if (plant and plant["kind"] != "loss" and plant["t"] == t and plant["agent"] in sim.agents
                    and not sim.agents[plant["agent"]].is_worker):
                poison(sim.agents[plant["agent"]])
            before = [getattr(comm.stats, k) for k in COUNTS]
            sim.step()
            counts.append([getattr(comm.stats, k) - b for k, b in zip(COUNTS, before)])
            if case.get("trajectory"):
                sim.wait_in_flight()
                trajectory.append({i: a.flat.buffer.clone() for i, a in sim.agents.items()})
    except NonFiniteError as err:
        error = {"step": err.step, "stopped": list(err.stopped), "parameters": err.parameters,
                 "losses": err.losses, "message": str(err)}
    sim.wait_in_flight()
    comm.wait_in_flight()
    return {"error": error, "t": sim.t, "counts": counts, "trajectory": trajectory,
            "buffers": {i: a.flat.buffer.clone() for i, a in sim.agents.items()}}


def main(run=run_case) -> int:
    """Every case of the spec (argv[1]) through ``run(case, comm)``, saved as ``out/rank{R}.pt``."""
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    comm = make_comm(spec)
    results = {name: run(case, comm) for name, case in spec["cases"].items()}
    torch.save(results, os.path.join(spec["out"], f"rank{comm.rank}.pt"))
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
