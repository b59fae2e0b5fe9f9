"""The flat buffer's layout: aligned parameters, padding that nothing observes, contiguous
weights only, and parameters that left the buffer detected."""

import copy

import pytest
import torch
from torch import nn

import topology
from agents import flat as flat_module
from agents.agent import Agent, probe_state_layout
from agents.flat import FlatBuffer, check_attached, detached_parameters, flatten_module_, load_flat_
from launch.engine.record.run import EngineRun
from launch.engine.simulation import Simulation
from tests import problems

SHAPES = [(3, 5), (5,), (7,), (2, 2), (1,)]


def odd_model(dtype=torch.float64, seed=0):
    """Parameters of 15, 5, 21, 3 entries: every one after the first is misaligned when packed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def odd_batches(seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(8, 3, generator=gen, dtype=dtype)
        yield x, torch.sin(x.sum(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_parameter_starts_on_16_bytes_and_the_padding_is_zero(dtype):
    flat = FlatBuffer(SHAPES, dtype, "cpu", state_numel=3)
    size = flat.buffer.element_size()
    assert flat.offsets[0] == 0                      # the finiteness marker is the first entry
    for view, offset in zip(flat.views(), flat.offsets):
        assert view.data_ptr() % 16 == 0 and (offset * size) % 16 == 0 and view.is_contiguous()
    assert (flat.state_offset * size) % 16 == 0 and flat.state.numel() == 3
    assert flat.padded and flat.end > flat.numel == 15 + 5 + 7 + 4 + 1
    for view, value in zip(flat.views(), range(1, 6)):
        view.fill_(value)
    packed = flat.pack(flat.params)
    assert torch.equal(packed, torch.cat([v.reshape(-1) for v in flat.views()]))
    assert float(flat.params.sum()) == float(packed.sum())          # the padding is 0
    # load_flat_ takes either layout.
    model = nn.ParameterList([nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES])
    for vector in (flat.params.clone(), packed):
        load_flat_(model, torch.zeros_like(vector))
        load_flat_(model, vector)
        assert [float(p.detach().mean()) for p in model] == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="flat must have 32 entries for this module"):
        load_flat_(model, packed[:-1])


def test_pullback_state_slots_are_aligned_too():
    layout = probe_state_layout(odd_model(torch.float32), problems.OPTIMIZERS["adam"])
    assert [s.offset % 4 for s in layout.slots] == [0] * len(layout.slots) and len(layout.slots) == 12


def simulate_odd(policy, steps, optimizer="adam", schedule=None, dtype=torch.float64):
    schedule = schedule or topology.multilayer((3, 2), (0.5, 0.6))
    data = (lambda i: odd_batches(1 + i, dtype)) if len(schedule.workers) > 1 else odd_batches(dtype=dtype)
    sim = Simulation(odd_model(dtype), problems.loss_fn, data, schedule,
                     problems.OPTIMIZERS[optimizer], state_policy=policy)
    rows = []
    for _ in range(steps):
        sim.step()
        rows.append((torch.stack([x.clone() for x in sim.local_parameters().values()]),
                     torch.stack([z.clone() for z in EngineRun(sim.engine).models().values()])))
    return sim, rows


@pytest.mark.parametrize("policy,optimizer,schedule", [
    ("maintain", "sgd_momentum", None), ("pullback", "adam", None),
    ("maintain", "adam", topology.decentralized.ring(4))])           # push-sum: x / w on the padding
def test_the_padding_changes_no_bit_of_any_agent(policy, optimizer, schedule, monkeypatch):
    """The aligned layout and the packed one (alignment off) give the same bits, every agent,
    every step, float32 (parameters, the de-biased models, the gathered state and the buffers'
    padding, which stays 0)."""
    steps = 24
    aligned, rows = simulate_odd(policy, steps, optimizer, schedule, torch.float32)
    monkeypatch.setattr(flat_module, "ALIGN_BYTES", 1)
    packed, packed_rows = simulate_odd(policy, steps, optimizer, schedule, torch.float32)
    assert all(a.flat.padded for a in aligned.agents.values())
    assert not any(a.flat.padded for a in packed.agents.values())
    for t, ((x, z), (y, w)) in enumerate(zip(rows, packed_rows)):
        assert torch.equal(x, y) and torch.equal(z, w), f"step {t}"
    assert (rows[-1][0] - rows[0][0]).abs().max() > 1e-3            # the run moved
    for agent in aligned.agents.values():
        padding = torch.ones_like(agent.flat.buffer, dtype=torch.bool)
        for o, n in zip(agent.flat.offsets, agent.flat.numels):
            padding[o:o + n] = False
        padding[agent.flat.state_offset:] = False
        assert padding.any() and not agent.flat.buffer[padding].any()
    for a, b in zip(aligned.gather_parameters(), packed.gather_parameters()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_padded_checkpoint_round_trip_and_load_into_a_model():
    sim, _ = simulate_odd("pullback", 7)
    entry = sim.agents[0].state_dict()
    assert entry["buffer"].numel() == sim.agents[0].flat.buffer.numel()
    fresh, _ = simulate_odd("pullback", 0)
    fresh.agents[0].load_state_dict(entry)
    assert torch.equal(fresh.agents[0].flat.buffer, sim.agents[0].flat.buffer)
    model = load_flat_(odd_model(), sim.agents[2].params)          # the buffer's layout ...
    again = load_flat_(odd_model(), sim.local_parameters()[2])      # ... or packed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_channels_last_weights_are_refused_before_anything_runs():
    model = conv_model().to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    with pytest.raises(ValueError) as info:
        Simulation(model, problems.loss_fn, iter([]), topology.lookahead(2, 0.5), problems.OPTIMIZERS["sgd"])
    message = str(info.value)
    assert "0.weight is not (channels_last?)" in message and "model.to(memory_format=torch.contiguous_format)" in message
    with pytest.raises(ValueError, match="must be contiguous"):
        flatten_module_(model)
    Simulation(model.to(memory_format=torch.contiguous_format), problems.loss_fn, iter([]),
               topology.lookahead(2, 0.5), problems.OPTIMIZERS["sgd"])


@pytest.mark.parametrize("change", ["half", "double", "channels_last", "to_meta_copy"])
def test_parameters_that_left_the_buffer_are_named(change):
    model = conv_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    worker = Agent(0, model, worker=True, optimizer=optimizer, adopt=True)
    names = [name for name, _ in model.named_parameters()]
    check_attached(list(model.parameters()), worker.flat, names)
    model.to("cpu")                                                   # a no-op keeps them
    model.float()
    assert detached_parameters(list(model.parameters()), worker.flat) == []
    if change == "half":
        model.half()
    elif change == "double":
        model.double()
    elif change == "channels_last":
        model.to(memory_format=torch.channels_last)
    else:                                                             # a new tensor, same dtype/device
        model[4].weight.data = copy.deepcopy(model[4].weight.data)
    detached = detached_parameters(list(model.parameters()), worker.flat)
    expected = {"half": [0, 1, 2, 3], "double": [0, 1, 2, 3], "channels_last": [0], "to_meta_copy": [2]}[change]
    assert detached == expected
    with pytest.raises(ValueError) as info:
        check_attached(list(model.parameters()), worker.flat, names)
    assert f"{names[expected[0]]} (now " in str(info.value)
    assert "no longer live in the agent's flat buffer (torch.float32 on cpu)" in str(info.value)
    assert "do it before wrapping the optimizer" in str(info.value)


def test_agent_optimizer_step_refuses_parameters_that_left_the_buffer():
    """model.half() after the AgentOptimizer was built: the next step raises, naming the
    parameters, before the inner optimizer touches anything (co-located; on several ranks the
    refusal reaches every rank through the control message's ABORT)."""
    from launch import AgentOptimizer

    model = conv_model()
    opt = AgentOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), topology.lookahead(2, 0.5), model=model)
    batch = torch.randn(2, 3, 5, 5)
    model(batch).sum().backward()
    opt.step()
    before = opt.local_parameters()[1].clone()
    model.half()
    model.zero_grad()
    with pytest.raises(ValueError) as info:
        opt.step()
    assert "0.weight (now torch.float16 on cpu)" in str(info.value)
    assert "do it before wrapping the optimizer" in str(info.value)
    assert opt.t == 1 and torch.equal(opt.local_parameters()[1], before)
