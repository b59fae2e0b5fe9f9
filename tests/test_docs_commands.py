"""Every shell command of README.md and docs/*.md is run here, or listed with the reason it is not.

**What a command is.** A line of a ```sh code block of README.md or of any docs/*.md (found by
glob: a new page, a new command, is picked up), split as a shell splits it (shlex); a trailing
backslash continues it, ``# ...`` is a comment, ``.venv/bin/X`` is X. A line of any other code
block that starts like a command (``python``, ``torchrun``, ``mpiexec``, ``make``, ``pytest``,
``pip``, ``.venv/bin/``) fails :func:`test_commands_are_in_sh_blocks`: commands go in ```sh
blocks, what they print in ```text blocks.

**How each is checked**, by its form (:func:`check`):

- ``python -m MODULE ARGS``, ``python SCRIPT ARGS``, ``python -c CODE`` of :data:`RUNNABLE`
  (the hydra apps, ``launch.plot``, ``launch.compare``, ``-c`` and the scripts of :data:`SHORTER`;
  ``python tests/plant.py SPEC MODULE ARGS`` is ``python -m MODULE ARGS`` with the plant installed
  in this process for that command alone, :data:`PLANT`): run as written in this
  process, through :mod:`runpy` as ``python`` runs them (``sys.argv``, ``__main__``, the exit
  status of ``SystemExit``): ``python -m launch`` goes through its entry point, hydra's own argument
  parsing included, and a fresh Python with torch (3-5 s here, each) is saved. Page by page, in
  order, in one scratch directory that stands for the repository's root (``experiments/`` is
  linked into it, for ``python experiments/quickstart.py``), so that a command reading what an
  earlier one wrote (``launch.plot`` after a run, a resume after a checkpoint) finds it. The exit
  status must be 0, or N where the command's comment says ``exit N``. One change keeps them short:
  a hydra app's (:data:`HYDRA_APPS`) ``launch.steps`` is at most :data:`STEPS` (a larger value, or
  none, gets ``launch.steps=STEPS`` appended; hydra takes a key's last value), unless the command
  is expected to fail (it fails before its first step); the scripts of :data:`SHORTER` get those
  arguments appended.
- ``torchrun`` and ``mpiexec`` commands of :data:`REAL` run for real, in processes of their own,
  all started when the module's first test starts (so they overlap the rest), their hydra
  ``launch.steps`` at most :data:`REAL_STEPS`. Of the others, a hydra app's overrides are composed
  by hydra and validated by :func:`launch.cli.build.build_job`, with the launcher's world size in
  the environment (``launch=colocated`` under torchrun is refused as it would be there), and the
  process count is checked against the topology's number of agents and
  ``launch.agents_per_rank``; a script's (:data:`PROBED`) is run here, in the launcher's environment, with the
  command's arguments, up to its ``AgentOptimizer(...)`` or ``simulate(...)`` call (patched to
  stop there, ``make_communicator`` to a stand-in of the process count), and the schedule it
  built must spread over the processes. Which: the REAL ones are
  ``torchrun --nproc_per_node 3 -m launch.equivalence launch=torch launch.steps=100`` (the
  float32 table of docs/cli.md) and ``mpiexec -n 3 python -m launch launch=mpi``; every other
  torchrun or mpiexec command is validated.
- A ```text block right after a ```sh block shows what that block's commands printed: where each
  of them ran as written (not shortened, not only validated), every line of the text block must
  be a line of their output, ``...`` standing for anything and decimal numbers (``0.23``,
  ``3.660e-07``) allowed to differ.
- :data:`ALIASES`: ``make demo`` is ``python -m launch`` (its Makefile recipe is checked).
  :data:`SKIPPED`: each with its reason (a GPU; a long experiment, naming the test that runs it
  in a tiny configuration, whose test file and function must exist). Any other command fails the
  test until it is run or listed.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import plant
from tests.spawn import ROOT, mpiexec_args, start_command, torchrun_args, wait_commands

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: The hydra applications: ``launch.steps`` keeps them short.
HYDRA_APPS = ("launch", "launch.equivalence")
#: ``launch.steps`` at most this in this process, and in the commands run for real.
STEPS, REAL_STEPS = 30, 100
#: Arguments appended to these scripts to keep them short.
SHORTER = {"experiments.own_loop": ["--epochs", "1"], "experiments/quickstart.py": ["--steps", "20"]}
#: What ``python`` commands may run here (``-m`` modules, scripts, ``-c``): any other fails until listed.
RUNNABLE = HYDRA_APPS + ("launch.plot", "launch.compare", "-c", *SHORTER)
#: ``python tests/plant.py SPEC MODULE ARGS``: MODULE run here with the plant installed (undone after it).
PLANT = "tests/plant.py"
#: Scripts that build their schedule (AgentOptimizer / simulate) before any work: validated under a launcher.
PROBED = ("experiments.own_loop", "experiments.own_loop_deviation", "experiments/quickstart.py")

#: torchrun / mpiexec commands run for real (the others: validated, see the module docstring).
REAL = (
    "torchrun --nproc_per_node 3 -m launch.equivalence launch=torch launch.steps=100",
    "mpiexec -n 3 python -m launch launch=mpi",
)
#: Seconds a command run for real may take (each; they run side by side).
REAL_TIMEOUT = 300

#: Commands run as another one.
ALIASES = {"make demo": "python -m launch"}

_TINY = "a long experiment ({}); {} runs its main in a tiny configuration"
#: Commands not run here, and why.
SKIPPED = {
    "make test": "the whole test suite, this file included",
    ". .venv/bin/activate": "changes the calling shell; every command here runs in that environment",
    "pytest -q -s tests/test_overlap.py | grep deviation": "a test file of the suite (make test runs it)",
    "pytest -s -q tests/test_post_local.py": "a test file of the suite (make test runs it)",
    "python -m experiments.own_loop":
        "tests/test_own_loop_script.py::test_colocated_torchrun_and_mpiexec_agree runs it (--epochs 1), in-process, "
        "and compares it with torchrun and mpiexec",
    "python -m experiments.own_loop_deviation":
        "30 s; tests/test_own_loop_script.py::test_deviation_command runs its main and checks every row",
    "python -m experiments.e1_noisy_quadratic": _TINY.format("52 s", "tests/test_experiments.py::test_e1_tiny"),
    "python -m experiments.e2_digits": _TINY.format("542 s", "tests/test_experiments.py::test_e2_tiny"),
    "python -m experiments.e3_convergence_bound": _TINY.format("83 s", "tests/test_experiments.py::test_e3_tiny"),
    "python -m experiments.e4_nested": _TINY.format("176 s", "tests/test_experiments.py::test_e4_tiny"),
    "python -m experiments.e5_slrla": _TINY.format("40 s", "tests/test_experiments.py::test_e5_tiny"),
    "python -m experiments.e6_adaptive": _TINY.format("67 s", "tests/test_experiments.py::test_e6_tiny"),
    "python -m experiments.e7_decentralized":
        "a long experiment (471 s; 54 s even with --steps 40 --seeds 1); no test runs it yet",
    "python -m experiments.e8_cluster_time": _TINY.format("1617 s", "tests/test_e8.py::test_tiny_main_writes_table_and_plot"),
    "python -m experiments.e8_cluster_time --tiny":
        "tests/test_e8.py::test_tiny_main_writes_table_and_plot runs its main with --tiny",
    "python -m experiments.e8_cluster_time --agents 16 --seeds 3 --out /tmp/e8_seeds":
        _TINY.format("71 s", "tests/test_e8.py::test_tiny_main_writes_table_and_plot"),
    "python -m experiments.e9_implicit_regularizer": _TINY.format("12 s", "tests/test_e9.py::test_tiny_main_writes_its_files"),
    "python -m launch.bench --json bench.json":
        "6.5 min of benchmarks; tests/test_bench.py::test_tiny_run_exits_0_and_writes_every_benchmark runs --tiny",
    "python -m launch.bench --tiny":
        "tests/test_bench.py::test_tiny_run_exits_0_and_writes_every_benchmark runs it (with --json)",
    "python -m launch.compare outputs/colocated outputs/torch":
        "reads outputs/torch, which the torchrun command before it writes and which is only validated here; "
        "tests/test_app.py::test_torchrun_three_processes_equals_colocated runs that job under torchrun and "
        "compares every agent with the co-located run",
    "python -m launch.bench --gpu":
        "needs CUDA GPUs; tests/test_bench.py::test_acceptance_run_without_cuda_and_its_lines runs it without one "
        "(every part skipped with its reason) and some parts with --device cpu --tiny",
    "python -m launch.bench --gpu --device cpu":
        "9 min here even with --tiny; its parts run with --tiny in tests/test_bench.py::test_acceptance_jobs_on_cpu, "
        "tests/test_bench.py::test_acceptance_parts_in_one_process_on_cpu and "
        "tests/test_bench.py::test_acceptance_run_without_cuda_and_its_lines",
    "python -m launch.bench --gpu --parts own_loop,host_syncs":
        "needs a CUDA GPU; tests/test_bench.py::test_acceptance_parts_in_one_process_on_cpu runs these parts on the CPU",
}

#: ``.venv/bin/X`` is X for these programs.
VENV, PROGRAMS = ".venv/bin/", ("python", "python3", "torchrun", "mpiexec")
COMMAND_WORDS = ("python", "torchrun", "mpiexec", "make ", "pytest", "pip ", ".venv/bin/", ". .venv")
FENCE = re.compile(r"^(\s*)```(\S*)")
DECIMAL = re.compile(r"\d+\.\d+(?:e[-+]?\d+)?")


# -- the pages' code blocks and commands -----------------------------------------------------------
@dataclass
class Block:
    page: Path
    line: int                       # 1-based, the opening fence's
    lang: str
    lines: list[str]


@dataclass
class Command:
    page: Path
    line: int
    text: str                       # as written, the comment left out
    argv: list[str]
    expected: int                   # the exit status it must give
    block: int                      # the index of its block in the page


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order."""
    found, current = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = Block(page, number, match.group(2), [])
        elif current is not None and line.strip().startswith("```"):
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"{page}:{current.line}: a code block is not closed"
    return found


