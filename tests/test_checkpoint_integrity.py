"""Checkpoints that cannot be trusted are refused, naming the file; a resume proves it is the same
run; a failed save says so once and leaves nothing behind (co-located, the Python API)."""

import errno
import json
import shutil

import pytest
import torch

import topology
from launch.engine.store import checkpoint as ckpt_module
from launch.engine.simulation import run_with_checkpoints
from launch.engine.store.checkpoint import CheckpointError, Checkpointer
from launch.engine.simulation import Simulation
from tests import problems
from tests.test_checkpoint import CUT, STEPS, buffers, make_sim, record

DT = torch.float64


@pytest.fixture
def saved(tmp_path):
    """Checkpoints of t=3 and t=7 (keep=None) of an LA-2 run (Adam, pullback)."""
    checkpointer = Checkpointer(tmp_path, every=3, keep=None)
    sim = make_sim(DT, "adam", "pullback")
    run_with_checkpoints(sim, 6, checkpointer)
    record(sim, CUT)
    checkpointer.save(sim)
    assert checkpointer.latest_step() == CUT
    return tmp_path


def fresh(optimizer="adam", policy="pullback", dtype=DT):
    return make_sim(dtype, optimizer, policy, seed_rngs=77)


def refuses(directory, match, sim=None, **options):
    with pytest.raises(ValueError, match=match) as info:
        Checkpointer(directory, **options).load(sim if sim is not None else fresh())
    return str(info.value)


# -- checksums: flipped bytes, swapped or stale files, edited manifests ----------------------------
def test_flipped_bytes_are_refused_naming_the_file(saved):
    path = saved / "step-00000007" / "agent-0.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    message = refuses(saved, "agent-0.pt does not match its sha256")
    assert "latest.json" in message


@pytest.mark.parametrize("names", [("agent-0.pt", "agent-1.pt"), ("agent-2.pt", "rank-0.pt")])
def test_swapped_files_are_refused(saved, names):
    a, b = (saved / "step-00000007" / n for n in names)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b), b.write_bytes(data_a)
    refuses(saved, f"{names[0]} does not match its sha256")


def test_a_file_of_another_checkpoint_is_refused(saved):
    shutil.copy(saved / "step-00000006" / "agent-1.pt", saved / "step-00000007" / "agent-1.pt")
    refuses(saved, "agent-1.pt does not match its sha256")


def edit_manifest(directory, **changes):
    path = directory / "latest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


def test_an_edited_counter_is_refused(saved):
    edit_manifest(saved, t=6)    # the folder still step-00000007: the manifest contradicts itself
    refuses(saved, "folder 'step-00000007' is not the folder of t=6")


def test_a_manifest_pointed_at_an_older_checkpoint_is_refused(saved):
    edit_manifest(saved, t=6, folder="step-00000006")   # the checksums are those of t=7's files
    refuses(saved, r"step-00000006/agent-0.pt does not match its sha256")


def test_the_counter_of_every_file_is_cross_checked(saved):
    """A manifest whose checksums all match, but one file holds another iteration (copied in from
    t=7 and its checksum updated): refused by the t cross-check alone."""
    old = saved / "step-00000006"
    shutil.copy(saved / "step-00000007" / "agent-2.pt", old / "agent-2.pt")
    manifest = json.loads((saved / "latest.json").read_text())
    files = dict(manifest["files"])
    for name in files:
        files[name] = ckpt_module.sha256_hex((old / name).read_bytes())
    edit_manifest(saved, t=6, folder="step-00000006", files=files)
    refuses(saved, "agent-2.pt holds iteration t=7, latest.json says t=6")
    # The same manifest without the stale file loads (the refusal above is the t check's).
    shutil.copy(saved / "step-00000007" / "agent-2.pt", saved / "kept.pt")
    torch.save({"t": 6, "agent": torch.load(saved / "kept.pt", weights_only=False)["agent"]}, old / "agent-2.pt")
    files["agent-2.pt"] = ckpt_module.sha256_hex((old / "agent-2.pt").read_bytes())
    edit_manifest(saved, files=files)
    assert Checkpointer(saved).load(fresh()) == 6


@pytest.mark.parametrize("content, words", [
    ({"drop": "folder"}, "no 'folder'"),
    ({"drop": "files"}, "no 'files'"),
    ([1, 2], "it holds a list, not an object"),
    ("not json", "not JSON"),
    ({"set": {"t": "7"}}, "'t' is '7', not an integer >= 0"),
    ({"set": {"files": {"agent-0.pt": "00"}}}, "'files' is"),
    ({"set": {"folder": "../elsewhere"}}, "'folder' is '../elsewhere'"),
    ({"set": {"format": 1}}, "format 1, written by an older version without checksums"),
    ("directory", "it is a directory, not a file"),
])
def test_a_malformed_manifest_is_one_clear_error(saved, content, words):
    path = saved / "latest.json"
    manifest = json.loads(path.read_text())
    if content == "directory":
        path.unlink()
        path.mkdir()
    elif isinstance(content, dict):
        manifest.pop(content.get("drop"), None)
        manifest.update(content.get("set", {}))
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(json.dumps(content) if isinstance(content, list) else content)
    message = refuses(saved, "latest.json is malformed" if "format 1" not in words else "format 1")
    assert words in message, message
    with pytest.raises(ValueError, match="latest.json"):
        Checkpointer(saved).latest_step()


