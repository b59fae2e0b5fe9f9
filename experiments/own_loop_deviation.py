"""How far the own loop (launch.AgentOptimizer) is from the serial reference, measured.

    python -m experiments.own_loop_deviation                          # co-located vs MultilayerLookahead
    torchrun --nproc_per_node 3 -m experiments.own_loop_deviation     # LA-2 on 3 processes vs both
    mpiexec -n 3 python -m experiments.own_loop_deviation

The loop (:func:`train`) is a plain PyTorch one, the same around every optimizer: a finite
DataLoader over 3 epochs of a seeded float64 regression dataset, gradient clipping, a StepLR
stepped per epoch.  Co-located, it runs around LA-1, LA-2 and LA-3 with SGD-momentum and Adam;
on W processes around LA-(W-1), one agent per process (the worker on rank 0, the others in
``serve``), and the ranks' records are gathered on rank 0.  Printed per case: the largest
deviation over every agent and every step, ``max |x - x_ref| / max |x_ref|``, from the reference
(``agents.reference.MultilayerLookahead`` in the same loop) and, distributed, from the co-located
AgentOptimizer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LEVELS = {1: ((5,), (0.5,)), 2: ((3, 2), (0.5, 0.6)), 3: ((2, 2, 2), (0.5, 0.6, 0.7))}
INNER = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}
EPOCHS = 3


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 4 -> 6 -> 2 tanh MLP with seeded initial values."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def dataset(seed: int = 1, n: int = 120, dtype: torch.dtype = torch.float64) -> TensorDataset:
    """``n`` noisy regression samples (x in R^4, y = tanh(x W) + noise in R^2)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(4, 2, generator=gen, dtype=dtype)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y = torch.tanh(x @ target) + 0.1 * torch.randn(n, 2, generator=gen, dtype=dtype)
    return TensorDataset(x, y)


def loader(seed: int = 1, batch_size: int = 8, dtype: torch.dtype = torch.float64, n: int = 120) -> DataLoader:
    """A finite, shuffled DataLoader whose order is fixed by ``seed`` (build a fresh one per run)."""
    return DataLoader(dataset(seed, n, dtype), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + 1000))


def train(model: nn.Module, opt: torch.optim.Optimizer, data: DataLoader, epochs: int, record=None, *,
          clip: float = 0.5, accumulate: int = 1, amp: bool = False, scaler=None, on_epoch=None) -> None:
    """The user's loop: ``record()`` after every optimizer step, ``on_epoch()`` after every epoch.

    ``accumulate`` micro-batches per optimizer step; ``amp``: bfloat16 autocast (CPU);
    ``scaler``: a ``torch.amp.GradScaler``."""
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    for _ in range(epochs):
        for i, (x, y) in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = nn.functional.mse_loss(model(x).to(y.dtype), y)
            loss = loss / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if (i + 1) % accumulate:
                continue
            if scaler is not None:
                scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
            if record is not None:
                record()
        if on_epoch is not None:
            on_epoch()
        scheduler.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_trajectory(ks, alphas, inner: str, policy="maintain") -> torch.Tensor:
    """The loop around MultilayerLookahead: (steps + 1, n + 1, d), the fast weights then every
    level's slow weights, from theta_0."""
    from agents.reference import MultilayerLookahead

    net = make_model(0)
    la = MultilayerLookahead(INNER[inner](net.parameters()), ks, alphas, state_policy=policy)

    def columns():
        return torch.stack([flat(net)] + [torch.cat([s.reshape(-1) for s in la.slow_params(l)])
                                          for l in range(1, len(ks) + 1)])

    rows = [columns()]
    train(net, la, loader(), EPOCHS, lambda: rows.append(columns()))
    return torch.stack(rows)


def own_trajectory(ks, alphas, inner: str, policy="maintain", comm=None) -> torch.Tensor:
    """The same loop around an AgentOptimizer (co-located, or on ``comm``'s ranks: every rank
    calls it): every agent at every step, (steps + 1, n + 1, d), on every rank.  Passive ranks
    record after each sync (their agents change only there); the records are gathered."""
    import topology
    from launch import AgentOptimizer

    net = make_model(0)
    opt = AgentOptimizer(INNER[inner](net.parameters()), topology.multilayer(ks, alphas), model=net, comm=comm,
                         state_policy=policy)

    def snapshot(*_):
        params = opt.local_parameters()
        snaps.append((opt.t, torch.stack([params[i].detach().clone() for i in sorted(params)])))

    snaps: list = []
    snapshot()
    if opt.is_worker:
        train(net, opt, loader(), EPOCHS, snapshot)
        opt.close()
    else:
        opt.serve(snapshot)
    mine = (sorted(opt.agents), snaps)
    parts = comm.all_gather_object(mine) if comm is not None and comm.world_size > 1 else [mine]
    steps = max(t for _, snaps_ in parts for t, _ in snaps_)
    full = torch.empty(steps + 1, len(ks) + 1, snaps[0][1].shape[-1], dtype=torch.float64)
    for agents, snaps_ in parts:
        for k, (t, rows) in enumerate(snaps_):
            end = snaps_[k + 1][0] if k + 1 < len(snaps_) else steps + 1
            full[t:end, agents] = rows
    return full


def deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over every agent and every step."""
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    from launch import make_communicator
    from launch.engine.own_loop.environment import detect_launch

    torch.set_num_threads(1)
    comm = make_communicator(detect_launch())
    world = comm.world_size
    levels = [world - 1] if world > 1 else [1, 2, 3]
    for n in levels:
        ks, alphas = LEVELS[n]
        for inner in INNER:
            own = own_trajectory(ks, alphas, inner, comm=comm if world > 1 else None)
            if comm.rank:
                continue
            reference = reference_trajectory(ks, alphas, inner)
            line = (f"LA-{n} ks={ks} alphas={alphas} {inner}: {own.shape[0] - 1} steps x {own.shape[1]} agents, "
                    f"max deviation from MultilayerLookahead {deviation(own, reference):.3e}")
            if world > 1:
                line += (f", from co-located {deviation(own, own_trajectory(ks, alphas, inner)):.3e} "
                         f"({world} processes, {comm.backend})")
            print(line, flush=True)
    comm.close()


if __name__ == "__main__":
    main()
