"""torch.distributed (gloo) and MPI runs, one agent per spawned process, against co-located.

Every process records its agents' parameters at every step; the test compares them with the
co-located run of the same configuration.  Every run is bounded in time and cleaned up.
"""

import pytest
import torch

import topology
from tests.spawn import run_mpi, run_torch
from tests.test_colocated import gossip_matrices
from tests.trajectories import relative_deviation, simulation_trajectory

TOL = 1e-12
STEPS = 300
CASES = {2: ((5,), (0.5,)), 3: ((3, 2), (0.5, 0.6)), 4: ((2, 2, 2), (0.5, 0.6, 0.7))}


def load_ranks(out, nprocs):
    return [torch.load(out / f"rank{r}.pt") for r in range(nprocs)]


def check_against_colocated(ranks, schedule, optimizer, policy, steps):
    colocated, _ = simulation_trajectory(schedule, optimizer, policy, steps)
    worst = 0.0
    for saved in ranks:
        for column, agent in enumerate(saved["agents"]):
            worst = max(worst, relative_deviation(saved["trajectory"][:, column], colocated[:, agent]))
    print(f"max deviation vs co-located: {worst:.3e}")
    assert worst <= TOL, worst
    return worst


POLICIES = {2: "maintain", 3: "pullback", 4: "reset"}


def run_gloo_case(tmp_path, nprocs, **extra):
    """LA-(nprocs - 1) of CASES with Adam and POLICIES[nprocs] on nprocs gloo ranks (``extra``:
    more worker spec keys), checked against co-located: (ranks' records, schedule, deviation)."""
    ks, alphas = CASES[nprocs]
    spec = dict(backend="torch", ks=ks, alphas=alphas, optimizer="adam", policy=POLICIES[nprocs], steps=STEPS,
                out=str(tmp_path), scramble_init=True, **extra)
    results = run_torch(nprocs, spec)
    assert all(code == 0 for code, _ in results), results
    ranks = load_ranks(tmp_path, nprocs)
    schedule = topology.multilayer(ks, alphas)
    return ranks, schedule, check_against_colocated(ranks, schedule, "adam", POLICIES[nprocs], STEPS)


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_torch_gloo_equals_colocated(tmp_path, nprocs):
    ranks, schedule, worst = run_gloo_case(tmp_path, nprocs)
    policy = POLICIES[nprocs]
    if nprocs == 2:
        # A two-term sum is commutative: co-located and distributed agree bit for bit.
        assert worst == 0.0

    # Collectives counted through the communicator: one all-reduce per block per sync on every
    # rank of the block, d * itemsize bytes (times 3 with Adam's two moments under pullback),
    # and nothing at all on identity steps.
    d = ranks[0]["trajectory"].shape[-1]
    width = 3 if policy == "pullback" else 1
    for rank, saved in enumerate(ranks):
        for t in range(STEPS):
            level = schedule.level(t)
            expected = 1 if level >= rank and level > 0 else 0
            assert saved["all_reduces"][t] == expected, (rank, t)
            assert saved["bytes"][t] == expected * d * width * 8, (rank, t)
            assert saved["sends"][t] == 0
    # Every rank gathers every agent's named parameters.
    assert len(ranks[-1]["gathered"]) == nprocs


def test_mpi_equals_colocated(tmp_path):
    ks, alphas = CASES[3]
    spec = dict(backend="mpi", ks=ks, alphas=alphas, optimizer="sgd_momentum", policy="pullback",
                steps=STEPS, out=str(tmp_path), scramble_init=True)
    code, output = run_mpi(3, spec)
    assert code == 0, output
    ranks = load_ranks(tmp_path, 3)
    check_against_colocated(ranks, topology.multilayer(ks, alphas), "sgd_momentum", "pullback", STEPS)
    assert [sum(r["all_reduces"]) for r in ranks] == [100, 100, 50]


def test_gossip_exchange_across_processes_equals_colocated(tmp_path):
    """Gossip columns become point-to-point messages; blocks all-reduces on subgroups."""
    m = 5
    matrices = [p.tolist() for p in gossip_matrices(m)]
    spec = dict(backend="torch", matrices=matrices, optimizer="sgd_momentum", policy="maintain",
                steps=30, out=str(tmp_path))
    results = run_torch(m, spec)
    assert all(code == 0 for code, _ in results), results
    ranks = load_ranks(tmp_path, m)
    check_against_colocated(ranks, topology.from_matrices(matrices), "sgd_momentum", "maintain", 30)
    # On the ring step (t = 1 mod 3) every agent sends its value to its two neighbours.
    for saved in ranks:
        assert saved["sends"][1] == 2 and saved["sends"][0] == 0


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(ks=[5], alphas=[0.5]), "world size 3 does not fit the schedule's 2 agents"),
        (dict(ks=[3, 2], alphas=[0.5, 0.5], wider_model_on_rank=2),
         "model parameters must have the same names, shapes and dtypes on every rank"),
    ],
)
def test_bad_input_fails_on_every_rank_without_hanging(tmp_path, spec, words):
    spec = dict(spec, backend="torch", optimizer="sgd", policy="maintain", steps=10, out=str(tmp_path),
                timeout_s=30)
    results = run_torch(3, spec, timeout=90)
    assert [code for code, _ in results] == [3, 3, 3], results
    for rank in range(3):
        assert words in (tmp_path / f"rank{rank}.err").read_text()


def test_mpi_bad_world_size_fails_on_every_rank(tmp_path):
    spec = dict(backend="mpi", ks=[5], alphas=[0.5], optimizer="sgd", policy="maintain", steps=10,
                out=str(tmp_path))
    code, output = run_mpi(3, spec, timeout=90)
    assert code != 0
    for rank in range(3):
        assert "world size 3 does not fit" in (tmp_path / f"rank{rank}.err").read_text()


def test_nccl_refuses_two_ranks_on_one_gpu(monkeypatch):
    from launch.comm import torch_dist as torch_comm

    monkeypatch.setattr(torch_comm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch_comm.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 ranks on this node but only 1 CUDA device"):
        torch_comm.choose_device_and_backend("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torch_comm.choose_device_and_backend("cuda") == (torch.device("cuda", 0), "nccl")
    assert torch_comm.choose_device_and_backend(None) == (torch.device("cpu"), "gloo")     # the model's device
    assert torch_comm.choose_device_and_backend("cpu") == (torch.device("cpu"), "gloo")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs at least 2 CUDA devices for NCCL with one GPU per rank")
def test_nccl_equals_colocated(tmp_path):  # pragma: no cover - needs GPUs
    ks, alphas = CASES[2]
    spec = dict(backend="torch", device="cuda", ks=ks, alphas=alphas, optimizer="adam", policy="maintain",
                steps=50, out=str(tmp_path))
    results = run_torch(2, spec)
    assert all(code == 0 for code, _ in results), results
    check_against_colocated(load_ranks(tmp_path, 2), topology.multilayer(ks, alphas), "adam", "maintain", 50)
