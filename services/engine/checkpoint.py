"""Checkpoints: `model.safetensors` + `config.json` (+ optional `tokenizer.json`), and the model
fingerprint every KV transfer carries so a decode worker never mixes caches of two models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from services.engine.config import PRESETS, ModelConfig, preset
from services.engine.errors import CheckpointError
from services.engine.model import CLSAModel
from services.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PRESET_SEED = 0


def fingerprint(model: CLSAModel) -> str:
    """sha256 over the config and every weight (name, dtype, shape, bytes), hex, 16 digits."""
    return _fingerprint(model.cfg, model.state_dict())


def _fingerprint(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(cfg.to_json().encode())
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(model: CLSAModel, directory: str | Path, dtype: torch.dtype | None = None) -> str:
    """Write weights (converted to `dtype` when given: bf16 halves a shipped checkpoint) and config;
    returns the fingerprint of the weights as written (also stored in their metadata)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    fp = _fingerprint(model.cfg, tensors)
    save_file(tensors, str(out / WEIGHTS), metadata={"fingerprint": fp, "format": "clsa-serve/1"})
    (out / CONFIG).write_text(model.cfg.to_json() + "\n")
    return fp


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> CLSAModel:
    """Load a checkpoint; raises CheckpointError when a file is missing, the config is invalid,
    the weights do not fit the config, or the weights do not match their recorded fingerprint."""
    src = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (src / name).is_file():
            raise CheckpointError(f"{src}: no {name} (is this a clsa checkpoint directory?)")
    try:
        cfg = ModelConfig.from_dict(json.loads((src / CONFIG).read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{src / CONFIG}: {e}") from e
    try:
        tensors = load_file(str(src / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{src / WEIGHTS}: unreadable: {e}") from e
    model = CLSAModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{src}: weight {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}: checkpoint of another config"
            )
    model.load_state_dict(tensors)
    recorded = _recorded_fingerprint(src / WEIGHTS)
    model.fingerprint = _fingerprint(cfg, tensors)  # of the weights as stored, whatever dtype they run in
    if recorded is not None and recorded != model.fingerprint:
        raise CheckpointError(f"{src}: weights do not match their recorded fingerprint {recorded}")
    return model.to(device=device, dtype=dtype).eval()


def _recorded_fingerprint(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("fingerprint")


def random_model(name: str, seed: int = PRESET_SEED, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> CLSAModel:
    """A preset with deterministic random weights: the same values (drawn in fp32 on the CPU) on
    every device, rounded to `dtype`."""
    cfg = preset(name)
    # Built on the meta device and materialised in the target dtype: a 4B model never exists in fp32.
    with torch.device("meta"):
        model = CLSAModel(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_weights(seed)
    # Hashing billions of random weights says no more than the recipe that made them.
    recipe = f"{cfg.to_json()}|preset={name}|seed={seed}"
    model.fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return model.eval()


def load_model(spec: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[CLSAModel, Path | None]:
    """A preset name (random weights, fixed seed) or a checkpoint directory. Returns the model and
    the directory it came from (None for a preset)."""
    if spec in PRESETS:
        return random_model(spec, device=device, dtype=dtype), None
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    return load_checkpoint(path, device=device, dtype=dtype), path


def load_tokenizer_for(spec: str) -> Tokenizer:
    """The tokenizer `load_model(spec)` would come with, without loading any weights (what a
    gateway needs to count prompt tokens at the edge)."""
    if spec in PRESETS:
        return ByteTokenizer()
    path = Path(spec)
    try:
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{spec!r}: no readable {CONFIG} ({e})") from e
    return load_tokenizer(path, cfg.eos_token_id)
