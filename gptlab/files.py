"""Atomic file writes (a killed process leaves the old file or the new one, never half of one), and JSON files read
with one clear error."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove what a killed process left while it wrote beside `parent/...`: `prefix` + its PID, for PIDs that no
    longer run (a running writer's files stay)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path` (a killed earlier writer's temporary file
    is removed first)."""
    path = Path(path)
    remove_stale(path.parent, f".{path.name}.tmp-")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_json_object(path: str | os.PathLike[str], missing_ok: bool = True) -> dict[str, Any]:
    """A JSON file that holds an object; {} for a missing file when `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise GptlabError(f"{path} must hold a JSON object")
    return data


def check_outside(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """An output may not be one of a command's inputs, nor lie inside one: the inputs stay as they are."""
    o = Path(out).resolve()
    for src in inputs:
        s = Path(src).resolve()
        if o == s or s in o.parents:
            raise GptlabError(f"{out} is {src} or inside it; write the output to a folder of its own (nothing was "
                              "written)")


def check_new_folder(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """`out` must not exist, or be an empty folder, and may not lie inside any of `inputs`."""
    out = Path(out)
    check_outside(out, inputs)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} is a file; the output is a folder: choose a new one (nothing was written)")
    if out.exists() and any(out.iterdir()):
        raise GptlabError(f"{out} already exists and is not empty; choose a new folder (nothing was written)")
    return out


def write_folder(out: str | os.PathLike[str], write: Callable[[Path], None],
                 inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Build a folder in a staging folder beside `out`, then rename it into place: `out` appears whole or not at
    all (`check_new_folder` first). What a killed earlier run staged for the same `out` is removed."""
    out = check_new_folder(out, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.staging-"
    remove_stale(out.parent, prefix)
    staging = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        for f in staging.rglob("*"):  # on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def recover_replaced(out: str | os.PathLike[str]) -> None:
    """Finish what a `replace_folder` killed between its two renames left: the old folder, kept at `.OUT.old-PID`,
    goes back to `out` when `out` is missing, and is removed when `out` is there."""
    out = Path(out)
    prefix = f".{out.name}.old-"
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            if out.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(out)


def replace_folder(out: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Build a new version of the existing folder `out` in a staging folder beside it, then swap the two by two
    renames (`out` to `.OUT.old-PID`, the staging folder to `out`) and remove the old one: a reader sees the old
    folder or the new one, whole, and a kill between the renames is undone by the next `recover_replaced`."""
    out = Path(out)
    recover_replaced(out)
    if not out.is_dir():
        raise GptlabError(f"{out} is not a folder (nothing was written)")
    prefix = f".{out.name}.staging-"
    remove_stale(out.parent, prefix)
    staging = out.parent / f"{prefix}{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
