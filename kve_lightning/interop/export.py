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

from kve_lightning.storage import umask_mode
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.interop.pipeline import KarrasVeLightningPipeline, KarrasVeLightningScheduler


def module_pipeline(module: KarrasVeModule, **overrides: Any) -> KarrasVeLightningPipeline:
    """The pipeline of a module: its UNet, its training noise range and its sampler settings with ``overrides``
    (``SamplerSettings`` fields; refused outside the training range)."""
    settings = module.sampler.replace(**overrides)
    settings.check_trained_range(*module.train_sigmas)
    scheduler = KarrasVeLightningScheduler(**settings.to_dict(), train_sigma_min=module.train_sigmas[0],
                                           train_sigma_max=module.train_sigmas[1], precond=module.denoiser.precond,
                                           sigma_data=module.denoiser.sigma_data,
                                           class_names=list(module.hparams.get("class_names") or ()))
    return KarrasVeLightningPipeline(unet=module.denoiser.unet, scheduler=scheduler)


EXPORT_ENTRIES = {"model_index.json", "unet", "scheduler"}


def check_output_dir(out_dir: str | Path, overwrite: bool, ckpt: str | Path) -> Path:
    """``out_dir`` may be written: missing, an empty folder, or with ``overwrite`` an earlier export (nothing but
    ``model_index.json``, ``unet/`` and ``scheduler/``). Never the working directory, a folder above it, or one
    holding the checkpoint ``ckpt``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} exists and is not empty (pass --overwrite true to replace "
                              f"an earlier export)")
    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or target in here.parents or target in Path(ckpt).resolve().parents:
        raise ValueError(f"--overwrite would delete {str(out)!r}, which holds the working directory or the "
                         f"checkpoint {str(ckpt)!r}: choose another --out")
    other = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES)
    if other or not (out / "model_index.json").is_file():
        raise ValueError(f"--overwrite replaces an earlier export only, and {str(out)!r} is not one (it holds "
                         f"{other[:5] or 'no model_index.json'}): choose another --out")
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False, **overrides: Any) -> Path:
    """Write the checkpoint's EMA weights and sampler settings (with ``overrides`` of ``SamplerSettings`` fields)
    as a diffusers folder ``out_dir``; return it (``export_module``)."""
    return export_module(KarrasVeModule.from_checkpoint(ckpt), out_dir, ckpt, overwrite, **overrides)


def export_module(module: KarrasVeModule, out_dir: str | Path, ckpt: str | Path, overwrite: bool = False,
                  **overrides: Any) -> Path:
    """Write the module's weights and sampler settings (with ``overrides``) as a diffusers folder ``out_dir``; return
    it. ``ckpt`` is the checkpoint the module comes from, whose folder ``overwrite`` never replaces.

    Checks everything before writing, writes to a temporary folder beside ``out_dir``, then renames it into place
    (an existing ``out_dir`` is replaced only with ``overwrite``)."""
    pipeline = module_pipeline(module, **overrides)
    out = check_output_dir(out_dir, overwrite, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp's 0o700 would make the export private
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        for path in tmp.rglob("*"):  # safetensors writes its files 0o600
            os.chmod(path, umask_mode(0o777 if path.is_dir() else 0o666))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted once ``src`` is in place (if
    the swap fails, it is moved back; if even that fails, it stays in the ``.NAME.*.old`` folder beside ``dst``)."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        old.rmdir()
        raise
    shutil.rmtree(old)
