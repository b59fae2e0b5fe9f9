"""No host synchronisation at a sync or a control message except at the decision points.

On CUDA, reading a device tensor on the host (``.item()``, ``.cpu()``, ``.tolist()``,
``float(t)``, ``bool(t)``) waits for the GPU, and so does making a device tensor from Python
numbers (``torch.tensor(..., device=cuda)``: a copy from pageable memory).  These tests count
both kinds of calls through a ``TorchFunctionMode`` while the finiteness check keeps its knowledge
on the device (as on CUDA) and while the own loop's control messages are sent, on CPU tensors.
(On a GPU, ``python -m launch.bench --gpu`` counts the synchronisations themselves under
``torch.cuda.set_sync_debug_mode("warn")``.)
"""

from types import SimpleNamespace

import pytest
import torch

import topology
from launch.bench.host_syncs import HostReads
from launch.comm.base import Pending
from launch.comm.local import LocalCommunicator
from launch.engine.guard.finiteness import MarkerCheck
from launch.engine.guard.health import NonFiniteError
from launch.engine.own_loop.control import CLOSE, EVAL, SYNC, Command, ControlChannel
from launch.engine.placement import Placement
from launch.engine.sync.compile import compile_sync
from launch.engine.sync.state_weights import SyncPolicy


class TwoRanks(LocalCommunicator):
    """Rank 0 of two whose collectives change nothing (the other rank contributes zeros)."""

    world_size = 2

    def max_flags_(self, flags):
        self.stats.flag_reduces += 1

    def broadcast_async_(self, tensor, src, ranks, *, flags=False):
        self.stats.flag_reduces += 1
        return Pending(lambda: None)


def marker_check(schedule, placement_world=3):
    placement = Placement.make(schedule.num_agents, placement_world)
    windows = compile_sync(schedule, placement, 0, numel=10, state_numel=0,
                           policy=SyncPolicy("maintain", schedule), overlap=False).windows
    agents = {0: SimpleNamespace(flat=SimpleNamespace(buffer=torch.ones(10)), is_worker=True)}
    return MarkerCheck(agents, schedule.num_agents, TwoRanks(), windows, host=False), windows


def run_syncs(check, windows, steps, plant_at=None):
    """The hooks of ``steps`` iterations as the engine calls them (rank 0's worker contributes
    its buffer to every sync); returns the reads and tensors made per sync, and the decisions."""
    per_sync = []
    for t in range(steps):
        check.record({0: torch.tensor(0.5)})         # the step's loss (already a tensor)
        entry = windows.at(t, 0)
        if entry is None:
            continue
        with HostReads() as calls:
            check.prefetch(t)
            check.before_sync(t)
            if t == plant_at:
                check.found[0] = 1.0                 # agent 0 found non-finite at this sync
            buffer = check.agents[0].flat.buffer
            check.mark(buffer)
            check.read(buffer)
            check.after_sync(t)
        per_sync.append((t, entry[2], calls.reads(), calls.made()))
    return per_sync


def test_marker_check_on_the_device_reads_only_at_decision_syncs():
    schedule = topology.multilayer((3, 2), (0.5, 0.6))
    check, windows = marker_check(schedule)
    syncs = run_syncs(check, windows, 24)
    assert [t for t, _, _, _ in syncs] == [2, 5, 8, 11, 14, 17, 20, 23]
    assert any(decides for _, decides, _, _ in syncs) and not all(decides for _, decides, _, _ in syncs)
    for t, decides, reads, made in syncs:
        assert made == 0, f"t={t}: a tensor made from Python numbers"
        assert reads == (1 if decides else 0), f"t={t}: {reads} host reads (decision sync: {decides})"


def test_a_finding_still_stops_every_rank_at_the_decision_sync():
    schedule = topology.multilayer((3, 2), (0.5, 0.6))
    check, windows = marker_check(schedule)
    with pytest.raises(NonFiniteError) as info:
        run_syncs(check, windows, 24, plant_at=2)
    assert (info.value.step, info.value.parameters, info.value.stopped) == (2, [0], (5, "sync"))


class ThreeRanks(TwoRanks):
    """Rank ``rank`` of three, where the worker ranks ``workers`` all say ``said`` (the control
    all-reduce fills their slots; a broadcast delivers it)."""

    world_size = 3

    def __init__(self, rank, workers):
        super().__init__()
        self.rank, self.workers, self.said = rank, workers, None

    def max_flags_(self, flags):
        super().max_flags_(flags)
        for r in self.workers:
            for k, value in enumerate((self.said.kind, self.said.t, self.said.arg)):
                flags[3 * r + k].fill_(value)

    def broadcast_async_(self, tensor, src, ranks, *, flags=False):
        if self.rank != src:
            for k, value in enumerate((self.said.kind, self.said.t, self.said.arg)):
                tensor[k].fill_(value)
        return super().broadcast_async_(tensor, src, ranks, flags=flags)


@pytest.mark.parametrize("workers", [(0,), (0, 1)], ids=["broadcast", "all-reduce"])
def test_control_messages_make_no_tensor_from_python_numbers(workers):
    worker = ControlChannel(ThreeRanks(0, workers), workers, torch.device("cpu"))
    passive = ControlChannel(ThreeRanks(2, workers), workers, torch.device("cpu"))
    for command in (Command(SYNC, 5), Command(EVAL, 9, 3), Command(CLOSE, 12)):
        worker.comm.said = passive.comm.said = command
        with HostReads() as sent:
            got = worker.exchange(command)
        assert sent.made() == 0
        # The one worker broadcasts and reads nothing; several workers read what they all said.
        assert sent.reads() == (0 if len(workers) == 1 else 1)
        if len(workers) == 1:
            assert got == command and worker._slots.tolist() == [command.kind, command.t, command.arg]
        with HostReads() as received:
            assert passive.exchange(None) == command
        assert received.made() == 0 and received.reads() == 1     # the decision of a passive rank


def test_batches_go_to_a_gpu_without_the_host_waiting(monkeypatch):
    """Simulation's batches (convert_batch): CPU tensors bound for CUDA are copied into
    page-locked memory and transferred with non_blocking=True, the dtype cast after the transfer;
    a tensor already page-locked is not copied again; CPU targets copy as before.  (No GPU here:
    the tensor methods are recorded, on a machine that pretends to pin.)"""
    from launch.engine.simulation import convert_batch

    calls = []
    real_to = torch.Tensor.to

    def record_to(self, *args, **kwargs):
        calls.append(("to", kwargs.get("device"), kwargs.get("dtype"), kwargs.get("non_blocking", False)))
        return real_to(self, dtype=kwargs["dtype"]) if kwargs.get("dtype") is not None else self

    pinned = set()
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: id(self) in pinned)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin",)) or self)
    x, y = torch.zeros(2), torch.ones(2, dtype=torch.long)
    convert_batch({"x": x, "y": [y]}, torch.float64, "cuda:1")
    cuda = torch.device("cuda", 1)
    assert calls == [("pin",), ("to", cuda, None, True), ("to", None, torch.float64, False),   # x: then the cast
                     ("pin",), ("to", cuda, None, True)]                                       # y: no cast
    calls.clear()
    pinned.add(id(x))
    convert_batch(x, None, torch.device("cuda"))
    assert calls == [("to", torch.device("cuda"), None, True)]          # already page-locked
    calls.clear()
    convert_batch(x, torch.float64, "cpu")
    assert calls == [("to", "cpu", torch.float64, False)]
