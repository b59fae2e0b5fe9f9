"""Simulated network time: an alpha-beta cost model of a plan's collectives on a described cluster.

Every iteration t gets a simulated duration (:class:`SimClock`)

    step_time(t) = compute_s + gradient_comm(t) + comm(t),

compute_s being the time of one inner step (every worker takes its step at once, one agent per
GPU; passive agents take none), gradient_comm(t) the time of the gradient all-reduces of Q_t's
plan (:func:`topology.data_parallel.gradient_plan`; 0 when Q_t is the identity), which the
workers wait for before their inner step, and comm(t) the time of the collectives of P_t's plan
(:func:`plan_time`), as the engine runs them with one agent per rank: a block whose members span
g > 1 GPUs is one all-reduce over those g GPUs; a mix sends one point-to-point message per
(source agent, receiver's GPU) pair on different GPUs.  n is the size in bytes of one agent's
synchronized vector (numel x itemsize), what the communicator counts per collective.  The times
are these formulas evaluated in float64 on the plan's own collectives: nothing is sampled.

**Links** (:class:`Cluster`).  GPU q lives on node q // gpus_per_node.  Two GPUs of one node talk
over the intra-node link (latency alpha_intra seconds, bandwidth beta_intra bytes/s per
direction), GPUs of different nodes over the inter-node one (alpha_inter, beta_inter).  Every GPU
has its own link of each kind (a node's GPUs do not share a network card).  The *slowest link of
a group* of GPUs has alpha = the largest and beta = the smallest over the link kinds a ring
through the group, visiting its GPUs in increasing order, uses: inter-node when the group spans
two nodes or more, intra-node when some node holds two or more of its GPUs.

**Costs**, with (alpha, beta) the group's slowest link, g its number of GPUs:

* all-reduce (ring: a reduce-scatter then an all-gather, NCCL's ring algorithm): 2 (g - 1) steps,
  each sending n / g bytes over every link of the ring at once and waiting for the slowest,

      T_allreduce = 2 (g - 1) (alpha + n / (g beta)),

  i.e. 2 (g - 1) / g of the bytes over the slowest link;
* reduce and broadcast (overlapped hub blocks, :mod:`launch.engine.sync.overlap`): NCCL's pipelined ring
  (chain) algorithm with infinitely fine chunks: the pipeline fills in g - 1 hops (each charged
  the slowest link's latency), then the n bytes stream at the slowest link's bandwidth,

      T_reduce = T_broadcast = (g - 1) alpha + n / beta,

  (as in the NCCL tests' performance notes, whose bus bandwidth of a broadcast or a reduce is
  its algorithm bandwidth n / T, and of an all-reduce 2 (g - 1) / g times it);
* a point-to-point message from GPU p to GPU q: T_msg = alpha_pq + n / beta_pq on their link;
* an exchange (every message of one plan at once): each GPU sends one message at a time and
  receives one at a time (a full-duplex port), different GPUs are independent, so

      T_exchange = max over GPUs q of max(sum of T_msg sent by q, sum of T_msg received by q),

  the optimal makespan of that open-shop problem when messages may be split into pieces
  (Gonzalez & Sahni, "Open shop scheduling to minimize finish time", 1976).

**A plan** (:func:`plan_time`): the exchange first (every GPU that sends or receives is busy
until T_exchange), then the blocks in the plan's order, as every rank runs them (blocking, in
order): a block starts when all its GPUs are free and keeps them busy for its cost.  Blocks on
disjoint GPUs therefore run in parallel, blocks sharing a GPU one after the other; a block whose
members all share one GPU costs nothing.  comm(t) is the time the last GPU is free.

**Overlapped syncs** (``hub_of``).  A hub block's reduce is started at the start of the first
iteration after the previous sync (the previous non-identity P), so it runs under the inner steps
of every iteration from then to the sync t included:

    head_start(t) = compute_s x (t - t_prev),    t_prev = the previous non-identity iteration
                                                 (-1 when there is none: launched at t = 0)

The block waits, from the start of the sync, until all its GPUs are free and the reduce is done,
then broadcasts: it ends at max(start, T_reduce - head_start) + T_broadcast.  The broadcast is
charged in full at the sync (the engine lets the hub's next forward and backward run under it:
this part is an upper bound).  The reduces of several hub blocks of one sync are taken to run at
once.

The counts of the communicator (:class:`launch.comm.base.CommStats`, per rank, with rank =
GPU) are given by :func:`plan_counts` and :func:`schedule_counts`.

Example (one LA-1 sync of 4-byte vectors on 2 GPUs; 1 s latency, 1 byte/s):
    >>> import topology
    >>> unit = Cluster(1, 2, 1.0, 1.0, 1.0, 1.0)
    >>> plan = topology.compile_plan(topology.lookahead(3, 0.5).matrix(2))
    >>> plan_time(plan, unit, 4)   # 2 (2 - 1) (1 + 4 / (2 x 1))
    6.0
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, NamedTuple, Sequence

from topology.checks import check_integer, check_real
from topology.data_parallel import gradient_plan
from topology.plan import Block, Plan, compile_plan
from topology.schedule import Schedule
from topology.validation import check_period


class Link(NamedTuple):
    """A link's latency (seconds per message) and bandwidth (bytes per second, per direction)."""

    latency_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``gpus_per_node`` GPUs; GPU q is on node q // gpus_per_node.

    Latencies are in seconds per message, bandwidths in bytes per second per direction of one
    GPU's link (see the module docstring).  Every field is validated at construction.

    Example:
        >>> c = Cluster(2, 4, 1e-6, 100e9, 5e-6, 25e9)
        >>> c.num_gpus, c.node_of(5), c.link(0, 3), c.link(3, 4)
        (8, 1, Link(latency_s=1e-06, bytes_per_s=100000000000.0), Link(latency_s=5e-06, bytes_per_s=25000000000.0))
    """

    nodes: int
    gpus_per_node: int
    intra_latency_s: float
    intra_bytes_per_s: float
    inter_latency_s: float
    inter_bytes_per_s: float

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("nodes", "gpus_per_node"):
                value = check_period(value, name=f.name)
            else:
                positive = f.name.endswith("bytes_per_s")
                value = check_real(value, f.name, minimum=0.0, min_open=positive, kind="a finite real number",
                                    unit="bytes per second" if positive else "seconds")
            object.__setattr__(self, f.name, value)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def intra(self) -> Link:
        return Link(self.intra_latency_s, self.intra_bytes_per_s)

    @property
    def inter(self) -> Link:
        return Link(self.inter_latency_s, self.inter_bytes_per_s)

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def link(self, a: int, b: int) -> Link:
        """The link between GPUs ``a`` and ``b``: intra-node when they share a node."""
        return self.intra if self.node_of(a) == self.node_of(b) else self.inter

    def group_link(self, gpus: Sequence[int]) -> Link:
        """The slowest link of a ring through ``gpus``: the largest latency and the smallest
        bandwidth over the link kinds it uses (inter-node when the GPUs span two nodes or more,
        intra-node when some node holds two or more of them)."""
        per_node: dict[int, int] = {}
        for q in gpus:
            per_node[self.node_of(q)] = per_node.get(self.node_of(q), 0) + 1
        used = ([self.inter] if len(per_node) > 1 else []) + ([self.intra] if max(per_node.values()) > 1 else [])
        return Link(max(l.latency_s for l in used), min(l.bytes_per_s for l in used))


# Preset clusters.  Every figure is a nominal value from vendor specifications or commonly quoted
# orders of magnitude, not a measurement of a machine.
#: NVLink 4 (NVIDIA H100 SXM, HGX/DGX H100): 900 GB/s of NVLink bandwidth per GPU, counted over
#: both directions; per direction half of it.
NVLINK4_BYTES_PER_S = 900e9 / 2
#: NCCL inside an NVLink node: a few microseconds per step (the order of the per-hop NVLink
#: latencies of NCCL's own tuning model); we take 3 us.
NVLINK_LATENCY_S = 3e-6
#: 100 Gb/s Ethernet: 100e9 bits/s per port and direction, in bytes.
ETHERNET_100G_BYTES_PER_S = 100e9 / 8
#: Ethernet through kernel TCP: tens of microseconds per message (a few with RoCE); we take 20 us.
ETHERNET_LATENCY_S = 20e-6
#: NDR InfiniBand (NVIDIA ConnectX-7 adapters, Quantum-2 switches): 400 Gb/s per port and
#: direction, in bytes.  A DGX H100 has one such port per GPU, as the model assumes.
NDR_400G_BYTES_PER_S = 400e9 / 8
#: InfiniBand end to end: about 1-2 us (adapter and switch specifications); we take 2 us.
NDR_LATENCY_S = 2e-6


def _eight_gpu_nodes(nodes: int, inter_latency_s: float, inter_bytes_per_s: float) -> Cluster:
    """``nodes`` nodes of 8 H100 GPUs on NVLink 4, linked by the given network."""
    return Cluster(nodes, 8, NVLINK_LATENCY_S, NVLINK4_BYTES_PER_S, inter_latency_s, inter_bytes_per_s)


PRESETS: dict[str, Cluster] = {
    # One HGX H100 node: 8 GPUs on NVLink 4 (its inter-node link, 100 GbE, is never used).
    "nvlink_8": _eight_gpu_nodes(1, ETHERNET_LATENCY_S, ETHERNET_100G_BYTES_PER_S),
    # 8 such nodes linked by 100 Gb/s Ethernet, one port per GPU.  Where a node's 8 GPUs share one
    # port, concurrent messages of several GPUs of a node are slower than modelled here; a ring
    # all-reduce (which crosses each node's boundary once per direction) is not.
    "ethernet_100g_64": _eight_gpu_nodes(8, ETHERNET_LATENCY_S, ETHERNET_100G_BYTES_PER_S),
    # 128 DGX H100 nodes linked by NDR InfiniBand, one 400 Gb/s port per GPU.
    "infiniband_400g_1024": _eight_gpu_nodes(128, NDR_LATENCY_S, NDR_400G_BYTES_PER_S),
}


def preset(name: str) -> Cluster:
    """The preset cluster ``name`` (a key of :data:`PRESETS`).

    Example:
        >>> preset("ethernet_100g_64").num_gpus
        64
    """
    if name not in PRESETS:
        raise ValueError(f"cluster must be one of {', '.join(PRESETS)}; got {name!r}")
    return PRESETS[name]


# -- cost primitives ---------------------------------------------------------------------------
def all_reduce_time(cluster: Cluster, gpus: Sequence[int], nbytes: int) -> float:
    """Ring all-reduce of ``nbytes`` over ``gpus``: 2 (g - 1) (alpha + n / (g beta)) on the slowest
    link of the group (0 for one GPU).

    Example:
        >>> all_reduce_time(Cluster(1, 4, 1.0, 1.0, 1.0, 1.0), [0, 1, 2, 3], 8)   # 6 (1 + 8 / 4)
        18.0
    """
    g = len(set(gpus))
    if g < 2:
        return 0.0
    link = cluster.group_link(gpus)
    return 2 * (g - 1) * (link.latency_s + nbytes / (g * link.bytes_per_s))


def chain_time(cluster: Cluster, gpus: Sequence[int], nbytes: int) -> float:
    """A reduce to one GPU, or a broadcast from one, as a pipelined chain: (g - 1) alpha + n / beta
    on the slowest link of the group (0 for one GPU).

    Example:
        >>> chain_time(Cluster(1, 4, 1.0, 1.0, 1.0, 1.0), [0, 1, 2, 3], 8)   # 3 x 1 + 8 / 1
        11.0
    """
    g = len(set(gpus))
    if g < 2:
        return 0.0
    link = cluster.group_link(gpus)
    return (g - 1) * link.latency_s + nbytes / link.bytes_per_s


def message_time(cluster: Cluster, src: int, dst: int, nbytes: int) -> float:
    """One point-to-point message: alpha + n / beta of the link between GPUs ``src`` and ``dst``."""
    link = cluster.link(src, dst)
    return link.latency_s + nbytes / link.bytes_per_s


def exchange_time(cluster: Cluster, messages: Sequence[tuple[int, int]], nbytes: int) -> float:
    """Messages ``(src GPU, dst GPU)`` of ``nbytes`` each, all at once: the largest over GPUs of
    the total time of the messages it sends and of those it receives (module docstring).

    Example (a GPU sending to two others pays for both; 1 s + 2 bytes at 1 byte/s each):
        >>> exchange_time(Cluster(1, 3, 1.0, 1.0, 1.0, 1.0), [(0, 1), (0, 2)], 2)
        6.0
    """
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    for src, dst in messages:
        cost = message_time(cluster, src, dst, nbytes)
        sent[src] = sent.get(src, 0.0) + cost
        received[dst] = received.get(dst, 0.0) + cost
    return max([*sent.values(), *received.values()], default=0.0)


# -- plans -------------------------------------------------------------------------------------
#: ``hub_of(block, plan) -> GPU | None``: the hub GPU of a block run overlapped, None for a plain
#: all-reduce (e.g. ``launch.engine.sync.overlap.hub_of`` with the placement, workers and push-sum bound).
HubOf = Callable[[Block, Plan], "int | None"]


def place_agents(cluster: Cluster, num_agents: int, agent_gpus: Sequence[int] | None = None) -> tuple[int, ...]:
    """The GPU of every agent: ``agent_gpus[i]`` when given, else GPU i (one agent per GPU: agent i
    on node i // gpus_per_node).  The default refuses more agents than GPUs.

    Example:
        >>> place_agents(preset("nvlink_8"), 3), place_agents(preset("nvlink_8"), 3, [0, 0, 5])
        ((0, 1, 2), (0, 0, 5))
    """
    if agent_gpus is None:
        if num_agents > cluster.num_gpus:
            raise ValueError(
                f"the schedule has {num_agents} agents but the cluster has {cluster.num_gpus} GPUs "
                f"({cluster.nodes} nodes x {cluster.gpus_per_node}); one agent per GPU needs at most "
                f"{cluster.num_gpus} agents (or pass agent_gpus to place several agents on a GPU)"
            )
        return tuple(range(num_agents))
    mapping = _mapping(num_agents, agent_gpus)
    return tuple(check_integer(q, f"agent_gpus[{i}]", minimum=0, maximum=cluster.num_gpus - 1,
                               kind=f"a GPU index in [0, {cluster.num_gpus})") for i, q in enumerate(mapping))


def _mapping(num_agents: int, agent_gpus: Sequence[int] | None) -> tuple:
    """``agent_gpus`` as a tuple of one entry per agent (default: agent i on GPU i)."""
    if agent_gpus is None:
        return tuple(range(num_agents))
    try:
        mapping = tuple(agent_gpus)
    except TypeError as err:
        raise ValueError(f"agent_gpus must be a sequence of GPU indices, one per agent; got {agent_gpus!r}") from err
    if len(mapping) != num_agents:
        raise ValueError(f"agent_gpus must give one GPU per agent ({num_agents}); got {len(mapping)}")
    return mapping


def _messages(plan: Plan, gpu: Sequence[int]) -> list[tuple[int, int, int]]:
    """(source agent, source GPU, destination GPU): one per (source agent, receiver's GPU) pair of
    the plan's mixes on different GPUs, in a fixed order."""
    pairs = {(i, gpu[mix.receiver]) for mix in plan.mixes for i in mix.sources if gpu[i] != gpu[mix.receiver]}
    return [(i, gpu[i], dst) for i, dst in sorted(pairs)]


def _block_gpus(block: Block, gpu: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({gpu[i] for i in block.members}))


def _hub(hub_of: HubOf | None, block: Block, plan: Plan, gpus: tuple[int, ...]) -> int | None:
    hub = hub_of(block, plan) if hub_of is not None else None
    if hub is not None and hub not in gpus:
        raise ValueError(f"hub_of must return one of the block's GPUs {gpus} or None; got {hub!r}")
    return hub


def plan_time(
    plan: Plan,
    cluster: Cluster,
    nbytes: int,
    *,
    agent_gpus: Sequence[int] | None = None,
    hub_of: HubOf | None = None,
    head_start_s: float = 0.0,
) -> float:
    """comm(t): the simulated time of one application of ``plan`` (module docstring), in seconds.

    ``head_start_s``: how long before the sync the hub blocks' reduces were started.

    Example (the same sync overlapped: the reduce, 1 + 4 / 1 = 5 s, started 2 s early):
        >>> import topology
        >>> unit = Cluster(1, 2, 1.0, 1.0, 1.0, 1.0)
        >>> plan = topology.compile_plan(topology.lookahead(3, 0.5).matrix(2))
        >>> plan_time(plan, unit, 4, hub_of=lambda block, plan: 0, head_start_s=2.0)  # (5 - 2) + 5
        8.0
    """
    nbytes = _check_nbytes(nbytes)
    gpu = place_agents(cluster, plan.num_agents, agent_gpus)
    free: dict[int, float] = {}     # GPU -> when it is next free, from the start of the sync
    messages = [(src, dst) for _, src, dst in _messages(plan, gpu)]
    if messages:
        done = exchange_time(cluster, messages, nbytes)
        free.update((q, done) for pair in messages for q in pair)
    for block in plan.blocks:
        gpus = _block_gpus(block, gpu)
        if len(gpus) < 2:
            continue
        start = max(free.get(q, 0.0) for q in gpus)
        if _hub(hub_of, block, plan, gpus) is None:
            end = start + all_reduce_time(cluster, gpus, nbytes)
        else:
            chain = chain_time(cluster, gpus, nbytes)       # the reduce's, then the broadcast's
            end = max(start, chain - head_start_s) + chain
        free.update((q, end) for q in gpus)
    return max(free.values(), default=0.0)


def _check_nbytes(nbytes) -> int:
    return check_integer(nbytes, "nbytes", minimum=0, kind="an integer >= 0 (bytes of one agent's vector)")


# -- counts, as the communicator makes them ------------------------------------------------------
@dataclass
class RankCounts:
    """What one rank's communicator counts (the plan fields of ``CommStats``, same names)."""

    all_reduces: int = 0
    all_reduce_bytes: int = 0
    sends: int = 0
    send_bytes: int = 0
    reduces: int = 0
    reduce_bytes: int = 0
    block_broadcasts: int = 0
    block_broadcast_bytes: int = 0

    def add(self, other: "RankCounts", times: int = 1) -> None:
        """self += times x other, field by field."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + times * getattr(other, f.name))


def plan_counts(
    plan: Plan,
    nbytes: int,
    *,
    agent_gpus: Sequence[int] | None = None,
    hub_of: HubOf | None = None,
) -> dict[int, RankCounts]:
    """Per rank (= GPU holding an agent; default: agent i on rank i), what the communicator counts
    for one application of ``plan`` (``launch.engine.sync.program.RankProgram``):

    * a block spanning g > 1 ranks: one all-reduce of ``nbytes`` on each of its ranks; a hub block
      instead one reduce and one broadcast of ``nbytes`` on each (the hub's included);
    * a mix: one send of ``nbytes`` per (source agent, receiver's rank) pair on different ranks,
      counted on the source's rank (receives are not counted).

    Example (ring gossip on 4 ranks: every rank sends its vector to its 2 neighbours):
        >>> import topology
        >>> counts = plan_counts(topology.compile_plan(topology.decentralized.ring(4).matrix(0)), 8)
        >>> counts[0].sends, counts[0].send_bytes, counts[0].all_reduces
        (2, 16, 0)
    """
    nbytes = _check_nbytes(nbytes)
    gpu = _mapping(plan.num_agents, agent_gpus)
    counts = {q: RankCounts() for q in sorted(set(gpu))}
    for _, src, _ in _messages(plan, gpu):
        counts[src].add(RankCounts(sends=1, send_bytes=nbytes))
    for block in plan.blocks:
        gpus = _block_gpus(block, gpu)
        if len(gpus) < 2:
            continue
        if _hub(hub_of, block, plan, gpus) is None:
            each = RankCounts(all_reduces=1, all_reduce_bytes=nbytes)
        else:
            each = RankCounts(reduces=1, reduce_bytes=nbytes, block_broadcasts=1, block_broadcast_bytes=nbytes)
        for q in gpus:
            counts[q].add(each)
    return counts


def schedule_counts(
    schedule: Schedule,
    nbytes: int,
    iterations: int,
    *,
    agent_gpus: Sequence[int] | None = None,
    hub_of: HubOf | None = None,
) -> dict[int, RankCounts]:
    """Per rank, the counts of :func:`plan_counts` summed over the syncs of iterations
    0 .. ``iterations`` - 1 (what ``CommStats`` holds after that many steps, started at t = 0).

    Example (LA-1, k = 3: the syncs at t = 2 and 5 of 7 iterations):
        >>> import topology
        >>> schedule_counts(topology.lookahead(3, 0.5), 8, 7)[1].all_reduce_bytes
        16
    """
    iterations = check_integer(iterations, "iterations", minimum=0)
    occurrences: dict[int, int] = {}
    for t in range(min(iterations, schedule.period)):
        # t, t + period, ... < iterations
        index = schedule.matrix_index(t)
        occurrences[index] = occurrences.get(index, 0) + (iterations - 1 - t) // schedule.period + 1
    total = {q: RankCounts() for q in sorted(set(_mapping(schedule.num_agents, agent_gpus)))}
    for index, times in sorted(occurrences.items()):
        plan = compile_plan(schedule.distinct_matrices[index])
        for q, c in plan_counts(plan, nbytes, agent_gpus=agent_gpus, hub_of=hub_of).items():
            total[q].add(c, times)
    return total


# -- the clock -----------------------------------------------------------------------------------
class SimClock:
    """Simulated time of a run of ``schedule`` on ``cluster``: ``time`` after ``t`` iterations.

    ``step_time(t) = compute_s + plan_time(plan of Q_t) + plan_time(plan of P_t, head_start_s =
    compute_s x (t - t_prev))`` with t_prev the previous non-identity iteration before t (-1 when
    there is none); see the module docstring.  Plans are compiled and costed once per distinct
    matrix (and head start), so a step costs O(1).

    Args:
        schedule: the schedule t -> P_t.
        cluster: where it runs (one agent per GPU unless ``agent_gpus``).
        nbytes: bytes of one agent's synchronized vector (numel x itemsize).
        compute_s: seconds of one inner step (may be changed later: it applies to the steps
            advanced after the change).
        agent_gpus: the GPU of every agent (default: agent i on GPU i).
        hub_of: which blocks run overlapped (:data:`HubOf`); default none.

    Example (LA-1, k = 3, on 2 GPUs: 1 s latency, 1 byte/s, 4-byte vectors, 0.5 s inner steps):
        >>> import topology
        >>> clock = SimClock(topology.lookahead(3, 0.5), Cluster(1, 2, 1.0, 1.0, 1.0, 1.0), 4, 0.5)
        >>> [clock.advance() for _ in range(3)], clock.time    # the sync: 0.5 + 2 (1 + 4 / 2)
        ([0.5, 0.5, 6.5], 7.5)
    """

    def __init__(self, schedule: Schedule, cluster: Cluster, nbytes: int, compute_s: float, *,
                 agent_gpus: Sequence[int] | None = None, hub_of: HubOf | None = None):
        self.schedule = schedule
        self.cluster = cluster
        self.nbytes = _check_nbytes(nbytes)
        self.compute_s = compute_s
        self.agent_gpus = place_agents(cluster, schedule.num_agents, agent_gpus)
        self.hub_of = hub_of
        #: Iterations advanced so far, and their simulated duration in seconds.
        self.t = 0
        self.time = 0.0
        self._plans = [compile_plan(p) for p in schedule.distinct_matrices]
        #: Per distinct Q: the time of its gradient all-reduces (no hub: nothing to overlap with).
        self._gradient_cost = [plan_time(gradient_plan(schedule, i), cluster, self.nbytes, agent_gpus=self.agent_gpus)
                               for i in range(len(schedule.distinct_gradient_matrices))]
        #: Per distinct matrix: whether its plan has a hub block (its cost depends on the head start).
        self._has_hub = [hub_of is not None and any(hub_of(b, p) is not None for b in p.blocks) for p in self._plans]
        self._cost: dict[tuple[int, float], float] = {}

    @property
    def compute_s(self) -> float:
        return self._compute_s

    @compute_s.setter
    def compute_s(self, value: float) -> None:
        self._compute_s = check_real(value, "compute_s", minimum=0.0, kind="a finite real number",
                                     unit="seconds per inner step")

    def previous_sync(self, t: int) -> int:
        """The last iteration before ``t`` with a non-identity P (-1 when there is none).

        ``schedule.next_sync(s)`` is non-decreasing in s, and the last sync before t is the largest
        s < t with ``next_sync(s) < t``: a binary search, O(log t) calls of ``next_sync``, nothing
        proportional to the period (phased schedules included)."""
        first = self.schedule.next_sync(0)
        if t <= 0 or first is None or first >= t:
            return -1
        lo, hi = first, t - 1          # next_sync(lo) < t holds; find the largest such s
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found = self.schedule.next_sync(mid)
            if found is not None and found < t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def comm_time(self, t: int) -> float:
        """comm(t): the simulated communication time of iteration ``t``'s sync."""
        index = self.schedule.matrix_index(t)
        head_start = self._compute_s * (t - self.previous_sync(t)) if self._has_hub[index] else 0.0
        key = (index, head_start)
        if key not in self._cost:
            self._cost[key] = plan_time(self._plans[index], self.cluster, self.nbytes, agent_gpus=self.agent_gpus,
                                        hub_of=self.hub_of, head_start_s=head_start)
        return self._cost[key]

    def gradient_time(self, t: int) -> float:
        """gradient_comm(t): the simulated time of iteration ``t``'s gradient all-reduces (Q_t)."""
        return self._gradient_cost[self.schedule.gradient_index(t)]

    def step_time(self, t: int) -> float:
        """The simulated duration of iteration ``t``: compute_s + gradient_comm(t) + comm(t)."""
        return self._compute_s + self.gradient_time(t) + self.comm_time(t)

    def advance(self) -> float:
        """Simulate iteration ``self.t``: add its duration to ``time`` and return the duration."""
        duration = self.step_time(self.t)
        self.t += 1
        self.time += duration
        return duration
