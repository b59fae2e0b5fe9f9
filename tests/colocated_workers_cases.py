"""The own loop driving several workers (``AgentOptimizer.each_worker``): one loop, run co-located
with every worker in this process and on ranks with one worker per process (used by
tests/colocated_workers_worker.py on every rank and in process by tests/test_own_loop_workers.py).

The loop: a model with BatchNorm and dropout, Adam (or SGD with momentum), gradient clipping, a
StepLR stepped every 4 iterations, each worker drawing its own shard (a DistributedSampler by
worker position).  A case: ``schedule`` (a spec of :func:`tests.exact_cases.make_schedule`),
``steps``, ``exact`` (the exact mode), ``optimizer`` (adam | sgd).  Returns every local agent's flat
parameters and every local worker's buffers, by agent, after the last step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from launch import AgentOptimizer, Checkpointer
from tests.exact_cases import make_schedule


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 6, generator=g)
    return TensorDataset(x, x[:, :2].sum(1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=g))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def batches(position: int, workers: int):
    """Worker ``position``'s endless batches of 16 (its shard, reshuffled every epoch)."""
    data = dataset()
    sampler = DistributedSampler(data, num_replicas=workers, rank=position, shuffle=True, seed=0)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from DataLoader(data, batch_size=16, sampler=sampler, generator=torch.Generator())
        epoch += 1


def run(case: dict, comm=None, checkpoints=None, stop: int | None = None) -> dict:
    """The case's loop (co-located when ``comm`` is None); ``checkpoints``: a folder to resume
    from (when it holds a checkpoint) and, with ``stop``, to save to after step ``stop``, where the
    run is then abandoned (no close)."""
    schedule = make_schedule(case["schedule"])
    net = model()
    inner = (torch.optim.Adam(net.parameters(), lr=1e-2) if case.get("optimizer", "adam") == "adam"
             else torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    opt = AgentOptimizer(inner, schedule, model=net, comm=comm, exact=case.get("exact", False))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    checkpointer = Checkpointer(checkpoints) if checkpoints is not None else None
    extra = opt.resume(checkpointer) if checkpointer is not None else None
    if extra:
        scheduler.load_state_dict(extra["scheduler"])
    if not opt.is_worker:
        opt.serve()
        return {"params": {i: x.clone() for i, x in opt.local_parameters().items()}, "buffers": {}}
    streams = {}
    for _ in range(opt.t, case["steps"]):
        for w in opt.each_worker():
            if w not in streams:           # a resumed run skips the batches already drawn
                streams[w] = batches(w, opt.num_workers)
                for _ in range(opt.t):
                    next(streams[w])
            stream = streams[w]
            x, y = next(stream)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)       # dropout: the worker's own RNG stream
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step(loss=loss)
        scheduler.step()
        if opt.t == stop:
            opt.save(checkpointer, extra={"scheduler": scheduler.state_dict()})
            return {}
    params = {i: x.clone() for i, x in opt.local_parameters().items()}
    buffers = {schedule.workers[opt.worker_index]: [b.clone() for b in net.buffers()]}
    swap = opt._swap
    if swap is not None:         # co-located: the other workers' buffers
        buffers.update({i: [b.clone() for b in own] for i, own in swap.own_buffers.items()})
    opt.close()
    return {"params": params, "buffers": buffers}
