"""The benchmark suite (python -m launch.bench): a tiny run end to end, and the counts it relies on.

The benchmarks' speed and memory figures are never asserted here (they are ratios printed by the
benchmark itself); what is tested is that the suite runs, writes every key, and that the
collective and byte counts it reports are the plan's.
"""

import json
import subprocess
import sys

import pytest
import torch

import topology
from launch.bench import gpu, workloads
from launch.bench.colocated import ring, sgd
from launch.bench.gpu import PARTS
from launch.bench.suite import BENCHMARKS, TINY, _merge_sync_rows
from launch.bench.timing import interleave, ratio
from launch.comm import Communicator
from launch.engine.simulation import Simulation
from tests.spawn import ROOT, _env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run([sys.executable, "-m", "launch.bench", "--tiny", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    return done, out


def test_tiny_run_exits_0_and_writes_every_benchmark(tiny):
    done, out = tiny
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert set(BENCHMARKS) <= set(results)
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]
    for name in ("B1", "B2", "B3", "B5", "B6", "B7", "B8"):
        rows = results[name]["rows"]
        assert rows and all(row["ratio"] > 0 for row in rows if "skipped" not in row), name
    assert [r["name"] for r in results["B1"]["rows"][:3]] == [f"LA-{n} / bare SGD" for n in (1, 2, 4)]
    assert {r["name"] for r in results["B4"]["rows"]} >= {"bare", "colocated LA-1", "distributed LA-1 fast rank",
                                                          "distributed LA-1 fast rank, overlap"}
    b3 = [r["name"] for r in results["B3"]["rows"]]
    assert len(b3) == 5 and "(default)" in b3[0] and "(default, no check)" in b3[1] and "(overlap off)" in b3[2], b3
    assert "(exact) / serial" in b3[3] and "(exact) / (default)" in b3[4], b3
    assert results["B3"]["default_overlapped"] is True          # overlap="auto" overlaps LA's syncs
    assert all(r["ratio_check_off"] > 0 for r in results["B2"]["rows"])
    # B6: the same averaging on the same steps gives PyTorch's bits, for every period.
    b6 = [r for r in results["B6"]["rows"] if not r.get("own_loop")]
    own = [r for r in results["B6"]["rows"] if r.get("own_loop")]
    assert [(r["workers"], r["period"]) for r in b6] == [(w, p) for w in TINY.b6_workers for p in TINY.b6_periods]
    assert all(r["bit_identical"] and r["averaging_ratio"] > 0 for r in b6)
    assert [(r["workers"], r["period"]) for r in own] == [(r["workers"], r["period"]) for r in b6]
    assert all(r["bit_identical"] and r["ratio"] > 0 for r in own)          # AgentOptimizer: PyTorch's bits too
    assert results["B7"]["rows"][0]["metrics_rows"] > 0
    # B8: the exact sync is a chain on gloo, and the rule's rows time the three strategies.
    assert all(r["strategy"] == "ChainBlock" and r["exact_counts_per_sync"]["chains"] == 1
               for r in results["B8"]["rows"])
    assert all(r["gather_ratio"] > 0 and r["shards_ratio"] > 0 and r["chain_ratio"] > 0
               and r["rule"] == "ChainBlock" for r in results["B8"]["rule_rows"])
    assert all(r["peak_bytes"] > 0 for r in results["B4"]["rows"])
    if torch.cuda.is_available():
        assert "rows" in results["GPU"] or "needs 2 CUDA devices" in results["GPU"]["skipped"]
    else:
        assert results["GPU"] == {"skipped": "no CUDA device", "wall_seconds": results["GPU"]["wall_seconds"]}
    # The table names every benchmark.
    for name in BENCHMARKS:
        assert f"\n{name:<4}" in "\n" + done.stdout


def test_tiny_run_reports_one_all_reduce_of_d_itemsize_bytes_per_sync(tiny):
    _, out = tiny
    rows = json.loads(out.read_text())["B2"]["rows"]
    assert [(r["processes"], r["parameters"]) for r in rows] == [(n, d) for n in TINY.b2_processes for d in TINY.b2_sizes]
    for row in rows:
        assert row["collectives_per_sync"] == 1 and row["flag_reduces_per_sync"] == 0   # the check: none
        assert row["bytes_per_sync"] == row["parameters"] * 4      # float32 flat buffer
        assert row["plan_collectives"] == 1 and row["plan_bytes"] == row["parameters"] * 4
        assert row["counts_match_plan_on_every_rank"] is True


class CountingRank(Communicator):
    """Rank ``rank`` of a pretend world: collectives are counted (by the base class) and do nothing."""

    backend = "counting"

    def __init__(self, rank, world_size):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def all_gather_object(self, obj):
        return [obj] * self.world_size

    def broadcast_(self, tensor, src):
        self.stats.broadcasts += 1

    def all_reduce_(self, tensor, ranks):
        assert self.rank in ranks
        self._count_all_reduce(tensor)

    def exchange(self, sends, recvs):
        self._count_sends(sends)


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_every_rank_counts_one_all_reduce_of_d_itemsize_bytes_per_sync_it_is_in(nprocs):
    """What B2 relies on: an LA-n sync of level L costs ranks 0..L one all-reduce each of the flat
    buffer (d x itemsize bytes) and costs the others nothing; the outermost is the plan's one block."""
    d, depth = 1000, nprocs - 1
    schedule = topology.multilayer((2,) * depth, (0.5,) * depth)
    for rank in range(nprocs):
        comm = CountingRank(rank, nprocs)
        sim = Simulation(workloads.FlatVector(d), workloads.loss_fn, iter(()), schedule, sgd(), comm=comm,
                         overlap=False)
        for t in range(schedule.period):
            before = (comm.stats.all_reduces, comm.stats.all_reduce_bytes)
            sim.engine.sync(t)
            level = schedule.level(t)
            expected = 1 if level > 0 and rank <= level else 0
            assert comm.stats.all_reduces - before[0] == expected, (rank, t)
            assert comm.stats.all_reduce_bytes - before[1] == expected * d * 4, (rank, t)
        assert sim.engine.programs[schedule.matrix_index(schedule.period - 1)].plan.num_all_reduces == 1
        assert comm.stats.sends == 0


def test_merge_flags_a_rank_whose_counts_differ_from_the_plan():
    row = {"collectives_per_sync": 1, "bytes_per_sync": 40, "plan_collectives": 1, "plan_bytes": 40}
    good = [{"rows": [dict(row)]} for _ in range(3)]
    assert _merge_sync_rows(good)[0]["counts_match_plan_on_every_rank"] is True
    for wrong in (dict(collectives_per_sync=2, bytes_per_sync=80), dict(bytes_per_sync=80)):
        bad = [{"rows": [dict(row)]}, {"rows": [dict(row, **wrong)]}]
        assert _merge_sync_rows(bad)[0]["counts_match_plan_on_every_rank"] is False, wrong


def test_interleave_rotates_the_order_and_ratio_is_the_median_of_per_round_ratios():
    calls = []
    seconds = {"a": iter([1.0, 1.0, 5.0]), "b": iter([2.0, 2.0, 2.0])}

    def contender(name):
        def run(n):
            calls.append((name, n))
            return next(seconds[name]) if n == 7 else 0.0
        return run

    times = interleave({"a": contender("a"), "b": contender("b")}, units=7, repeats=3)
    assert calls == [("a", 1), ("b", 1), ("a", 7), ("b", 7), ("b", 7), ("a", 7), ("a", 7), ("b", 7)]
    assert times == {"a": [1.0, 1.0, 5.0], "b": [2.0, 2.0, 2.0]}
    assert ratio(times, "a", "b") == 0.5


def test_gossip_ring_of_the_scale_benchmark_is_doubly_stochastic():
    for m in (2, 3, 8):
        p = ring(m)
        assert torch.allclose(p.sum(0), torch.ones(m, dtype=torch.float64), atol=0, rtol=1e-15)
        assert torch.allclose(p.sum(1), torch.ones(m, dtype=torch.float64), atol=0, rtol=1e-15)
    schedule = topology.from_matrices([ring(8)])
    assert schedule.workers == tuple(range(8))


def test_bad_options_are_refused_naming_the_option(capsys):
    from launch.bench.cli import parse

    with pytest.raises(SystemExit) as err:
        parse(["--only", "B1,B9"])
    assert err.value.code == 2
    assert "--only must name benchmarks among B1, B2, B3, B4, B5, B6, B7, B8, GPU; got B9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--repeats", "0"])
    assert "--repeats must be a positive integer; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--b5-agents", "8,x"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_acceptance_run_without_cuda_and_its_lines(tmp_path):
    """``python -m launch.bench --gpu``: without CUDA every part is skipped with its reason (exit
    0, one JSON); ``--device cpu --parts ...`` runs those parts here: one line per part, PASS /
    FAIL / SKIP, exit 1 when one failed (B1's targets are for its full size: the tiny one misses
    them)."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "launch.bench", "--gpu", "--tiny", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    if not torch.cuda.is_available():
        assert all(results[part]["skipped"] == "no CUDA device" for part in PARTS)
        assert done.stdout.count("SKIP ") == len(PARTS)
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, "-m", "launch.bench", "--gpu", "--tiny", "--device", "cpu", "--parts",
                           "versions,reference,nccl,premul,B1", "--json", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=280)
    results = json.loads(out.read_text())
    lines = [line.split(":")[0] for line in done.stdout.splitlines() if line[:5] in ("PASS ", "FAIL ", "SKIP ")]
    assert lines == ["PASS versions", "PASS reference", f"{'PASS' if results['B1']['passed'] else 'FAIL'} B1",
                     "SKIP nccl", "SKIP premul"], done.stdout
    assert done.returncode == (0 if results["B1"]["passed"] else 1)
    assert results["reference"]["deviation"] <= 1e-12 and results["nccl"]["skipped"] == "NCCL needs CUDA"
    assert results["premul"]["skipped"] == "NCCL needs CUDA"
    assert [r["name"] for r in results["B1"]["rows"][:3]] == [f"LA-{n} / bare SGD" for n in (1, 2, 4)]


def test_acceptance_parts_in_one_process_on_cpu():
    """The own loop (fused Adam, torch.compile, autocast, GradScaler, an inf step that t does not
    count, parameters still in the buffer), the host synchronisations (none on a step without a
    sync) and the ring, on the CPU."""
    results = gpu.run(TINY, "cpu", ("own_loop", "host_syncs", "ring"))
    assert all(results[part]["passed"] for part in results), results
    own = results["own_loop"]
    assert own["t_unchanged_by_the_skipped_step"] and own["detached_parameters"] == [] and own["t"] == own["steps"] - 1
    assert set(results["host_syncs"]["per_step_without_sync"]) == {0} and max(results["host_syncs"]["per_step_with_sync"]) > 0
    assert results["ring"]["seconds_per_agent_step"]["cpu"] > 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("parts", [("torchrun", "low_precision"), ("torchrun_2", "sigstop")],
                         ids=["checkpoint-resume-and-low-precision", "two-ranks-and-a-stopped-one"])
def test_acceptance_jobs_on_cpu(parts):
    """The command-line parts with gloo: a checkpoint and its resume, bfloat16 and float16 jobs;
    two ranks (the overlapped sync, markers, metrics; the own loop's control messages), and a
    stopped rank named by the other within the bound."""
    results = gpu.run(TINY, "cpu", parts)
    assert all(results[part]["passed"] for part in parts), {p: results[p].get("rows", results[p]) for p in parts}
    if "torchrun" in parts:
        assert [r["met"] for r in results["torchrun"]["rows"]] == [True, True]
        assert "resumed_from=10" in results["torchrun"]["rows"][1]["summary"]
    else:
        assert results["sigstop"]["rows"][0]["failed_collective"]
