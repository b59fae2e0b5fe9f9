"""One rank of the metrics test: a Simulation seen as a CLI run, its metrics logged off the
critical path (launch.engine.record.metrics.MetricsProbe.log), the collectives each log call starts counted.

Usage: python tests/metrics_worker.py SPEC_JSON; SPEC: backend (torch), out, cases ({name: {schedule, steps, every}}),
schedule as in tests/finiteness_worker.py.  Writes ``out/rank{R}.pt``: {name: {"rows": [(step,
rows, wall)] (rank 0), "counts": per log call and for finish, (all_reduces, reduces,
block_broadcasts) started}}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from launch.engine.record.metrics import MetricsProbe  # noqa: E402
from launch.cli.runs import SimulationRun  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402
from tests.finiteness_worker import main, make_schedule  # noqa: E402

COUNTS = ("all_reduces", "reduces", "block_broadcasts")


def run_case(case, comm=None):
    """The logged rows and, distributed, the collectives every log call started."""
    schedule = make_schedule(case["schedule"])
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i), schedule,
                     problems.OPTIMIZERS["sgd"], comm=comm)
    run = SimulationRun(sim, "torch" if comm is not None else "colocated")
    probe = MetricsProbe(run, comm, schedule)
    rows, counts = [], []
    stats = sim.comm.stats

    def counted(call):
        before = [getattr(stats, k) for k in COUNTS]
        rows.extend(call())
        counts.append([getattr(stats, k) - b for k, b in zip(COUNTS, before)])

    for t in range(case["steps"]):
        done = t + 1
        if done % case["every"] == 0 or done == case["steps"]:   # logged before the sync, as a run does
            run.step(lambda losses: counted(lambda: probe.log(done, losses, 0.0)))
        else:
            run.step()
    counted(probe.finish)
    return {"rows": rows, "counts": counts}


if __name__ == "__main__":
    sys.exit(main(run_case))
