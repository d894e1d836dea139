"""What a run reports: `metrics.jsonl` (one JSON object per logged step and per evaluation), `loss.png`, optional
TensorBoard, and model FLOPs utilisation against the device's peak."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write

# Dense bf16 peak FLOP/s by device name (no sparsity). A device not listed gets no MFU: "unknown".
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention's 12 * layers * width * context (PaLM, appendix B)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a kill or a full disk in the middle of a write) is dropped
    with a warning, anything else unreadable is one line."""
    import sys

    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
            if n == len(lines):
                print(f"gptlab: warning: dropped the torn last line of {path} ({len(line)} bytes)", file=sys.stderr)
                break
            raise GptlabError(f"{path} line {n} is not a metrics record ({e}); move the file away to resume without "
                              "its history") from None
        records.append(record)
    return records


ACCURACY = "rewards/accuracies"


class Metrics:
    """Appends records to metrics.jsonl and redraws loss.png; written only by the process that logs (rank 0)."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        self.png = out / "loss.png"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            # keep what the checkpoint saw; steps logged after it will be logged again
            self.records = [r for r in read_records(self.path) if r["step"] <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n"
                                                                              for r in self.records)))
        elif self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GptlabError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, **record: Any) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        preference = any(ACCURACY in r or f"val_{ACCURACY}" in r for r in self.records)
        fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), squeeze=False)
        ax = axes[0][0]
        if train:
            ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss" if preference else "loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        if preference:  # DPO/ORPO: how often the chosen completion wins, and by how much (TRL's rewards)
            acc = axes[0][1]
            for key, label, style in ((ACCURACY, "train accuracy", "-"), (f"val_{ACCURACY}", "val accuracy", "o-"),
                                      ("rewards/margins", "train margin", "--"),
                                      ("val_rewards/margins", "val margin", "s--")):
                points = [(r["step"], r[key]) for r in self.records if key in r]
                if points:
                    acc.plot(*zip(*points), style, label=label, lw=1)
            acc.axhline(0.5, color="grey", lw=0.5)
            acc.set_xlabel("step")
            acc.set_ylabel("reward accuracy / margin")
            acc.grid(alpha=0.3)
            acc.legend()
        fig.tight_layout()
        atomic_write(self.png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