def commands(page: Path) -> list[Command]:
    """The commands of the ```sh blocks of ``page`` (see the module docstring)."""
    found = []
    for index, block in enumerate(blocks(page)):
        if block.lang != "sh":
            continue
        pending = ""
        for offset, line in enumerate(block.lines, 1):
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            text, comment = split_comment(pending)
            pending = ""
            if text:
                exit_match = re.search(r"\bexit (\d+)\b", comment)
                argv = [a.removeprefix(VENV) if a.removeprefix(VENV) in PROGRAMS else a for a in shlex.split(text)]
                found.append(Command(page, block.line + offset, text, argv,
                                     int(exit_match.group(1)) if exit_match else 0, index))
    return found


def split_comment(line: str) -> tuple[str, str]:
    """``(command, comment)``: the comment starts at a ``#`` outside quotes after whitespace."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), ""


def normalized(argv: list[str]) -> str:
    return " ".join(argv)


# -- running ---------------------------------------------------------------------------------------
def entry(python_argv: list[str]) -> str:
    """The module (``-m``) or script a ``python`` argument list runs."""
    return python_argv[1] if python_argv[0] == "-m" else python_argv[0]


def shortened(python_argv: list[str], steps: int, expected: int) -> list[str]:
    """``python_argv`` kept short as the module docstring says (unchanged when it is short)."""
    name = entry(python_argv)
    if name in HYDRA_APPS and expected == 0:
        given = [int(a.split("=", 1)[1]) for a in python_argv if a.startswith("launch.steps=")]
        return python_argv + ([f"launch.steps={steps}"] if not given or given[-1] > steps else [])
    return python_argv + SHORTER.get(name, [])


def run_python(python_argv: list[str]) -> tuple[int, str]:
    """Run ``python PYTHON_ARGV`` in this process (see the module docstring); (status, output)."""
    if python_argv[0] == "-c":
        argv, run = ["-c", *python_argv[2:]], lambda: exec(compile(python_argv[1], "<string>", "exec"),
                                                           {"__name__": "__main__"})
    elif python_argv[0] == "-m":
        argv, run = [python_argv[1], *python_argv[2:]], lambda: runpy.run_module(
            python_argv[1], run_name="__main__", alter_sys=True)
    else:
        argv, run = python_argv, lambda: runpy.run_path(python_argv[0], run_name="__main__")
    out, saved, threads = io.StringIO(), sys.argv, torch.get_num_threads()
    status = 0
    try:
        sys.argv = list(argv)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                run()
            except SystemExit as done:
                status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
        torch.set_num_threads(threads)
    return status, out.getvalue()


def launched(argv: list[str]) -> tuple[str, int, list[str]] | None:
    """``(launcher, processes, python arguments)`` of a torchrun / mpiexec command, else None."""
    if argv[0] == "torchrun":
        assert argv[1] == "--nproc_per_node", f"write torchrun --nproc_per_node N ...: {argv}"
        return "torchrun", int(argv[2]), argv[3:]
    if argv[0] == "mpiexec":
        assert argv[1] == "-n" and argv[3] == "python", f"write mpiexec -n N python ...: {argv}"
        return "mpiexec", int(argv[2]), argv[4:]
    return None


def launcher_environment(launcher: str, processes: int) -> dict[str, str]:
    """What the launcher sets in rank 0's environment (what the project reads of it)."""
    if launcher == "torchrun":
        return {"WORLD_SIZE": str(processes), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
    return {"PMI_SIZE": str(processes), "PMI_RANK": "0"}


def validate_hydra(python_argv: list[str], launcher: str, processes: int, monkeypatch) -> str:
    """Compose and validate a hydra app's overrides as rank 0 of the launcher would; the process
    count against the schedule.  Returns a failure, or ''."""
    from hydra import compose, initialize_config_module

    from launch.cli.build import build_job

    overrides = python_argv[2:]
    with monkeypatch.context() as patch:
        for key, value in launcher_environment(launcher, processes).items():
            patch.setenv(key, value)
        try:
            with initialize_config_module(config_module="launch.cli.conf", version_base="1.3"):
                job = build_job(compose(config_name="config", overrides=overrides))
        except Exception as err:            # hydra's errors and the app's ValueError alike
            return f"{type(err).__name__}: {err}"
    agents, per_rank = job.schedule.num_agents, job.launch.agents_per_rank
    fits = agents % processes == 0 if per_rank is None else per_rank * processes == agents
    return "" if fits else f"{processes} processes do not fit {agents} agents (agents_per_rank={per_rank})"


class Built(Exception):
    """Raised by the stand-ins of :func:`probe_script` when the script has built its schedule."""

    def __init__(self, schedule):
        super().__init__(repr(schedule))
        self.schedule = schedule


def probe_script(python_argv: list[str], launcher: str, processes: int, monkeypatch) -> str:
    """Run a script up to its AgentOptimizer / simulate call in the launcher's environment (see
    the module docstring).  Returns a failure, or ''."""
    import launch

    names = []

    def make_communicator(name="colocated", **_):
        names.append(name)
        return SimpleNamespace(world_size=processes, rank=0, backend="stand-in", close=lambda: None)

    def agent_optimizer(optimizer, schedule, **_):
        raise Built(schedule)

    def simulate(model, loss_fn, data, schedule, **_):
        raise Built(schedule)

    with monkeypatch.context() as patch:
        for key, value in launcher_environment(launcher, processes).items():
            patch.setenv(key, value)
        patch.setattr(launch, "make_communicator", make_communicator)
        patch.setattr(launch, "AgentOptimizer", agent_optimizer)
        patch.setattr(launch, "simulate", simulate)
        try:
            status, output = run_python(python_argv)
        except Built as done:
            schedule = done.schedule
        else:
            return f"the script exited ({status}) before building its schedule: {output[-2000:]}"
    expected = {"torchrun": "torch", "mpiexec": "mpi"}[launcher]
    if any(name not in (expected, "auto") for name in names):
        return f"under {launcher} it made a communicator {names}, not {expected!r}"
    if schedule.num_agents % processes:
        return f"{processes} processes do not fit the schedule's {schedule.num_agents} agents ({schedule!r})"
    return ""


# -- the module's shared state -----------------------------------------------------------------------
@dataclass
class Outcome:
    status: int
    output: str
    as_written: bool                # run as written, not shortened nor only validated


@dataclass
class Session:
    scratch: Path
    real: dict = field(default_factory=dict)         # command text -> started process, or Outcome
    done: dict = field(default_factory=dict)         # command text -> Outcome


def scratch_directory(path: Path) -> Path:
    (path / "experiments").symlink_to(ROOT / "experiments")
    return path


def all_commands() -> list[Command]:
    return [command for page in PAGES for command in commands(page)]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The scratch directory, and the REAL commands started side by side."""
    state = Session(scratch_directory(tmp_path_factory.mktemp("docs")))
    real_dir = scratch_directory(tmp_path_factory.mktemp("docs-real"))
    for command in all_commands():
        text = normalized(command.argv)
        if text not in REAL or text in state.real:
            continue
        launcher, processes, python_argv = launched(command.argv)
        python_argv = shortened(python_argv, REAL_STEPS, command.expected)
        args = (torchrun_args(processes, python_argv) if launcher == "torchrun"
                else mpiexec_args(processes, [sys.executable, *python_argv]))
        state.real[text] = (start_command(args, cwd=real_dir), python_argv == launched(command.argv)[2])
    yield state
    for started in state.real.values():
        if not isinstance(started, Outcome):
            wait_commands([started[0]], REAL_TIMEOUT)


def check(command: Command, state: Session, monkeypatch) -> Outcome | None:
    """Run or validate ``command`` (see the module docstring); None when it is skipped."""
    text = normalized(command.argv)
    if text in SKIPPED:
        return None
    if text in state.done:
        return state.done[text]
    if text in ALIASES:
        recipe = re.search(rf"^{text.split()[1]}:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
        assert recipe.replace("$(PY)", "python") == ALIASES[text], (text, recipe)
        status, output = run_python(shortened(ALIASES[text].split()[1:], STEPS, command.expected))
        outcome = Outcome(status, output, False)
    elif text in REAL:
        started = state.real[text]
        if not isinstance(started, Outcome):
            (status, output), = wait_commands([started[0]], REAL_TIMEOUT)
            state.real[text] = Outcome(status, output, started[1])
        outcome = state.real[text]
    elif command.argv[0] == "python" and entry(command.argv[1:]) == PLANT:
        spec, module, *args = command.argv[2:]
        python_argv = shortened(["-m", module, *args], STEPS, command.expected)
        with monkeypatch.context() as patch:
            plant.install(json.loads(spec), patch.setattr)
            status, output = run_python(python_argv)
        outcome = Outcome(status, output, python_argv == ["-m", module, *args])
    elif command.argv[0] == "python" and entry(command.argv[1:]) in RUNNABLE:
        python_argv = shortened(command.argv[1:], STEPS, command.expected)
        status, output = run_python(python_argv)
        outcome = Outcome(status, output, python_argv == command.argv[1:])
    elif launched(command.argv) is not None and entry(launched(command.argv)[2]) in HYDRA_APPS + PROBED:
        launcher, processes, python_argv = launched(command.argv)
        validate = validate_hydra if entry(python_argv) in HYDRA_APPS else probe_script
        failure = validate(python_argv, launcher, processes, monkeypatch)
        assert not failure, f"{command.page.name}:{command.line}: {command.text}: {failure}"
        outcome = Outcome(command.expected, "", False)
    else:
        pytest.fail(f"{command.page.name}:{command.line}: {command.text!r} is neither run nor listed: add it to "
                    f"SKIPPED (with the reason) or teach check() to run it")
    state.done[text] = outcome
    return outcome


def adjacent(page: Path, block: Block, follower: Block) -> bool:
    """Only blank lines between ``block``'s closing fence and ``follower``'s opening one."""
    closing = block.line + len(block.lines) + 1            # 1-based
    return all(not line.strip() for line in page.read_text().splitlines()[closing:follower.line - 1])


def shown_lines_missing(shown: list[str], output: str) -> list[str]:
    """The lines of ``shown`` (a ```text block) that are not lines of ``output`` (see the module
    docstring: ``...`` stands for anything, decimal numbers may differ)."""
    actual = {DECIMAL.sub("#", part.strip()) for line in output.splitlines() for part in line.split("\r")}
    missing = []
    for line in shown:
        if not line.strip():
            continue
        pattern = re.escape(DECIMAL.sub("#", line.strip())).replace(re.escape("..."), ".*")
        if not any(re.fullmatch(pattern, candidate) for candidate in actual):
            missing.append(line)
    return missing


# -- the tests ---------------------------------------------------------------------------------------
def test_commands_are_in_sh_blocks():
    """A line that starts like a command, in a code block that is not ```sh, would escape this
    file: every page keeps its commands in ```sh blocks."""
    wrong = [f"{block.page.relative_to(ROOT)}:{block.line}: ```{block.lang}: {line.strip()}"
             for page in PAGES for block in blocks(page) if block.lang not in ("sh", "python")
             for line in block.lines if line.strip().startswith(COMMAND_WORDS)]
    for page in PAGES:
        fenced = {block.line + k for block in blocks(page) for k in range(len(block.lines) + 2)}
        wrong += [f"{page.relative_to(ROOT)}:{number}: an indented code line: {line.strip()}"
                  for number, line in enumerate(page.read_text().splitlines(), 1)
                  if number not in fenced and line.startswith("    ") and line.strip().startswith(COMMAND_WORDS)]
    assert not wrong, "\n".join(wrong)


def test_skipped_commands_are_documented_and_name_tests_that_exist():
    """Every SKIPPED entry is a command of some page (none stale), and every test it names exists."""
    texts = {normalized(c.argv) for c in all_commands()}
    assert not set(SKIPPED) - texts, f"SKIPPED lists commands no page has: {sorted(set(SKIPPED) - texts)}"
    assert not (set(REAL) | set(ALIASES)) - texts
    for reason in SKIPPED.values():
        for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", reason):
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (path, name)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_commands_run(page, session, monkeypatch):
    """Each command of the page, in order (see the module docstring), then each ```text block that
    follows a ```sh block against what that block's commands printed."""
    monkeypatch.chdir(session.scratch)
    outcomes: dict[int, list[Outcome | None]] = {}
    for command in commands(page):
        outcome = check(command, session, monkeypatch)
        if outcome is not None:
            assert outcome.status == command.expected, (
                f"{page.name}:{command.line}: {command.text}: exit {outcome.status}, expected {command.expected}\n"
                f"{outcome.output[-4000:]}")
        outcomes.setdefault(command.block, []).append(outcome)
    page_blocks = blocks(page)
    for index, ran in outcomes.items():
        follower = page_blocks[index + 1] if index + 1 < len(page_blocks) else None
        if follower is None or follower.lang != "text" or not all(o is not None and o.as_written for o in ran):
            continue
        if not adjacent(page, page_blocks[index], follower):
            continue        # prose between them: not this block's output
        missing = shown_lines_missing(follower.lines, "\n".join(o.output for o in ran))
        assert not missing, (f"{page.name}:{follower.line}: lines not printed by the commands above them:\n"
                             + "\n".join(missing) + "\n--- printed:\n" + "\n".join(o.output for o in ran)[-4000:])
