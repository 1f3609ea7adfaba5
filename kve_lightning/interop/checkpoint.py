"""Reading `kve fit` checkpoints: weights-only, with one-line errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def read_checkpoint(ckpt: str | Path) -> dict:
    """A `kve fit` checkpoint, read with ``torch.load(weights_only=True)`` (no arbitrary unpickling); a
    ``FileNotFoundError`` or ``ValueError`` naming the file if it is missing, unreadable, not a kve-lightning
    checkpoint (no ``denoiser.unet.*`` weights in ``state_dict`` or no ``hyper_parameters``) or holds non-finite
    weights."""
    path = Path(ckpt)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated files, pickles of objects outside the weights-only allow-list
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        reason = f"it would unpickle {blocked[1]}, which weights-only loading refuses" if blocked else (
            f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: {reason}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict) or not any(
            k.startswith("denoiser.unet.") for k in state):
        raise ValueError(f"{str(path)!r} is not a kve-lightning checkpoint: it has no denoiser.unet.* weights "
                         f"in state_dict or no hyper_parameters")
    check_finite(state, str(path))
    return checkpoint


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """A ``ValueError`` naming the first tensor with a NaN or infinite value (such weights sample black images)."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            raise ValueError(f"{where!r} holds non-finite weights in {name}: refusing to use them")
