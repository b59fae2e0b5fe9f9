"""Phased schedules in the simulator: each phase runs as its own schedule would from its own
counter (agent by agent, step by step, float64), a checkpoint taken in the middle of a phase
resumes bit for bit, and the plans are compiled once per distinct matrix of the union."""

import torch

import topology
from launch.engine.store.checkpoint import Checkpointer
from launch.engine.simulation import Simulation
from tests import problems
from topology import decentralized as dec

STEPS = 30


def phased():
    """Post-local SGD with a Lookahead-like middle: 3 workers averaged every step for 5 steps,
    a ring for 7, then local SGD every 4."""
    return topology.phases([(5, dec.local_sgd(3, 1)), (7, dec.ring(3)), (None, dec.local_sgd(3, 4))])


def make(schedule, seed=0):
    return Simulation(problems.make_model(seed), problems.loss_fn, lambda i: problems.batches(i + 1), schedule,
                      problems.OPTIMIZERS["sgd_momentum"])


def trajectory(sim, steps):
    rows = []
    for _ in range(steps):
        sim.step()
        rows.append(torch.stack([sim.agents[i].params.clone() for i in sorted(sim.agents)]))
    return torch.stack(rows)


def test_each_phase_applies_its_own_schedule_from_its_own_counter():
    """The phased simulation equals a simulation that applies, at every t, the phase's schedule's
    matrix at the phase's own counter (an explicit schedule built from those matrices)."""
    schedule = phased()
    explicit = topology.from_matrices([schedule.matrix(t) for t in range(STEPS)])
    got, want = trajectory(make(schedule), STEPS), trajectory(make(explicit), STEPS)
    assert torch.equal(got, want)
    # The last phase is local SGD every 4 steps from its own start (t = 12): syncs at t = 15, 19, ...
    assert [t for t in range(12, STEPS) if schedule.next_sync(t) == t] == [15, 19, 23, 27]


def test_plans_are_compiled_once_per_distinct_matrix_of_the_union():
    sim = make(phased())
    assert len(sim.engine.programs) == len(sim.schedule.distinct_matrices)


def test_a_checkpoint_in_the_middle_of_a_phase_resumes_bit_for_bit(tmp_path):
    cut = 9          # inside the ring phase (t = 5 .. 11)
    full = trajectory(make(phased()), STEPS)
    first = make(phased())
    trajectory(first, cut)
    Checkpointer(tmp_path).save(first)
    resumed = make(phased(), seed=3)          # other initial values: all must come from the checkpoint
    assert Checkpointer(tmp_path).load(resumed) == cut
    assert torch.equal(trajectory(resumed, STEPS - cut), full[cut:])
