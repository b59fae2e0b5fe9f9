"""One rank of a reliability test: runs jobs with checkpoints, and can pause, die or see NaN.

Usage: python tests/reliability_worker.py SPEC_JSON.  SPEC keys: backend (torch | mpi | local),
ks, alphas, optimizer, policy, out (a folder), jobs, and optionally overlap, timeout_s, pause, die,
poison.

* jobs: a list of {name, dtype, steps, noisy, ckpt, every, resume}: each builds a fresh
  Simulation of the spec (``noisy``: the loss of tests/test_checkpoint.py that draws from the
  global RNGs, seeded from ``seed``), loads the checkpoint in ``resume`` (a folder) when given,
  runs until t == steps saving into ``ckpt`` every ``every`` iterations, and saves every step's
  flat buffers of its local agents to ``out/{name}-rank{R}.pt``.
* pause {rank, t, marker}: that rank writes ``marker`` before iteration t (t >= 1) and sleeps
  (the test kills it, or lets the others time out).
* die {rank, t}: that rank SIGKILLs itself before iteration t (t >= 1).
* poison {agent, at}: batch ``at`` of that agent's stream is NaN.
* corrupt {agent, t}: before iteration t, the rank holding that agent sets its first parameter to
  NaN (a passive agent, which no batch can reach).

Exit status: 0, or 3 (ValueError), 4 (NonFiniteError), 5 (RankFailureError), with
``out/rank{R}.err`` holding ``ExceptionType: message``.
"""

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import topology  # noqa: E402
from launch.engine.simulation import run_with_checkpoints  # noqa: E402
from launch.engine.store.checkpoint import Checkpointer  # noqa: E402
from launch.comm import LocalCommunicator  # noqa: E402
from launch.engine.guard.health import NonFiniteError, RankFailureError  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402
from tests.test_checkpoint import noisy_loss  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EXIT = {ValueError: 3, NonFiniteError: 4, RankFailureError: 5}


def make_comm(spec):
    if spec["backend"] == "mpi":
        from launch.comm.mpi import MPICommunicator

        return MPICommunicator()
    if spec["backend"] == "local":
        return LocalCommunicator()
    from launch.comm.torch_dist import TorchCommunicator

    return TorchCommunicator(device="cpu", timeout_s=spec.get("timeout_s", 60))


def stream(spec, agent, dtype):
    poison = spec.get("poison")
    for n, (x, y) in enumerate(problems.batches(1 + agent, dtype)):
        yield (x.clone().fill_(float("nan")), y) if poison and poison["agent"] == agent and n == poison["at"] else (x, y)


def run_job(spec, job, comm):
    dtype = DTYPES[job.get("dtype", "float64")]
    seed = job.get("seed", 0) + comm.rank
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    schedule = topology.multilayer(spec["ks"], spec["alphas"])
    sim = Simulation(
        problems.make_model(0, dtype), noisy_loss if job.get("noisy") else problems.loss_fn,
        stream(spec, 0, dtype), schedule, problems.OPTIMIZERS[spec["optimizer"]],
        state_policy=spec["policy"], comm=comm, agents_per_rank=spec.get("agents_per_rank"),
        overlap=spec.get("overlap", False),
    )
    if job.get("resume"):
        Checkpointer(job["resume"]).load(sim, required=True)
    pause, die = spec.get("pause"), spec.get("die")
    rows = []

    def after_step(sim, losses):
        """Record iteration t - 1; then, before iteration t starts, pause or die if asked."""
        rows.append(torch.stack([sim.agents[i].flat.buffer.clone() for i in sorted(sim.agents)]))
        corrupt = spec.get("corrupt")
        if corrupt and corrupt["agent"] in sim.agents and corrupt["t"] == sim.t:
            sim.agents[corrupt["agent"]].flat.buffer[0] = float("nan")
        if pause and pause["rank"] == comm.rank and pause["t"] == sim.t:
            with open(pause["marker"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)
        if die and die["rank"] == comm.rank and die["t"] == sim.t:
            os.kill(os.getpid(), signal.SIGKILL)

    if job.get("ckpt"):
        run_with_checkpoints(sim, job["steps"], Checkpointer(job["ckpt"], every=job.get("every"), keep=None),
                             after_step)
    else:
        sim.run(job["steps"] - sim.t, after_step)
    torch.save({"agents": sorted(sim.agents), "trajectory": torch.stack(rows)},
               os.path.join(spec["out"], f"{job['name']}-rank{comm.rank}.pt"))


def main() -> int:
    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    comm = make_comm(spec)
    try:
        for job in spec["jobs"]:
            run_job(spec, job, comm)
    except tuple(EXIT) as err:
        with open(os.path.join(spec["out"], f"rank{comm.rank}.err"), "w") as f:
            f.write(f"{type(err).__name__}: {err}")
        print(f"rank {comm.rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        # After a lost peer the process group cannot be torn down cleanly: leave without it.
        os._exit(next(code for kind, code in EXIT.items() if isinstance(err, kind)))
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
