"""Checkpoints of a training run, committed atomically as a whole.

A checkpoint is several files (weights, tokenizer, config, optimizer state) that must agree with each other. They are
written into `OUT/.staging/`, flushed, and marked complete; only then are they renamed into `OUT/` one by one. A run
killed before the mark leaves the previous checkpoint untouched (the staging folder is dropped); a run killed during
the renames is finished by `recover` on the next start. Either way `OUT/` holds one whole checkpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import GptlabError

STAGING = ".staging"
COMPLETE = "COMPLETE"
TRAIN_STATE = "train_state.pt"


def recover(out: Path) -> None:
    """Finish a commit that a killed run began, or drop one it never marked complete."""
    staging = out / STAGING
    if not staging.exists():
        return
    if (staging / COMPLETE).exists():
        _commit(out)
    else:
        shutil.rmtree(staging)


def save(out: Path, write: Callable[[Path], None]) -> None:
    """Write a checkpoint's files with `write(folder)`, then commit them into `out` all or nothing."""
    recover(out)
    staging = out / STAGING
    staging.mkdir(parents=True)
    try:
        write(staging)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (staging / COMPLETE).touch()
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise GptlabError(f"could not save the checkpoint in {out}: {e.strerror or e}; the previous checkpoint "
                          "there is intact") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _commit(out)


def _commit(out: Path) -> None:
    staging = out / STAGING
    for f in sorted(staging.iterdir()):
        if f.name != COMPLETE:
            os.replace(f, out / f.name)
    (staging / COMPLETE).unlink()
    staging.rmdir()


def load_train_state(out: Path) -> dict[str, Any]:
    path = out / TRAIN_STATE
    if not path.is_file():
        raise GptlabError(f"{out} holds no resumable run (no {TRAIN_STATE}); start one without --resume")
    saved = load_plain(path)
    missing = [k for k in ("step", "optimizer", "rng") if not isinstance(saved, dict) or k not in saved]
    if missing or not isinstance(saved["step"], int) or not isinstance(saved["rng"], dict) or \
            "cpu" not in saved["rng"]:
        lacks = ", ".join(missing) or "a valid step or rng"
        raise GptlabError(f"{path} is not a gptlab training state (it lacks {lacks}); the run cannot resume from it")
    return saved


def load_plain(path: Path) -> Any:
    """A torch file of tensors and plain values only (`weights_only=True`): arbitrary objects are never unpickled,
    and a file that holds them is one line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GptlabError(f"cannot read {path}: it holds objects other than tensors and plain values, which gptlab "
                          "never unpickles") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"cannot read {path}: {first}") from None
