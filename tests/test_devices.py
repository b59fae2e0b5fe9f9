"""The device comes from the model; one GPU per rank; NCCL's failures and local errors told apart.

Everything here runs on CPU: CUDA's presence and device count, torchrun's LOCAL_RANK /
LOCAL_WORLD_SIZE, CUDA_VISIBLE_DEVICES and NCCL's process-group error flag are mocked; the
errors are synthetic exceptions carrying the messages PyTorch and NCCL raise.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from launch.comm import check_device
from launch.comm import devices
from launch.comm import torch_dist
from launch.comm.torch_dist import TorchCommunicator, choose_device_and_backend, configure_nccl_error_handling
from launch.engine.guard.health import RankFailureError, collective, is_local_error


@pytest.fixture
def node(monkeypatch):
    """``node(gpus, local_rank, local_world, visible=None)``: what this process sees."""
    def set_node(gpus: int, local_rank: int = 0, local_world: int = 1, visible: str | None = None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return set_node


def cuda(i):
    return torch.device("cuda", i)


# ----------------------------------------------------------------- 1. the device from the model
def test_a_cpu_model_on_a_cuda_machine_gets_gloo(node):
    node(gpus=4, local_rank=1, local_world=4)
    assert choose_device_and_backend(torch.device("cpu")) == (torch.device("cpu"), "gloo")
    assert choose_device_and_backend(None) == (torch.device("cpu"), "gloo")   # a model built without a device
    assert choose_device_and_backend("cuda") == (cuda(1), "nccl")
    assert choose_device_and_backend(cuda(1)) == (cuda(1), "nccl")             # the model's device
    assert choose_device_and_backend("auto") == (cuda(1), "nccl")
    node(gpus=0)
    assert choose_device_and_backend("auto") == (torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match="asks for CUDA, but no CUDA device is available"):
        choose_device_and_backend("cuda")


def test_check_device_refuses_what_does_not_fit(node):
    node(gpus=2, local_rank=1, local_world=2)
    nccl = SimpleNamespace(rank=1, backend="nccl", device=cuda(1))
    gloo = SimpleNamespace(rank=1, backend="gloo", device=torch.device("cpu"))
    check_device(nccl, cuda(1))
    check_device(gloo, "cpu")
    check_device(SimpleNamespace(rank=0, backend="local", device=None), cuda(0))     # co-located: any
    with pytest.raises(ValueError) as cpu_on_nccl:
        check_device(nccl, "cpu")
    assert str(cpu_on_nccl.value).startswith("rank 1: the model is on cpu but the nccl communicator moves cuda tensors")
    with pytest.raises(ValueError, match="the model is on cuda:0 but the gloo communicator moves cpu tensors; create"):
        check_device(gloo, cuda(0))
    mpi = SimpleNamespace(rank=1, backend="mpi", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="the mpi communicator moves cpu tensors; keep the model on the CPU, or use "
                                         "launch=torch for CUDA"):
        check_device(mpi, cuda(1))
    with pytest.raises(ValueError) as other_gpu:
        check_device(nccl, cuda(0))
    message = str(other_gpu.value)
    assert "the model is on cuda:0 but this rank's GPU is cuda:1 (LOCAL_RANK=1 of LOCAL_WORLD_SIZE=2" in message
    assert "launch.device=cuda" in message and "torch.cuda.set_device(LOCAL_RANK)" in message
    assert devices.device_problem(nccl, cuda(1)) is None


# ------------------------------------------------------------------- 2. one GPU per rank
def test_one_gpu_per_rank(node):
    node(gpus=2, local_rank=1, local_world=2)
    assert devices.resolve("cuda") == cuda(1)
    # An explicit index with several ranks: the communicator binds the rank's own GPU, and a
    # model left on another one is refused by check_device (above) ...
    assert devices.resolve("cuda:0") == cuda(1)
    # ... while the command line refuses the index itself, on every rank alike (rank 0 too).
    for rank in (0, 1):
        node(gpus=2, local_rank=rank, local_world=2)
        with pytest.raises(ValueError) as refused:
            devices.check_launch_device("cuda:0")
        assert "launch.device=cuda:0 names one GPU for every rank, but torchrun started 2 ranks" in str(refused.value)
        assert "write launch.device=cuda (each rank takes its own GPU)" in str(refused.value)
        devices.check_launch_device("cuda")
    # One process on the node may name any GPU it sees.
    node(gpus=4, local_rank=0, local_world=1)
    assert devices.resolve("cuda:3") == cuda(3)
    devices.check_launch_device("cuda:3")
    with pytest.raises(ValueError, match="'cuda:4' is not available: this process sees 4 CUDA device"):
        devices.resolve("cuda:4")


def test_one_gpu_per_process_through_cuda_visible_devices_is_valid(node):
    # A scheduler's binding: 4 ranks on the node, each process sees exactly its own GPU.
    node(gpus=1, local_rank=3, local_world=4, visible="3")
    assert choose_device_and_backend("cuda") == (cuda(0), "nccl")
    assert choose_device_and_backend(cuda(0)) == (cuda(0), "nccl")     # a model on "its" GPU
    devices.check_launch_device("cuda:0")
    check_device(SimpleNamespace(rank=3, backend="nccl", device=cuda(0)), cuda(0))
    # Without the binding, 4 ranks really share 1 GPU: refused on every rank, with what to do.
    node(gpus=1, local_rank=3, local_world=4)
    with pytest.raises(ValueError) as shared:
        choose_device_and_backend("cuda")
    assert "4 ranks on this node but only 1 CUDA device(s) visible to each" in str(shared.value)
    assert "torchrun --nproc_per_node 1" in str(shared.value) and "CUDA_VISIBLE_DEVICES" in str(shared.value)
    node(gpus=2, local_rank=0, local_world=3, visible="0,1")
    with pytest.raises(ValueError, match="3 ranks on this node but only 2 CUDA device"):
        choose_device_and_backend("cuda")


# ------------------------------------------------------------------- 3. failures on NCCL
def test_nccl_error_handling_is_set_before_the_group_unless_the_user_chose():
    environ = {}
    assert configure_nccl_error_handling(environ) == torch_dist.NCCL_ERROR_HANDLING
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    chosen = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "30000"}
    assert configure_nccl_error_handling(chosen) == {}
    assert chosen["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    legacy = {"NCCL_ASYNC_ERROR_HANDLING": "3"}               # the old name counts as a choice
    configure_nccl_error_handling(legacy)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in legacy


class FakeGroup:
    """A process group whose backend reports ``error`` (``Backend.get_error()``)."""

    def __init__(self, error="SUCCESS"):
        self.error = error

    def _get_backend(self, device):
        assert device == cuda(0)
        return SimpleNamespace(get_error=lambda: SimpleNamespace(name=self.error))


def nccl_comm(world: FakeGroup, groups=None) -> TorchCommunicator:
    """A TorchCommunicator on NCCL without a process group: its groups are fakes."""
    comm = object.__new__(TorchCommunicator)
    comm.backend, comm.rank, comm.world_size, comm.device = "nccl", 0, 3, cuda(0)
    comm.timeout_s, comm.context = 60.0, None
    comm._groups = groups or {}
    comm._world_group = lambda: world
    comm.responsive_ranks = lambda wait_s: [0, 1]
    return comm


def test_a_failure_nccl_found_off_the_main_thread_raises_rank_failure_before_the_next_collective():
    healthy = nccl_comm(FakeGroup(), {(0, 2): FakeGroup()})
    assert healthy.failure() is None
    ran = []
    with collective(healthy, 7, "sync", (0, 1, 2)):
        ran.append(True)
    assert ran == [True]
    lost = nccl_comm(FakeGroup(), {(0, 2): FakeGroup("TIMEOUT")})
    assert lost.failure() == "NCCL reported TIMEOUT on the process group of ranks [0, 2]"
    with pytest.raises(RankFailureError) as info:
        with collective(lost, 9, "sync", (0, 1, 2)):
            ran.append(False)                      # never reached: the failure raises first
    message = str(info.value)
    assert ran == [True] and "\n" not in message
    assert message.startswith("rank 0: the sync of iteration t=9 failed on the ranks [0, 1, 2]: rank 2 seems lost")
    assert message.endswith("Backend error: NCCL reported TIMEOUT on the process group of ranks [0, 2]")
    gloo = nccl_comm(FakeGroup("TIMEOUT"))
    gloo.backend = "gloo"                          # gloo raises in the collective itself
    assert gloo.failure() is None


# Messages as PyTorch (c10/cuda, ProcessGroupNCCL, NCCLUtils) and NCCL word them.
OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
       "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use.")
ILLEGAL = ("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
           "reported at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
           "passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
NCCL = "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, {}, NCCL version 2.27.3\n{}"
LOCAL = [
    torch.OutOfMemoryError(OOM),
    torch.AcceleratorError(ILLEGAL),
    RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported"),
    dist.DistBackendError(NCCL.format("unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
                                      "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
                                      "Cuda failure 2 'out of memory'")),
    dist.DistBackendError(NCCL.format("invalid usage (run with NCCL_DEBUG=WARN for details)",
                                      "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\n"
                                      "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000")),
    RuntimeError("No backend type associated with device type cpu"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`"),
]
LOST = [
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer "
                 "[127.0.0.1]:48390"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for "
                 "recv operation to complete"),
    ConnectionResetError(104, "Connection reset by peer"),
    dist.DistBackendError("[PG ID 0 PG GUID 0(default_pg) Rank 0] Watchdog caught collective operation timeout: "
                          "WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=1000, NumelOut=1000, Timeout(ms)=10000) ran "
                          "for 10085 milliseconds before timing out."),
    dist.DistBackendError(NCCL.format("remote process exited or there was a network error",
                                      "ncclRemoteError: A call failed possibly due to a network error or a remote "
                                      "process exiting prematurely.\nLast error:\nsocketProgress: Connection closed "
                                      "by remote peer")),
]


@pytest.mark.parametrize("err", LOCAL, ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_local_errors_pass_through_as_themselves(err):
    assert is_local_error(err)
    comm = nccl_comm(FakeGroup())
    with pytest.raises(type(err)) as info:
        with collective(comm, 3, "sync", (0, 1, 2)):
            raise err
    assert info.value is err and not isinstance(info.value, RankFailureError)


@pytest.mark.parametrize("err", LOST, ids=lambda e: type(e).__name__ + ":" + str(e)[:30])
def test_errors_of_a_lost_peer_name_the_rank(err):
    assert not is_local_error(err)
    comm = nccl_comm(FakeGroup())
    with pytest.raises(RankFailureError) as info:
        with collective(comm, 3, "sync", (0, 1, 2)):
            raise err
    assert info.value.__cause__ is err and "rank 2 seems lost" in str(info.value) and "\n" not in str(info.value)


def test_the_communicator_device_is_set_before_the_process_group(node, monkeypatch):
    """TorchCommunicator: set_device and the NCCL settings before init_process_group, device_id
    passed to it; gloo for a CPU model although CUDA is there (mocked: no group is created)."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.append(
        ("init", kw["backend"], kw.get("device_id"), os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))))
    monkeypatch.setattr(dist, "get_backend", lambda: seen[-1][1])
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.append(("set_device", device)))
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.delenv("NCCL_ASYNC_ERROR_HANDLING", raising=False)
    node(gpus=2, local_rank=1, local_world=2)
    comm = TorchCommunicator(device=torch.device("cpu"))
    assert (comm.device, comm.backend, seen) == (torch.device("cpu"), "gloo", [("init", "gloo", None, None)])
    seen.clear()
    comm = TorchCommunicator(device="cuda")
    assert (comm.device, comm.backend) == (cuda(1), "nccl")
    assert seen == [("set_device", cuda(1)), ("init", "nccl", cuda(1), "2")]


