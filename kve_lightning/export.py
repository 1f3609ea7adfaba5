"""A `kve fit` checkpoint -> a diffusers folder: ``model_index.json``, ``unet/`` (safetensors), ``scheduler/``.

The UNet is the checkpoint's ``state_dict`` (the EMA weights when trained with EMA); the scheduler config holds the
sampler settings of its hyper-parameters. The folder is written beside the target and renamed into place, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kve_lightning.checkpoint import load_checkpoint_module
from kve_lightning.module import KarrasVeModule
from kve_lightning.pipeline import KarrasVeLightningPipeline, KarrasVeLightningScheduler


def module_pipeline(module: KarrasVeModule, **overrides: Any) -> KarrasVeLightningPipeline:
    """The pipeline of a module: its UNet and its sampler settings with ``overrides`` (``SamplerSettings`` fields)."""
    settings = module.sampler.replace(**overrides)
    return KarrasVeLightningPipeline(unet=module.denoiser.unet,
                                     scheduler=KarrasVeLightningScheduler(**settings.to_dict()))


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` may be written: missing, an empty folder, or a non-empty folder with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False, **overrides: Any) -> Path:
    """Write the checkpoint's EMA weights and sampler settings (with ``overrides`` of ``SamplerSettings`` fields)
    as a diffusers folder ``out_dir``; return it.

    Checks everything before writing, writes to a temporary folder beside ``out_dir``, then renames it into place
    (an existing ``out_dir`` is replaced only with ``overwrite``)."""
    pipeline = module_pipeline(load_checkpoint_module(ckpt), **overrides)
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
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
