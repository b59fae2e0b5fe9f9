"""A checkpoint's manifest (``latest.json``) and the checksums of its files.

The manifest is the JSON object that commits a checkpoint (:mod:`launch.engine.store.checkpoint`), in
format :data:`FORMAT`:

``format``
    2.
``t``
    the iteration of the checkpoint, an integer >= 0; every file of the checkpoint holds it too,
    and :func:`read_verified` callers cross-check it.
``folder``
    ``step-{t:08d}``, the checkpoint's folder beside the manifest.
``files``
    ``{file name: sha256 hex digest}`` of every file of the checkpoint (``agent-i.pt``,
    ``rank-r.pt``, ``outer.pt``).
``num_agents``, ``world_size``, ``agents_per_rank``
    the layout that wrote it (integers >= 1).
``run``
    the engine's record of what defines the trajectory (:mod:`launch.engine.store.run_record`), a
    mapping of dotted keys.
``config``
    the caller's record (the command line's resolved configuration), a mapping, or null.

:func:`read_manifest` validates all of it: a file that is not this object (not JSON, a list, a
directory, a missing or mistyped key, a folder that does not match t, a format of another version)
is one ``ValueError`` naming the file and what is wrong.  :func:`read_verified` reads a file of
the checkpoint and refuses it, naming it, when its sha256 is not the manifest's (flipped bytes,
files swapped or copied from another checkpoint, a manifest pointed at another folder).

Example:
    >>> sha256_hex(b"abc")[:16]
    'ba7816bf8f01cfea'
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from topology.checks import is_integer

MANIFEST = "latest.json"
FORMAT = 2

_FOLDER = re.compile(r"step-\d{8,}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    """The sha256 digest of ``data``, as 64 lower-case hex digits."""
    return hashlib.sha256(data).hexdigest()


def step_folder(t: int) -> str:
    """The folder name of the checkpoint of iteration ``t``: ``step-{t:08d}``."""
    return f"step-{t:08d}"


def read_manifest(path: Path) -> dict | None:
    """The validated manifest at ``path``, or None when there is no file there (module docstring;
    ``ValueError`` naming ``path`` when it is not a manifest of format :data:`FORMAT`)."""
    path = Path(path)
    if not path.exists():
        return None

    def malformed(what: str) -> ValueError:
        return ValueError(f"checkpoint manifest {path} is malformed: {what}; it must be the JSON object "
                          f"Checkpointer.save writes (format {FORMAT}: t, folder, files, ...)")

    if path.is_dir():
        raise malformed("it is a directory, not a file")
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as err:
        raise ValueError(f"checkpoint manifest {path} cannot be read: {err}") from None
    except ValueError as err:   # JSONDecodeError, UnicodeDecodeError
        raise malformed(f"not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise malformed(f"it holds a {type(manifest).__name__}, not an object")
    version = manifest.get("format")
    if version != FORMAT:
        if version == 1:
            raise ValueError(f"checkpoint manifest {path} is of format 1, written by an older version without "
                             f"checksums: its files cannot be verified; start the run afresh (or resume it with "
                             f"the version that wrote it)")
        raise malformed(f"format {version!r}, this version reads format {FORMAT}")
    for key, check, expected in (
        ("t", lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
        ("folder", lambda v: isinstance(v, str) and _FOLDER.fullmatch(v), "step-NNNNNNNN"),
        ("files", lambda v: isinstance(v, dict) and v and all(
            isinstance(k, str) and "/" not in k and "\\" not in k and isinstance(d, str) and _DIGEST.fullmatch(d)
            for k, d in v.items()), "{file name: sha256 hex digest}"),
        ("num_agents", lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
        ("world_size", lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
        ("agents_per_rank", lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
        ("run", lambda v: isinstance(v, dict), "a mapping"),
        ("config", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    ):
        if key not in manifest:
            raise malformed(f"no {key!r}")
        if not check(manifest[key]):
            raise malformed(f"{key!r} is {manifest[key]!r}, not {expected}")
    if manifest["folder"] != step_folder(manifest["t"]):
        raise malformed(f"folder {manifest['folder']!r} is not the folder of t={manifest['t']} "
                        f"({step_folder(manifest['t'])!r})")
    return manifest


def read_verified(path: Path, manifest: dict, manifest_path: Path) -> bytes:
    """The bytes of the checkpoint file ``path``, after checking them against the sha256 that
    ``manifest`` records for its name (``ValueError`` naming the file otherwise)."""
    digest = manifest["files"].get(path.name)
    if digest is None:
        raise ValueError(f"checkpoint file {path.name} is not listed in {manifest_path} (a checkpoint of "
                         f"another layout or an edited manifest)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"checkpoint file {path} cannot be read: {err}") from None
    if sha256_hex(data) != digest:
        raise ValueError(f"checkpoint file {path} does not match its sha256 in {manifest_path}: corrupted, "
                         f"replaced by another file, or the manifest was edited; refused")
    return data
