"""Loading weights safely: safetensors, or a .pt/.pth state dict with torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a loadable weights file (safetensors or a weights-only .pt): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def load_state(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and ".adapter." not in k]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights in {path} do not match the model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    bad_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if bad_shape:
        k = bad_shape[0]
        raise ValueError(f"weights in {path}: {k} has shape {list(state[k].shape)}, model expects {list(own[k].shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
