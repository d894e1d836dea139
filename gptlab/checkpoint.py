"""The checkpoint folder: `model.safetensors`, `config.json`, the tokenizer's files, and nothing executable.

Loading validates before it builds: a missing file, a config that is not ours, or weights whose shapes disagree with
the config each give one clear `GptlabError`, never a traceback from deep inside `load_state_dict`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptlab import __version__
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_text
from gptlab.model import GPT
from gptlab.quant.formats import QuantSpec, quantize
from gptlab.quant.layers import quantizable, quantize_model
from gptlab.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def model_state(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights to store (`state`, or the model's own): a tied head is the embedding, so it is stored once
    (safetensors refuses aliases)."""
    state = dict(model.state_dict() if state is None else state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(out: str | os.PathLike[str], model: GPT, tokenizer: Tokenizer,
                    state: dict[str, torch.Tensor] | None = None, source: str | None = None) -> Path:
    """Write the files of a checkpoint folder, each atomically: weights, config, and the tokenizer with its special
    tokens, stop ids and chat template (`Tokenizer.save_folder`); `state` replaces the model's own weights (a full
    state gathered from sharded training); `source` records where an imported model came from (a hub id or a
    folder), which adapters exported from it name as their base."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model_state(model, state)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    tokenizer.save_folder(out)
    config = {"gptlab_version": __version__, "model": model.config.to_dict()}
    if model.quantization is not None:
        config["quantization"] = model.quantization.to_dict()
    if source:
        config["source"] = source
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def check_folder(path: str | os.PathLike[str], required: tuple[str, ...] = (CONFIG, WEIGHTS, TOKENIZER)) -> Path:
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise GptlabError(f"{path} is not a folder; a checkpoint is a folder with {', '.join(required)}")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise GptlabError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


def read_folders(path: str | os.PathLike[str]) -> list[Path]:
    """The folders a command that reads checkpoint `path` reads: the folder, and a fine-tuned run's base. Its
    output may lie inside none of them."""
    from gptlab.files import read_json_object

    path = Path(path)
    base = read_json_object(path / "adapter_config.json").get("base") if path.is_dir() else None
    return [path, Path(base)] if isinstance(base, str) else [path]


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file one at a time, each read into memory of its own.

    Unlike a memory map, nothing stays tied to the file: a caller that converts each tensor as it comes (quantizing
    while loading) holds only what it keeps, and the memory a process uses is the memory its tensors take.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise GptlabError(f"cannot read {path}: not a safetensors file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise GptlabError(f"cannot read {path}: its header is not a mapping of tensor names")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (start, end) = _tensor_entry(info, name, path)
                # the header's own numbers are checked against the file before anything is allocated
                nbytes = math.prod(shape) * dtype.itemsize
                if not 0 <= start <= end <= size - 8 - n or nbytes != end - start:
                    raise GptlabError(f"cannot read {path}: tensor {name} ({shape}, {nbytes:,} bytes) does not fit "
                                      f"its offsets {start}..{end} in a file of {size:,} bytes")
                tensor = torch.empty(shape, dtype=dtype)
                raw = tensor.reshape(-1).view(torch.uint8)  # the tensor's own bytes
                f.seek(8 + n + start)
                if raw.numel() and f.readinto(memoryview(raw.numpy())) != raw.numel():
                    raise GptlabError(f"cannot read {path}: the file ends inside tensor {name}")
                yield name, tensor
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptlabError(f"cannot read {path}: {e}") from None


def _tensor_entry(info: Any, name: str, path: Any) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """(dtype, shape, offsets) of one header entry, each of the type and sign the format says."""
    ok = isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES and isinstance(info.get("shape"), list) \
        and all(isinstance(d, int) and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list) \
        and len(info["data_offsets"]) == 2 and all(isinstance(o, int) for o in info["data_offsets"])
    if not ok:
        raise GptlabError(f"cannot read {path}: the header entry of {name} is not a dtype, a shape of sizes >= 0 "
                          f"and two offsets: {str(info)[:120]}")
    return SAFETENSORS_DTYPES[info["dtype"]], info["shape"], tuple(info["data_offsets"])


def available_memory() -> int | None:
    """Bytes this machine can still give a process (MemAvailable + free swap), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """Refuse, in one line, what could not be held in memory, before any of it is allocated."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise GptlabError(f"{what} needs {nbytes / 2**30:.1f} GiB of memory; this machine has {free / 2**30:.1f} "
                          "GiB available")


def check_weights_file(config: ModelConfig, weights: Path) -> None:
    """A config whose model the weights file cannot hold (n_layer 10^9 in a hand-edited config.json), or a file that
    cannot be read into memory: one line, before reading."""
    size = weights.stat().st_size
    if config.approx_params() / 2 > size * 1.01 + 2**20:  # even at 4 bits a weight
        raise GptlabError(f"{weights.parent / CONFIG} describes about {config.approx_params():,} parameters, more "
                          f"than {weights} ({size:,} bytes) holds")
    check_fits(size, f"reading {weights}")


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    return dict(read_tensors(path))


def read_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` of tensors (older Hugging Face and peft folders), loaded with `weights_only=True`: plain tensors only,
    never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GptlabError(f"cannot read {path} as plain weights: {str(e).splitlines()[0] if str(e) else e!r}") from None


def load_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str = WEIGHTS,
               quantization: QuantSpec | None = None) -> GPT:
    """Build the model on the meta device and adopt `state` as its storage: no random init, no second copy."""
    model = build_checked(config, state, source, quantization)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def build_checked(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                  quantization: QuantSpec | None = None) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    if quantization is not None:
        quantize_model(model, quantization)  # the quantized layout: codes and scales in place of float weights
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        extra = len(missing) + len(unexpected) - 1
        raise GptlabError(f"{source} does not match the model config: {what}" + (f" (+{extra} more)" if extra else ""))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape) or \
                (state[k].dtype != v.dtype and not (state[k].is_floating_point() and v.is_floating_point())):
            raise GptlabError(f"{source} does not match the model config: {k} has shape {tuple(state[k].shape)} "
                              f"({state[k].dtype}), the config needs {tuple(v.shape)} ({v.dtype})")
    return model


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, quantize: QuantSpec | None = None) -> tuple[GPT, Tokenizer]:
    """Model (in eval mode) and tokenizer of a checkpoint folder; a fine-tuned folder of a small method gives its
    base with the method attached (LoRA merged in). `quantize` quantizes a float checkpoint's Linear layers as they
    are read, so that peak memory is the quantized model plus one float matrix (QLoRA of a model that does not fit
    in memory in float)."""
    if (Path(path) / "adapter_config.json").is_file():
        from gptlab.peft.base import load_adapter_checkpoint

        model, tokenizer = load_adapter_checkpoint(Path(path))
        return model.to(device=device, dtype=dtype), tokenizer
    path = check_folder(path)
    config = ModelConfig.from_json(str(path / CONFIG))
    quantization = read_quantization(path)
    tokenizer = Tokenizer.from_folder(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise GptlabError(f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{config.vocab_size}")
    check_weights_file(config, path / WEIGHTS)
    if quantize is not None and quantization is None:
        model = load_quantizing(config, path / WEIGHTS, quantize)
    else:
        model = load_model(config, read_weights(path / WEIGHTS), str(path / WEIGHTS), quantization)
    return model.to(device=device, dtype=dtype), tokenizer


def load_quantizing(config: ModelConfig, weights: Path, spec: QuantSpec) -> GPT:
    """A float checkpoint loaded into the quantized layout one tensor at a time."""
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"cannot read {weights}: {e}") from None
    # the float layout first: one clear line for a mismatch
    build_checked(config, {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, str(weights))
    with torch.device("meta"):
        model = GPT(config)
    targets = {name for _, _, name, _ in quantizable(model)}
    quantize_model(model, spec)
    state: dict[str, torch.Tensor] = {}
    for k, tensor in read_tensors(weights):
        layer = k.removesuffix(".weight")
        if layer in targets and k.endswith(".weight"):
            state.update({f"{layer}.{part}": v for part, v in quantize(tensor, spec).items()})
        else:
            state[k] = tensor
        del tensor
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def read_quantization(path: Path) -> QuantSpec | None:
    """The quantization a checkpoint folder's weights are stored in, or None for float weights."""
    data = json.loads((path / CONFIG).read_text())
    return QuantSpec.from_dict(data["quantization"]) if data.get("quantization") else None
