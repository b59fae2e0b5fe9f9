"""experiments/own_loop.py, the own-loop script of the README: it runs co-located, under torchrun
and under mpiexec with the same results, and it changes the number of lines the README says."""

import json
import re
import sys

import torch

from tests.spawn import ROOT, run_mpiexec, run_torchrun

SCRIPT = ROOT / "experiments" / "own_loop.py"
ARGS = ["-m", "experiments.own_loop", "--epochs", "1"]


def epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"worker \d+ epoch \d+:", line)]


def test_marked_lines():
    """The README's count: 30 lines differ from the plain script, 8 of them command-line options
    (a line is marked by a trailing ``  # lookahead-agents`` comment); 11 of them (one option)
    give the run its checkpoints and record."""
    lines = SCRIPT.read_text().splitlines()
    marked = [line for line in lines if "  # lookahead-agents" in line]
    options = [line for line in marked if "  # lookahead-agents: option" in line]
    assert (len(marked), len(options)) == (30, 8)


def test_colocated_torchrun_and_mpiexec_agree(monkeypatch, capsys):
    """LA-1 (k=5, alpha=0.5) on the digits: co-located (here, in this process), and the worker on
    rank 0 with the slow weights on rank 1 under torchrun and under mpiexec: the same printed
    losses and accuracy (a two-term sum: the same bits)."""
    from experiments import own_loop

    monkeypatch.setattr(sys, "argv", ["own_loop", *ARGS[2:]])
    threads = torch.get_num_threads()
    try:
        own_loop.main()                  # sets one thread, as the script's processes have
    finally:
        torch.set_num_threads(threads)
    expected = epoch_lines(capsys.readouterr().out)
    assert len(expected) == 1 and "test accuracy" in expected[0]
    code, output = run_torchrun(2, ARGS, timeout=180, cwd=ROOT)
    assert code == 0, output
    assert epoch_lines(output) == expected, output
    code, output = run_mpiexec(2, [sys.executable, *ARGS], timeout=180, cwd=ROOT)
    assert code == 0, output
    assert epoch_lines(output) == expected, output


def test_deviation_command(capsys):
    """``python -m experiments.own_loop_deviation`` co-located (the README's first rows): LA-1..3
    x SGD-momentum and Adam, each within 1e-12 of MultilayerLookahead."""
    from experiments import own_loop_deviation

    threads = torch.get_num_threads()
    try:
        own_loop_deviation.main()
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for line in lines:
        assert float(line.rsplit(" ", 1)[1]) <= 1e-12, line


def test_run_dir_records_and_resumes_bit_for_bit(monkeypatch, capsys, tmp_path):
    """--run-dir: 3 epochs at once, and 2 epochs then a resume to 3 in the same folder, print the
    same epoch lines (the resumed run prints only its third); the record's summary.json and
    agents.pt are the whole run's."""
    from experiments import own_loop

    def run(folder, epochs):
        monkeypatch.setattr(sys, "argv", ["own_loop", "--epochs", str(epochs), "--run-dir", str(folder)])
        threads = torch.get_num_threads()
        try:
            own_loop.main()
        finally:
            torch.set_num_threads(threads)
        return epoch_lines(capsys.readouterr().out)

    whole = run(tmp_path / "whole", 3)
    first = run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 3)
    assert len(whole) == 3 and first + resumed == whole
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["launch"] == "own_loop" and summary["status"] == "ok"
    for a, b in zip(torch.load(tmp_path / "whole" / "agents.pt"), torch.load(tmp_path / "split" / "agents.pt")):
        assert all(torch.equal(a[k], b[k]) for k in a)