# -- the same run ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, words", [
    (topology.multilayer((3, 2), (0.8, 0.6)), "schedule is 'MultilayerSchedule(ks=(3, 2), alphas=(0.8, 0.6))', "
                                              "the checkpoint's 'MultilayerSchedule(ks=(3, 2), alphas=(0.5, 0.6))'"),
    (topology.multilayer((2, 3), (0.5, 0.6)), "schedule is 'MultilayerSchedule(ks=(2, 3)"),
])
def test_another_schedule_of_the_same_shape_is_refused(saved, schedule, words):
    torch.manual_seed(0)
    sim = Simulation(problems.make_model(0, DT), problems.loss_fn, problems.batches(1, DT), schedule,
                     problems.OPTIMIZERS["adam"], state_policy="pullback")
    message = refuses(saved, "not the run of the checkpoint", sim)
    assert words in message and "allow=['schedule']" in message, message


def adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_other_hyperparameters_are_refused_then_allowed_and_applied(tmp_path):
    """lr 0.01 -> 0.05: refused naming optimizer.lr with both values; with allow the new lr is in
    every param group and the trajectory is that of a run whose lr changed at the cut, bit for bit
    (loading the optimizer's state_dict alone would have put the saved lr back)."""
    def sim(lr):
        torch.manual_seed(0)
        return Simulation(problems.make_model(0, DT), problems.loss_fn, problems.batches(1, DT),
                          topology.multilayer((3, 2), (0.5, 0.6)), adam(lr), state_policy="pullback")

    switched = sim(0.01)
    record(switched, CUT)
    Checkpointer(tmp_path).save(switched)
    for agent in switched.agents.values():
        if agent.is_worker:
            for group in agent.optimizer.param_groups:
                group["lr"] = 0.05
    expected = record(switched, STEPS)

    message = refuses(tmp_path, "not the run of the checkpoint", sim(0.05))
    assert "optimizer.lr is 0.05, the checkpoint's 0.01" in message, message
    checkpointer = Checkpointer(tmp_path, allow=["optimizer.lr"])
    resumed = sim(0.05)
    assert checkpointer.load(resumed) == CUT
    assert checkpointer.changed == [("optimizer.lr", 0.01, 0.05)]
    assert all(g["lr"] == 0.05 for a in resumed.agents.values() if a.is_worker for g in a.optimizer.param_groups)
    assert torch.equal(record(resumed, STEPS), expected)
    # Without the re-application the saved lr would have come back: the trajectories differ.
    unchanged = sim(0.01)
    Checkpointer(tmp_path).load(unchanged)
    assert not torch.equal(record(unchanged, STEPS), expected)


def test_another_optimizer_class_is_refused_even_when_allowed(saved):
    for allow in ((), ("optimizer",)):
        message = refuses(saved, "optimizer is 'SGD', the checkpoint's 'Adam'", fresh("sgd_momentum"), allow=allow)
        assert "cannot change on resume" in message and "optimizer.lr" not in message


def test_the_callers_record_is_compared_and_allowed(tmp_path):
    sim = make_sim(DT, "adam", "pullback")
    record(sim, CUT)
    Checkpointer(tmp_path, config={"problem": {"noise": 0.1}, "seed": 0}).save(sim)
    message = refuses(tmp_path, "not the run", config={"problem": {"noise": 0.2}, "seed": 0})
    assert "problem.noise is 0.2, the checkpoint's 0.1" in message
    loaded = Checkpointer(tmp_path, config={"problem": {"noise": 0.2}, "seed": 0}, allow=["problem"])
    assert loaded.load(fresh()) == CUT and loaded.changed == [("problem.noise", 0.1, 0.2)]


# -- failed saves ------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["latest.json", "agent-1.pt", "mkdir"])
def test_a_full_disk_anywhere_in_a_save_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, failing):
    checkpointer = Checkpointer(tmp_path, keep=None)
    sim = make_sim(DT, "adam", "pullback")
    record(sim, 3)
    checkpointer.save(sim)
    good = {p.name: p.read_bytes() for p in (tmp_path / "step-00000003").iterdir()}
    record(sim, CUT)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "mkdir":
        monkeypatch.setattr(ckpt_module.Path, "mkdir", full)
    else:
        real = ckpt_module.atomic_write
        monkeypatch.setattr(ckpt_module, "atomic_write",
                            lambda path, write: full() if path.name == failing else real(path, write))
    with pytest.raises(CheckpointError, match=r"checkpoint of iteration t=7 not written \(the last one is kept: "
                                              r"t=3 in .*\): rank 0.*No space left on device"):
        checkpointer.save(sim)
    monkeypatch.undo()
    assert not (tmp_path / "step-00000007").exists()          # the partial folder is gone
    assert checkpointer.latest_step() == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-00000003").iterdir()} == good
    assert not list(tmp_path.rglob("*.tmp"))
    assert checkpointer.load(fresh()) == 3


def test_a_failed_save_keeps_the_committed_folder_of_the_same_t(tmp_path, monkeypatch):
    """Saving twice at one t, the second time onto a full disk: the first, committed, stays."""
    checkpointer = Checkpointer(tmp_path)
    sim = make_sim(DT, "adam", "pullback")
    record(sim, 3)
    checkpointer.save(sim)
    real = ckpt_module.atomic_write

    def full(path, write):
        if path.name == "latest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(ckpt_module, "atomic_write", full)
    with pytest.raises(CheckpointError, match="t=3 not written"):
        checkpointer.save(sim)
    monkeypatch.undo()
    loaded = fresh()
    assert checkpointer.load(loaded) == 3
    assert torch.equal(buffers(loaded), buffers(sim))
