"""A `kve fit` checkpoint -> a diffusers folder: ``model_index.json``, ``unet/`` (safetensors), ``scheduler/``.

The UNet is the checkpoint's ``state_dict`` (the EMA weights when trained with EMA); the scheduler config holds the
sampler settings of its hyper-parameters. The folder is written beside the target and renamed into place, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from kve_lightning.module import KarrasVeModule
from kve_lightning.pipeline import KarrasVeLightningPipeline, KarrasVeLightningScheduler


def read_checkpoint(ckpt: str | Path) -> dict:
    """A `kve fit` checkpoint, read with ``torch.load(weights_only=True)`` (no arbitrary unpickling); a
    ``FileNotFoundError`` or ``ValueError`` naming the file if it is missing, unreadable or not a kve-lightning
    checkpoint (no ``denoiser.unet.*`` weights in ``state_dict`` or no ``hyper_parameters``)."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated files, pickles of objects outside the weights-only allow-list
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        reason = f"it would unpickle {blocked[1]}, which weights-only loading refuses" if blocked else err
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: {reason}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict) or not any(
            k.startswith("denoiser.unet.") for k in state):
        raise ValueError(f"{str(path)!r} is not a kve-lightning checkpoint: it has no denoiser.unet.* weights "
                         f"in state_dict or no hyper_parameters")
    return checkpoint


def load_checkpoint_module(ckpt: str | Path) -> KarrasVeModule:
    """The ``KarrasVeModule`` a checkpoint holds (``read_checkpoint``); a ``ValueError`` naming the file if its
    hyper-parameters and weights do not make one."""
    path = Path(ckpt)
    checkpoint = read_checkpoint(path)
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    try:
        module = KarrasVeModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
        module.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:  # hparams or weights of another model version
        raise ValueError(f"{str(path)!r} does not match KarrasVeModule: {err}") from None
    return module.eval()


def module_pipeline(module: KarrasVeModule) -> KarrasVeLightningPipeline:
    """The pipeline of a module: its UNet and its sampler settings (``KarrasVeModule.sampler_settings``)."""
    return KarrasVeLightningPipeline(unet=module.denoiser.unet,
                                     scheduler=KarrasVeLightningScheduler(**module.sampler_settings))


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` may be written: missing, an empty folder, or a non-empty folder with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint's EMA weights and sampler settings as a diffusers folder ``out_dir``; return it.

    Checks everything before writing, writes to a temporary folder beside ``out_dir``, then renames it into place
    (an existing ``out_dir`` is replaced only with ``overwrite``)."""
    module = load_checkpoint_module(ckpt)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        module_pipeline(module).save_pretrained(tmp, safe_serialization=True)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted once ``src`` is in place."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
