"""metrics.csv off the critical path (launch.engine.record.metrics.MetricsProbe.log) on 3 gloo
ranks: the same rows as co-located, in step order; at every logged step (measured before its
sync) a reduce, its broadcast and a reduce of the squared distances, started one per call and
never an all-reduce."""

import math

import torch

from tests.metrics_worker import run_case
from tests.spawn import ROOT, run_torch

LA2 = ["multilayer", [3, 2], [0.5, 0.6]]      # period 6
CASES = {
    "la2-every-step": dict(schedule=LA2, steps=14, every=1),
    "la2-period": dict(schedule=LA2, steps=18, every=6),
    "local-period": dict(schedule=["local_sgd", 3, 2], steps=8, every=2),
}


def same_rows(got, want, tol=1e-12):
    assert [(s, [r["agent"] for r in rows]) for s, rows, _ in got] == [(s, [r["agent"] for r in rows]) for s, rows, _ in want]
    for (_, a_rows, _), (_, b_rows, _) in zip(got, want):
        for a, b in zip(a_rows, b_rows):
            for key in ("loss", "grad_norm", "distance_to_virtual"):
                if math.isnan(b[key]):
                    assert math.isnan(a[key]), (a, b)
                else:
                    assert abs(a[key] - b[key]) <= tol * max(1.0, abs(b[key])), (key, a, b)


def test_metrics_off_the_critical_path(tmp_path):
    results = run_torch(3, dict(backend="torch", out=str(tmp_path), cases=CASES), timeout=180, worker=ROOT / "tests" / "metrics_worker.py")
    assert all(code == 0 for code, _ in results), results
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for name, case in CASES.items():
        colocated = run_case(case)
        same_rows(ranks[0][name]["rows"], colocated["rows"])
        assert all(rows == [] for r in ranks[1:] for _, rows, _ in r[name]["rows"])   # rank 0 writes
        assert all(c == [0, 0, 0] for c in colocated["counts"])
    for name, case in CASES.items():
        logged = sum(1 for t in range(1, case["steps"] + 1) if t % case["every"] == 0 or t == case["steps"])
        for r in ranks:
            counts = r[name]["counts"]
            # (all_reduces, reduces, block_broadcasts): two reduces and a broadcast per logged
            # step, never an all-reduce, and never more than one of each kind started per call.
            assert [sum(c[k] for c in counts) for k in range(3)] == [0, 2 * logged, logged], (name, counts)
            assert all(c[1] <= 2 and c[2] <= 1 for c in counts[:-1]), (name, counts)
