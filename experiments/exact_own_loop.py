"""The own loop on 3 processes against the same loop co-located, with and without the exact mode.

A researcher's loop (launch.AgentOptimizer): a CNN with BatchNorm and dropout on scikit-learn's
digits, AdamW with OneCycleLR, gradient clipping, two micro-batches accumulated per step, bfloat16
autocast, a DistributedSampler; LA-2 (ks (5, 2), alphas (0.5, 0.5)) in float32.  The same loop
runs co-located (every agent in one process) and under torchrun on 3 processes (the worker on
rank 0, one slow level per other rank); the final parameters of every agent, the worker's
BatchNorm statistics and the test-set predictions of the outermost slow weights are compared:

    python -m experiments.exact_own_loop                  # both layouts, exact off and on: the table
    python -m experiments.exact_own_loop --steps 300 --json

Without the exact mode the 3-rank all-reduce adds the slow level's three terms in gloo's ring
order, the co-located sum in agent order, and in training the rounding grows; with
``AgentOptimizer(..., exact=True)`` every sum is added in agent order on any layout, and the two
runs end with the same bits.  Each layout's run is this file too: ``--out DIR`` runs one layout
(co-located, or one rank under torchrun) and writes ``DIR/rank{R}.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import topology
from agents.flat import load_flat_
from experiments.digits import digits_split
from launch import AgentOptimizer

KS, ALPHAS = (5, 2), (0.5, 0.5)
BATCH, MICRO = 32, 2          # a step: two micro-batches of 16, their gradients accumulated
PROCESSES = 3


def make_model() -> nn.Module:
    """Two 3 x 3 convolutions with BatchNorm, a max-pool, dropout, a linear layer (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 16, 10))


def train(steps: int, exact: bool, comm) -> dict:
    """The loop on ``comm`` (None: co-located; "auto": the launcher's); this rank's agents'
    final flat parameters, and the worker's BatchNorm buffers (on the worker's rank)."""
    torch.set_num_threads(1)                    # the same kernels' arithmetic in every process
    split = digits_split()
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    opt = AgentOptimizer(inner, topology.multilayer(KS, ALPHAS), model=model, comm=comm, exact=exact)
    if not opt.is_worker:
        opt.serve()
        return {"agents": {i: x.clone() for i, x in opt.local_parameters().items()}}
    train_set = TensorDataset(split.x_train.float(), split.y_train)
    sampler = DistributedSampler(train_set, opt.num_workers, opt.worker_index, drop_last=True, seed=0)
    loader = DataLoader(train_set, batch_size=BATCH, sampler=sampler, drop_last=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    epoch = 0
    while opt.t < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO)):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(xs), ys) / MICRO
                loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
            scheduler.step()
            if opt.t == steps:
                break
        epoch += 1
    result = {"agents": {i: x.clone() for i, x in opt.local_parameters().items()},
              "buffers": {k: v.clone() for k, v in model.named_buffers()}}
    opt.close()
    return result


def run_layout(steps: int, exact: bool, out: Path, processes: int) -> dict:
    """One layout's run, as every rank saw it merged: ``{"agents": {i: flat}, "buffers": ...}``."""
    if processes == 1:
        return train(steps, exact, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "experiments.exact_own_loop", "--steps", str(steps), "--out", str(out)]
    subprocess.run(command + (["--exact"] if exact else []), check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=Path(__file__).resolve().parents[1])
    merged = {"agents": {}}
    for rank in range(processes):
        part = torch.load(out / f"rank{rank}.pt")
        merged["agents"].update(part["agents"])
        merged.update({k: v for k, v in part.items() if k != "agents"})
    return merged


def predictions(run: dict, agent: int) -> torch.Tensor:
    """The test-set classes predicted by ``agent``'s parameters with the worker's BatchNorm
    statistics (eval mode)."""
    model = load_flat_(make_model(), run["agents"][agent])
    model.load_state_dict({**model.state_dict(), **run["buffers"]})
    with torch.no_grad():
        return model.eval()(digits_split().x_test.float()).argmax(1)


def compare(a: dict, b: dict) -> dict:
    """Largest absolute difference of any agent's parameters and of the BatchNorm buffers, and
    how many test images the outermost slow weights classify differently."""
    outer = max(a["agents"])
    return {"parameters": max(float((a["agents"][i] - b["agents"][i]).abs().max()) for i in a["agents"]),
            "identical": all(torch.equal(a["agents"][i], b["agents"][i]) for i in a["agents"]),
            "batchnorm": max(float((x.double() - b["buffers"][k].double()).abs().max())
                             for k, x in a["buffers"].items()),
            "predictions": int((predictions(a, outer) != predictions(b, outer)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=126)
    parser.add_argument("--exact", action="store_true", help="with --out: the exact mode")
    parser.add_argument("--out", type=Path, help="run one layout (this process, or this rank) into this folder")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1; got {args.steps}")
    if args.out is not None:
        distributed = "RANK" in os.environ
        result = train(args.steps, args.exact, "auto" if distributed else None)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.out / f"rank{os.environ.get('RANK', '0')}.pt")
        return
    rows = {}
    for exact in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            colocated = run_layout(args.steps, exact, Path(tmp), 1)
            distributed = run_layout(args.steps, exact, Path(tmp), PROCESSES)
        rows["exact" if exact else "default"] = compare(distributed, colocated)
    if args.json:
        print(json.dumps({"steps": args.steps, "rows": rows}))
        return
    print(f"own loop, LA-2 ks={KS}, CNN with BatchNorm and dropout, float32 + bfloat16 autocast, {args.steps} steps:"
          f" {PROCESSES} processes (gloo) vs co-located")
    for name, row in rows.items():
        print(f"  {name:8s} parameters max |diff| {row['parameters']:.3e} (bit for bit: {row['identical']}), "
              f"BatchNorm buffers {row['batchnorm']:.3e}, test images classified differently {row['predictions']}")


if __name__ == "__main__":
    main()
