"""The documentation against the code it describes: docs/cli.md's tables against the configuration
files and the factories, docs/index.md against the pages, every relative link against its target,
and the README's length.

- The ``launch`` table of docs/cli.md has one row per key of ``launch/cli/conf/launch/*.yaml``,
  whose cells are each launch's default as the yaml file has it (``-`` where the launch does not
  take the key).
- The ``agents``, ``topology`` and ``problem`` tables have one row per yaml file of the group,
  marked ``(default)`` where ``config.yaml`` says so; every key of the file is in its row as
  ``key=value`` (its default, written as an override; a key whose value is a list of lists or of
  mappings: by its name), and so is every keyword option of the factory (the optimizer's, the
  schedule's, the problem's; the run's ``seed``, ``dtype``, ``device``, ``num_workers`` aside).
- docs/index.md links every page of docs/ once, each on a line of its own; every relative link of
  README.md and docs/*.md names a file that exists, and an anchor that one of its headings makes.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from launch.cli.registry import SCHEDULES, problems

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "launch" / "cli" / "conf"
CLI = ROOT / "docs" / "cli.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHES = ("colocated", "serial", "torch", "mpi")
#: Factory parameters the command line fills from the run (docs/cli.md says so once).
RUN_VALUES = {"seed", "dtype", "device", "num_workers"}
README_MAX_LINES = 400


def override(value) -> str | None:
    """``value`` as an override writes it (``[5,2]``, ``{2:2,6:4}``, ``null``); None for a list of
    lists or of mappings (documented by name only)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        items = [override(v) for v in value]
        return None if any(isinstance(v, (list, dict)) for v in value) else "[" + ",".join(items) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override(v)}" for k, v in value.items()) + "}"
    return str(value)


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of ``text``."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def rows(body: str) -> dict[str, list[str]]:
    """The table rows of ``body`` keyed by the first backticked word of their first cell."""
    found = {}
    for line in body.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        name = re.match(r"`([^`]+)`", cells[0]) if cells else None
        if name:
            found[name.group(1)] = cells
    return found


def flat(options: dict, prefix: str = "") -> dict:
    """``{"optimizer": {"lr": 1}}`` -> ``{"optimizer.lr": 1}``; lists and other values as they are."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict) and key == "optimizer":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def group_files(group: str) -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF / group).glob("*.yaml"))}


def defaults() -> dict[str, str]:
    config = yaml.safe_load((CONF / "config.yaml").read_text())
    return {k: v for entry in config["defaults"] if isinstance(entry, dict) for k, v in entry.items()}


def mentioned(row: list[str], name: str) -> bool:
    """``name`` is a word inside some backticked span of the row."""
    return any(re.search(rf"(?<!\w){re.escape(name)}\b", span) for span in re.findall(r"`([^`]*)`", " ".join(row)))


def test_launch_table_gives_every_key_and_its_default_per_launch():
    files = {name: group_files("launch")[name] for name in LAUNCHES}
    table = rows(section(CLI.read_text(), "The `launch` group"))
    keys = {key for options in files.values() for key in options}
    assert set(table) == keys, f"missing: {sorted(keys - set(table))}, not a key: {sorted(set(table) - keys)}"
    for key, cells in table.items():
        for launch, cell in zip(LAUNCHES, cells[1:5]):
            want = f"`{override(files[launch][key])}`" if key in files[launch] else "-"
            assert cell == want, f"launch.{key} with launch={launch}: docs/cli.md says {cell}, the yaml file {want}"


@pytest.mark.parametrize("group, factories", [
    ("agents", None),
    ("topology", lambda name: SCHEDULES[name]),
    ("problem", lambda name: problems()[name]),
])
def test_group_table_gives_every_file_key_and_option(group, factories):
    files = group_files(group)
    table = rows(section(CLI.read_text(), f"The `{group}` group"))
    assert set(table) == set(files), f"{group}: rows {sorted(table)}, files {sorted(files)}"
    for name, options in files.items():
        row = table[name]
        assert ("(default)" in row[0]) == (defaults()[group] == name), (group, name, row[0])
        for key, value in flat(options).items():
            if key == "name" and group != "agents":
                continue
            written = override(value)
            want = f"`{key}={written}`" if written is not None else None
            assert (want in " ".join(row)) if want else mentioned(row, key), f"{group}={name}: {key} ({want or key})"
        if factories is not None:
            for option in inspect.signature(factories(options.get("name", name))).parameters:
                if option not in RUN_VALUES | {"self"}:
                    assert mentioned(row, option), f"{group}={name}: the factory's option {option} is not in docs/cli.md"


def test_index_links_every_page_once_on_a_line_of_its_own():
    index = ROOT / "docs" / "index.md"
    lines = index.read_text().splitlines()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page == index:
            continue
        linking = [line for line in lines if f"]({page.name})" in line]
        assert len(linking) == 1, f"docs/index.md must link {page.name} on one line; found {linking}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_name_files_and_anchors_that_exist(page):
    text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link to {target}: {file.name} has no heading #{anchor}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the front page keeps at most {README_MAX_LINES}"
