"""The in-process parts of ``python -m launch.bench --gpu`` (:mod:`launch.bench.gpu`).

``own_loop``    :class:`launch.AgentOptimizer` (LA-2, co-located) around a fused Adam, a
                ``torch.compile``\\ d model, autocast (float16 on CUDA, bfloat16 on the CPU) and a
                ``GradScaler``, for ``gpu_own_loop_steps`` steps, one of them with an infinite loss:
                the scaler skips that step, and t must not count it; the parameters must still be
                views into the worker's flat buffer at the end (:func:`agents.flat.detached_parameters`).
``reference``   co-located LA-2 against the serial reference on the device, float64, every agent
                after every iteration: ``max |x_i - y_i| / max |y_i|`` (target <= 1e-12).
``host_syncs``  co-located LA-2, its data on the device: host synchronisations counted per step
                without a sync and per step with one (:mod:`launch.bench.host_syncs`: on CUDA under
                ``set_sync_debug_mode("warn")``; elsewhere the reads that would synchronise).
                Target: none on a step without a sync (one rank checks finiteness before each
                sync: its reads are the documented decision point).
``ring``        a co-located gossip ring of ``gpu_ring_agents`` agents: seconds per agent-step on the
                device and on the CPU.
"""

from __future__ import annotations

import copy

import torch

import topology
from launch.bench import workloads
from launch.bench.colocated import per_agent, ring_simulation, sgd
from launch.bench.host_syncs import count_host_syncs
from launch.bench.timing import median


def _device_batches(model, batch_size: int, device: str, dtype=torch.float32) -> list:
    return [(x.to(device=device, dtype=dtype), y.to(device)) for x, y in workloads.batches(model, batch_size)]


def own_loop(config, device: str) -> dict:
    """The ``own_loop`` part (module docstring)."""
    from agents.flat import detached_parameters
    from launch import AgentOptimizer

    kind = torch.device(device).type
    model = workloads.mlp(64).to(device)
    opt = AgentOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), topology.multilayer((5, 2), (0.5, 0.5)),
                         model=model)
    compiled = torch.compile(model, backend="inductor" if kind == "cuda" else "eager")
    scaler = torch.amp.GradScaler(kind)
    data = workloads.stream(_device_batches(model, 16, device))
    steps, forced = config.gpu_own_loop_steps, config.gpu_own_loop_steps // 2
    held = None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16):
            loss = workloads.loss_fn(compiled, next(data))
        if step == forced:
            loss = loss * float("inf")                   # every gradient inf or NaN: the scaler skips
        scaler.scale(loss).backward()
        before = opt.t
        scaler.step(opt)
        scaler.update()
        if step == forced:
            held = opt.t == before
    detached = detached_parameters(list(model.parameters()), opt.engine.agents[0].flat)
    final = float(loss.detach())
    opt.close()
    passed = held is True and opt.t == steps - 1 and detached == [] and final == final
    return {"passed": passed, "t": opt.t, "steps": steps, "forced_inf_step": forced,
            "t_unchanged_by_the_skipped_step": held, "detached_parameters": detached, "last_loss": final,
            "summary": f"{steps} steps (fused Adam, torch.compile, autocast, GradScaler), t={opt.t} "
                       f"(the inf step skipped: {held}), parameters in the buffer: {detached == []}"}


def reference(config, device: str, width: int = 32, batch_size: int = 16) -> dict:
    """The ``reference`` part (module docstring)."""
    from agents.reference import MultilayerLookahead
    from launch.engine.simulation import Simulation

    ks, alphas = (5, 2), (0.5, 0.6)
    model = workloads.mlp(width).to(device=device, dtype=torch.float64)
    fixed = _device_batches(model, batch_size, device, torch.float64)
    sim = Simulation(model, workloads.loss_fn, workloads.stream(fixed), topology.multilayer(ks, alphas), sgd())
    ref = copy.deepcopy(model)
    optimizer = MultilayerLookahead(sgd()(list(ref.parameters())), ks, alphas)
    data = workloads.stream(fixed)
    worst = 0.0
    for _ in range(config.gpu_reference_steps):
        sim.step()
        optimizer.zero_grad(set_to_none=True)
        workloads.loss_fn(ref, next(data)).backward()
        optimizer.step()
        columns = [list(ref.parameters())] + [optimizer.slow_params(level) for level in range(1, len(ks) + 1)]
        ours = sim.local_parameters()
        for i, column in enumerate(columns):
            y = torch.cat([p.detach().reshape(-1) for p in column])
            worst = max(worst, float((ours[i] - y).abs().max() / y.abs().max()))
    return {"passed": worst <= 1e-12, "deviation": worst, "target": 1e-12,
            "summary": f"co-located LA-2 ks={ks} vs the serial reference, float64, {config.gpu_reference_steps} steps: "
                       f"max relative deviation {worst:.2e} (target 1e-12)",
            "parameters": workloads.num_parameters(model)}


def host_syncs(config, device: str) -> dict:
    """The ``host_syncs`` part (module docstring)."""
    from launch.engine.simulation import Simulation

    model = workloads.mlp(128).to(device)
    schedule = topology.multilayer((5, 2), (0.5, 0.5))
    sim = Simulation(model, workloads.loss_fn, workloads.stream(_device_batches(model, 32, device)), schedule, sgd())
    for _ in range(schedule.period):                    # lazy initialisation (optimizer state, allocator)
        sim.step()
    counts: dict[str, list[int]] = {"step": [], "sync": []}
    for _ in range(config.gpu_sync_steps):
        syncs = schedule.matrix_index(sim.t) in schedule.sync_indices
        with count_host_syncs(device) as counted:
            sim.step()
        counts["sync" if syncs else "step"].append(counted.count)
    per_step, per_sync = max(counts["step"]), max(counts["sync"])
    what = "synchronisations" if torch.device(device).type == "cuda" else "host reads (what would synchronise on CUDA)"
    return {"passed": per_step == 0, "per_step_without_sync": counts["step"], "per_step_with_sync": counts["sync"],
            "summary": f"{what}: at most {per_step} per step without a sync (target 0), {per_sync} per step with "
                       f"one (the finiteness check's flags, read before the sync)"}


def ring(config, device: str) -> dict:
    """The ``ring`` part (module docstring)."""
    m, rows = config.gpu_ring_agents, {}
    for where in dict.fromkeys((device, "cpu")):
        model = workloads.mlp(config.b5_width).to(where)
        finish = torch.cuda.synchronize if torch.device(where).type == "cuda" else None
        run = per_agent(ring_simulation(model, _device_batches(model, config.b5_batch, where), m), m, finish)
        run(m)                                          # warm-up: one iteration
        rows[where] = median([run(2 * m)[0] for _ in range(3)])
    speedup = rows["cpu"] / rows[device]
    return {"passed": all(v > 0 for v in rows.values()), "agents": m, "seconds_per_agent_step": rows,
            "cpu_over_device": speedup,
            "summary": f"ring of {m} agents: {rows[device] * 1e6:.1f} us per agent-step on {device}, "
                       f"{rows['cpu'] * 1e6:.1f} us on cpu ({speedup:.1f}x)"}
