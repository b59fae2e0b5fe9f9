"""Your own PyTorch training loop as a multi-agent Lookahead run, with launch.AgentOptimizer.

A plain PyTorch training script -- a DataLoader over this worker's shard of scikit-learn's digits
(nothing downloads), epochs, gradient clipping, a StepLR, an evaluation every epoch -- in which the
lines marked ``# lookahead-agents`` are those that differ from the same script without the
simulator (those marked ``option`` only choose other schedules from the command line):

    python -m experiments.own_loop                            # co-located: serial Lookahead
    torchrun --nproc_per_node 2 -m experiments.own_loop       # the worker on rank 0, the slow weights on rank 1
    mpiexec -n 2 python -m experiments.own_loop               # the same under MPI

Schedules: ``--ks 5 2 --alphas 0.5 0.5`` is LA-2 (3 agents: co-located, or 3 processes);
``--workers 2 --tau 4`` puts the slow levels over 2 local-SGD workers averaging every 4 steps
(2 + n processes; each worker trains on its own shard).  Each worker prints, every epoch, its last
training loss and the test loss and accuracy of the outermost slow weights.

``--run-dir DIR`` records the run as the command line does (``DIR/metrics.csv``, ``eval.csv``,
``agents.pt``, ``summary.json``: ``python -m launch.plot DIR`` draws it) and writes a checkpoint
after every epoch to ``DIR/checkpoints``; the same command again, with more ``--epochs``, resumes
from the last one and goes on bit for bit as if it had not stopped.
"""

import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import topology  # lookahead-agents
from experiments.digits import digits_split
from launch import AgentOptimizer, Checkpointer  # lookahead-agents


def evaluate(model, x, y):
    """Test loss and accuracy."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss, accuracy = nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ks", type=int, nargs="+", default=[5])  # lookahead-agents: option
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5])  # lookahead-agents: option
    parser.add_argument("--workers", type=int, default=1)  # lookahead-agents: option
    parser.add_argument("--tau", type=int, default=4)  # lookahead-agents: option
    parser.add_argument("--device", default="cpu", help="cpu, or cuda under torchrun: each rank's own GPU")
    parser.add_argument("--run-dir", help="write the record and checkpoints there; resume from them")  # lookahead-agents: option
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    split = digits_split()
    train_set = TensorDataset(split.x_train.float(), split.y_train)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    x_test, y_test = split.x_test.float().to(device), split.y_test.to(device)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    schedule = topology.multilayer(args.ks, args.alphas)  # lookahead-agents: LA-n, n = len(ks)
    if args.workers > 1:  # lookahead-agents: option (the slow levels over local-SGD workers)
        schedule = topology.decentralized.multilayer_local_sgd(  # lookahead-agents: option
            args.workers, args.ks, args.alphas, averaging={args.tau: args.workers})  # lookahead-agents: option
    opt = AgentOptimizer(inner, schedule, model=model, comm="auto")  # lookahead-agents: torchrun, mpiexec or none
    checkpointer = Checkpointer(os.path.join(args.run_dir, "checkpoints")) if args.run_dir else None  # lookahead-agents
    extra = opt.resume(checkpointer) if checkpointer else None  # lookahead-agents: None on a first run
    if args.run_dir:  # lookahead-agents: metrics.csv, eval.csv, agents.pt, summary.json (python -m launch.plot)
        opt.record(args.run_dir, evaluate=lambda m: dict(zip(("loss", "accuracy"), evaluate(m, x_test, y_test))))  # lookahead-agents
    if not opt.is_worker:  # lookahead-agents: a rank of slow weights only
        return opt.serve(checkpointer=checkpointer)  # lookahead-agents: takes part in the syncs until the workers close
    sampler = DistributedSampler(train_set, opt.num_workers, opt.worker_index, drop_last=True)  # lookahead-agents
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)  # lookahead-agents: was shuffle=True
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if extra:  # lookahead-agents: a resumed run continues after the epoch it saved
        scheduler.load_state_dict(extra["scheduler"])  # lookahead-agents

    for epoch in range(extra["epoch"] if extra else 0, args.epochs):  # lookahead-agents: was range(args.epochs)
        sampler.set_epoch(epoch)  # lookahead-agents
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step(loss=loss)  # lookahead-agents: was opt.step() (the loss goes into metrics.csv)
        scheduler.step()
        with opt.evaluating():  # lookahead-agents: the outermost slow weights, for the body
            test_loss, accuracy = evaluate(model, x_test, y_test)  # lookahead-agents: (indented)
        print(f"worker {opt.worker_index} epoch {epoch + 1}: train loss {loss.item():.4f}, "
              f"slow weights: test loss {test_loss:.4f}, test accuracy {accuracy:.4f}", flush=True)
        if checkpointer:  # lookahead-agents: a checkpoint per epoch (every rank writes its part)
            opt.save(checkpointer, extra={"epoch": epoch + 1, "scheduler": scheduler.state_dict()})  # lookahead-agents
    opt.close()  # lookahead-agents: the end of the run (the slow ranks' serve() returns)


if __name__ == "__main__":
    main()
