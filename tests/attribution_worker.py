"""One rank of tests/test_reliability_faults.py::test_every_collective_goes_through_the_lost_rank_handler
(and of its refused resume).

Usage: python tests/attribution_worker.py '{"out": OUT_DIR}' (under torch.distributed's
environment, 2 ranks).  Runs command-line jobs in this process (checkpoints and a resume, metrics at every step,
overlapped syncs, gossip) and the engine's diagnostics, on a TorchCommunicator whose every blocking
operation (and every wait of an asynchronous one, except those of ``close``) records whether it
runs inside :func:`launch.engine.guard.health.collective` (``comm.context`` set).  Writes the operations that ran
outside it, with where they were called from, to ``OUT_DIR/violations-rank{R}.json``, with the
status of a resume of the first job's checkpoint with another learning rate (refused: 2).
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
# Imported before any process group exists, as TorchCommunicator does (else an abort at exit, now
# and then: "terminate called without an active exception").
import torch._dynamo  # noqa: E402,F401

import topology  # noqa: E402
from launch.cli import app  # noqa: E402
from launch.comm.torch_dist import TorchCommunicator  # noqa: E402
from launch.engine.readout import MetricsHook, consensus_distance  # noqa: E402
from launch.engine.simulation import Simulation  # noqa: E402
from tests import problems  # noqa: E402
from tests.test_app import config  # noqa: E402

VIOLATIONS: list = []
CHECKED = ("all_gather_object", "broadcast_", "all_reduce_", "exchange", "max_flags_", "barrier", "init_groups")


class CheckingCommunicator(TorchCommunicator):
    """A TorchCommunicator that records its operations run outside the lost-rank handler."""

    closing = False

    def close(self):
        # close() waits for what is still in flight, bounded by the timeout and ignoring errors
        # (a failed collective has already raised where its result was needed): not a collective
        # of the run.
        self.closing = True
        super().close()

    def _check(self, name):
        if self.context is None and not self.closing:
            VIOLATIONS.append({"operation": name, "stack": "".join(traceback.format_stack(limit=8)[:-2])})

    def _track(self, wait):
        def checked():
            self._check("wait of an asynchronous operation")
            wait()
        return super()._track(checked)


def _checked(name):
    def method(self, *args, **kwargs):
        self._check(name)
        return getattr(TorchCommunicator, name)(self, *args, **kwargs)
    return method


for _name in CHECKED:
    setattr(CheckingCommunicator, _name, _checked(_name))


def main() -> int:
    out = json.loads(sys.argv[1])["out"]
    torch.set_num_threads(1)
    # One process group for every job (a communicator that did not create it does not destroy it).
    torch.distributed.init_process_group("gloo")
    app.make_communicator = lambda launch, device=None, timeout_s=300.0: CheckingCommunicator("cpu", timeout_s)
    ckpt = os.path.join(out, "ckpt")
    jobs = [
        ("topology=lookahead", "launch.steps=7", "launch.checkpoint_every=3", f"launch.checkpoint_dir={ckpt}"),
        ("topology=lookahead", "launch.steps=10", "launch.resume=true", f"launch.checkpoint_dir={ckpt}"),
        ("topology=lookahead", "launch.steps=6", "launch.overlap=true"),
        ("topology=ring", "topology.n=4", "launch.steps=3"),
    ]
    for n, overrides in enumerate(jobs):
        status = app.run(config("launch=torch", "launch.log_every=1", *overrides), os.path.join(out, f"job{n}"))
        assert status == 0, (overrides, status)
    refused = app.run(config("launch=torch", "topology=lookahead", "launch.steps=12", "launch.resume=true",
                             f"launch.checkpoint_dir={ckpt}", "agents.optimizer.lr=0.2"), os.path.join(out, "refused"))
    comm = CheckingCommunicator("cpu", 60.0)
    sim = Simulation(problems.make_model(0), problems.loss_fn, lambda i: problems.batches(1 + i),
                     topology.decentralized.ring(4), problems.OPTIMIZERS["sgd_momentum"], comm=comm)
    sim.run(2, MetricsHook(lambda row: None))
    consensus_distance(sim)
    sim.gather_parameters()
    comm.close()
    torch.distributed.destroy_process_group()
    with open(os.path.join(out, f"violations-rank{sim.rank}.json"), "w") as f:
        json.dump({"violations": VIOLATIONS, "refused": refused}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
