"""Reading `kve fit` checkpoints: weights-only, with one-line errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kve_lightning.module import KarrasVeModule


def read_checkpoint(ckpt: str | Path) -> dict:
    """A `kve fit` checkpoint, read with ``torch.load(weights_only=True)`` (no arbitrary unpickling); a
    ``FileNotFoundError`` or ``ValueError`` naming the file if it is missing, unreadable or not a kve-lightning
    checkpoint (no ``denoiser.unet.*`` weights in ``state_dict`` or no ``hyper_parameters``)."""
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
    return checkpoint


def load_checkpoint_module(ckpt: str | Path) -> KarrasVeModule:
    """The ``KarrasVeModule`` a checkpoint holds (``read_checkpoint``), in eval mode; a ``ValueError`` naming the
    file if its hyper-parameters and weights do not make one."""
    path = Path(ckpt)
    checkpoint = read_checkpoint(path)
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    try:
        module = KarrasVeModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
        module.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:  # hparams or weights of another model version
        raise ValueError(f"{str(path)!r} does not match KarrasVeModule: {err}") from None
    return module.eval()