def test_the_end_of_run_gather_streams_one_ranks_share_at_a_time():
    """gather_parameters (agents.pt, the summary, gather_state_dicts) and the own loop's
    gather_state_dict broadcast each rank's share in turn (stream_objects) instead of one
    all-gather of every share: under NCCL, whose object collectives stage the bytes on the GPU,
    the device then holds one share at a time.  Rank 1 of three, its communicator recording what
    travels (the other ranks' shares answered by it)."""
    from launch.comm.local import LocalCommunicator
    from launch.engine.readout import gather_parameters

    class Rank1Of3(LocalCommunicator):
        world_size, rank = 3, 1

        def __init__(self):
            super().__init__()
            self.sent = []

        def all_gather_object(self, obj):
            raise AssertionError("an all-gather of every rank's share")

        def broadcast_object(self, obj, src):
            self.sent.append((src, obj))
            return obj if src == self.rank else {src: [torch.full((2,), float(src))]}

    flat = SimpleNamespace(split=lambda x: [x], shapes=[torch.Size([2])])
    agent = SimpleNamespace(flat=flat, debiased=lambda: torch.full((2,), 1.0))
    comm = Rank1Of3()
    engine = SimpleNamespace(comm=comm, agents={1: agent}, t=7, parameter_names=["w"],
                             schedule=SimpleNamespace(num_agents=3))
    gathered = gather_parameters(engine)
    assert [float(p["w"][0]) for p in gathered] == [0.0, 1.0, 2.0]
    assert [src for src, _ in comm.sent] == [0, 1, 2]                       # one rank at a time, in order
    assert [obj is None for _, obj in comm.sent] == [True, False, True]     # each time the source's share only
    assert set(comm.sent[1][1]) == {1}


def test_every_program_of_a_rank_shares_one_scratch():
    """A schedule of many distinct matrices keeps one set of scratch buffers per rank, not one per
    matrix (programs run one at a time): after running every program of an exponential graph of
    8 agents (3 distinct matrices) and of LA-3 on 4 ranks' rank 0, as compiled, the scratch is one
    object holding one buffer per name."""
    from launch.engine.sync.compile import compile_sync
    from launch.engine.sync.state_weights import SyncPolicy
    from launch.engine.placement import Placement
    import topology
    from topology import decentralized

    for schedule, placement in ((decentralized.one_peer_exponential(8), Placement.make(8, 1)),
                                (topology.multilayer((2, 2, 2), (0.5, 0.5, 0.5)), Placement.make(4, 4))):
        compiled = compile_sync(schedule, placement, 0, numel=6, state_numel=0, overlap=False,
                                policy=SyncPolicy("maintain", schedule))
        active = [p for p in compiled.programs if not p.is_identity]
        assert len(active) >= 3
        assert len({id(p.ctx.scratch) for p in active}) == 1
