"""The console scripts ``kve-sample``, ``kve-export``, ``kve-likelihood``, ``kve-inpaint`` and ``kve-phema`` (``kve``
is ``cli.py``, ``kve-tune`` is ``tune.py``).

The sampling ones take the sampler's flags, generated from ``SamplerSettings``' fields, types and ``Args:`` docs, and
``--config YAML`` (settings under ``model:``, as kve-tune writes), which the flags override; a setting left out
keeps the model's. Bad input ends in one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

import docstring_parser
import lightning
import numpy as np
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from kve_lightning.data import DATASETS, MAX_SEEDS, ImageDataModule, parse_seeds
from kve_lightning.denoiser import VEDenoiser
from kve_lightning.export import check_output_dir, export_checkpoint, export_module
from kve_lightning.images import (existing_pngs, existing_seeds, open_sample_folder, prepare_output_dir, read_png,
                                  sample_manifest, save_atomic, save_grid, save_png, seed_path, to_unit)
from kve_lightning.inpainting import MASK_SPECS, complete, inpainting_grid, parse_mask
from kve_lightning.likelihood import bits_per_dim_per_image, index_generators, mean_and_stderr
from kve_lightning.module import KarrasVeModule
from kve_lightning.phema import STD_MAX, Snapshot, combine, list_snapshots, reconstruction, std_to_gamma
from kve_lightning.pipeline import KarrasVeLightningPipeline
from kve_lightning.sampling import GUIDANCE, RESAMPLE, SamplerSettings

Sampler = Callable[[list[int]], torch.Tensor]
SHORT_FLAGS = {"num_steps": "--steps"}  # an extra, shorter spelling


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config YAML`` and one flag per ``SamplerSettings`` field (``--s-churn`` for ``s_churn``), its help from the
    field's ``Args:`` entry; choices for ``Literal`` fields, ``--x/--no-x`` for booleans; all default to ``None``
    (the model's)."""
    group = parser.add_argument_group("sampler settings (default: the model's own)")
    group.add_argument("--config", metavar="YAML", help="sampler settings from the `model:` mapping of a YAML file, "
                                                        "such as kve-tune writes; the flags below override it")
    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(SamplerSettings.__doc__).params}
    hints = get_type_hints(SamplerSettings)
    for f in fields(SamplerSettings):
        flags = [f"--{f.name.replace('_', '-')}"] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=docs[f.name])
        elif get_origin(hint) is Literal:
            group.add_argument(*flags, dest=f.name, choices=get_args(hint), help=docs[f.name])
        else:
            group.add_argument(*flags, dest=f.name, type=hint, metavar=f.name.upper(), help=docs[f.name])


def sampler_config(path: str | Path) -> dict[str, Any]:
    """The settings of a sampler config: a YAML file holding one mapping ``model:`` of ``SamplerSettings`` fields
    (``kve predict --config`` reads the same file); a ``ValueError`` naming anything else in it."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or list(config) != ["model"] or not isinstance(config["model"], dict):
        raise ValueError(f"--config {str(path)!r} must hold one mapping `model:` of sampler settings, got "
                         f"{list(config) if isinstance(config, dict) else type(config).__name__}")
    names = [f.name for f in fields(SamplerSettings)]
    unknown = [k for k in config["model"] if k not in names]
    if unknown:
        raise ValueError(f"--config {str(path)!r}: {unknown} are not sampler settings; expected some of {names}")
    return config["model"]


def sampler_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings given: those of ``--config``, overridden by the flags."""
    flags = {f.name: getattr(args, f.name) for f in fields(SamplerSettings) if getattr(args, f.name) is not None}
    return (sampler_config(args.config) if args.config else {}) | flags


def model_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for a command that reads a trained model: exactly one of --ckpt and --model."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by `kve fit` (a pickle: trusted sources only)")
    source.add_argument("--model", help="a folder written by kve-export (no pickle)")
    return p


def fail(parser: argparse.ArgumentParser, err: BaseException) -> None:
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}\n")


def load_pipeline(model_dir: str | Path, device: torch.device) -> KarrasVeLightningPipeline:
    """The pipeline an exported folder holds, read from safetensors and JSON only (``use_safetensors=True``)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} " + (
            "is a file, not a folder written by kve-export" if path.exists() else "does not exist"))
    try:
        pipe = KarrasVeLightningPipeline.from_pretrained(path, use_safetensors=True)
    except Exception as err:  # missing parts, corrupt JSON or safetensors, another pipeline's folder
        raise ValueError(f"cannot load model folder {str(path)!r}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")


def writable_file(path: Path, flag: str) -> Path:
    """``path``, the value of ``flag``, if a file can be written there: not a folder, in an existing folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a directory, not a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {flag} {str(path)!r} does not exist")
    return path


def parse_device(name: str) -> torch.device:
    """A torch device that exists here; a ``ValueError`` naming it otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    missing_cuda = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    if not available.get(device.type, True) or missing_cuda:
        raise ValueError(f"--device {name!r} is not available on this machine")
    return device


def load_model(args: argparse.Namespace) -> tuple[Callable[..., torch.Tensor], SamplerSettings, VEDenoiser]:
    """From --ckpt or --model on --device: ``sample(seeds, **overrides)`` -> images [B, C, H, W] in [0, 1] (the
    same from either; ``overrides``: ``SamplerSettings`` fields), the stored sampler settings, and the denoiser
    (frozen, EMA weights)."""
    device = parse_device(args.device)
    if args.ckpt is not None:
        module = KarrasVeModule.from_checkpoint(args.ckpt).to(device)
        sample = lambda seeds, **o: to_unit(module.sample(seeds, **o))  # noqa: E731
        settings, denoiser = module.sampler, module.denoiser
    else:
        pipe = load_pipeline(args.model, device)
        sample = lambda seeds, **o: pipe(seeds=seeds, output_type="pt", **o).images  # noqa: E731
        settings, denoiser = pipe.scheduler.settings, VEDenoiser(pipe.unet)
    return sample, settings, denoiser.requires_grad_(False)


def load_sampler(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Sampler, dict[str, Any]]:
    """``seeds -> images`` [B, C, H, W] in [0, 1] from --ckpt or --model (``load_model``) with the sampler
    ``overrides``, and the manifest of those images (a ``ValueError`` for invalid settings)."""
    sample, settings, denoiser = load_model(args)
    return lambda seeds: sample(seeds, **overrides), sample_manifest(denoiser.unet, settings.replace(**overrides))


SAMPLE_DOC = """Checkpoint or exported folder -> PNGs: the EMA weights, the stochastic Karras VE sampler.

    kve-sample --ckpt runs/digits/checkpoints/last.ckpt --out samples/digits --seeds 0-63 --grid
    kve-sample --model exported/digits --out samples/digits --seeds 0-63 --grid --steps 18 --s-churn 0

Writes {seed:06d}.png per seed (and grid.png with --grid), the same bytes as `kve predict` for the same seeds and
sampler settings, from a checkpoint (--ckpt, a pickle read weights-only: trust only your own) or from a folder
written by kve-export (--model: safetensors and JSON, no pickle). Sampler flags override the stored settings,
and so does --config YAML (`model:` with sampler settings, as kve-tune writes), the flags overriding it.

Each PNG is written atomically, and the folder's manifest.json records the weights' SHA-256, the image size and the
sampler settings (the same manifest as `kve predict`'s). Rerun an interrupted command and it samples only the seeds
whose PNG is missing (--no-skip-existing: all of them again); a folder whose manifest differs is refused (exit 2).
"""


def sample_main(argv: list[str] | None = None) -> None:
    """``kve-sample``."""
    p = model_parser("kve-sample", SAMPLE_DOC)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seeds", default="0-63", help='seeds, e.g. "0-63" or "0-9,20" (default 0-63)')
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once (default 64)")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out the seeds whose PNG is already in --out (default); a folder of other weights or "
                        "settings is refused either way")
    add_device_argument(p)
    add_sampler_arguments(p)
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        sample, manifest = load_sampler(args, sampler_overrides(args))
        out = prepare_output_dir(args.out)
        if args.grid and (out / "grid.png").is_dir():
            raise IsADirectoryError(f"{str(out / 'grid.png')!r} is a directory: cannot write the grid there")
        open_sample_folder(out, manifest)
    except (ValueError, OSError) as err:
        fail(p, err)
    done = existing_seeds(out, seeds, manifest) if args.skip_existing else set()
    todo = [s for s in seeds if s not in done]
    with tqdm(total=len(seeds), initial=len(done), unit="img", desc="sampling") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            for seed, image in zip(batch, sample(batch)):
                save_png(image, seed_path(out, seed))
            bar.update(len(batch))
    if args.grid:
        save_grid(out, seeds)
    print(f"wrote {len(todo)} images to {out} ({len(done)} were there)", file=sys.stderr)


EXPORT_DOC = """Checkpoint -> diffusers folder: EMA weights as safetensors, sampler settings as the scheduler config.

    kve-export --ckpt runs/digits/checkpoints/last.ckpt --out exported/digits [--steps 18 --s-churn 0]

Load the folder with `KarrasVeLightningPipeline.from_pretrained(DIR)` or sample it with `kve-sample --model DIR`;
its `unet/` also loads into diffusers' own `KarrasVePipeline` (3-channel models). Sampler flags (and --config
YAML, as kve-tune writes) replace the checkpoint's settings in the exported scheduler config. Refuses an existing
non-empty --out unless --overwrite.
"""


def export_main(argv: list[str] | None = None) -> None:
    """``kve-export``."""
    p = argparse.ArgumentParser(prog="kve-export", description=EXPORT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `kve fit` (a pickle: trusted sources only)")
    p.add_argument("--out", required=True, help="the folder to write (must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    add_sampler_arguments(p)
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite, **sampler_overrides(args))
    except (ValueError, OSError) as err:
        fail(p, err)
    print(f"exported {args.ckpt} to {out}", file=sys.stderr)


LIKELIHOOD_DOC = """Bits per dimension of held-out images under a trained model, through the probability-flow ODE.

    kve-likelihood --ckpt runs/digits/checkpoints/last.ckpt --split val --probes 1 --steps 64 --out report.json

The images are the data module's (--dataset, --root; the model's image size and channels), its held-out split
(--split val, the validation images, never trained on) or all of them, the first --n. Each image is dequantized
uniformly inside its bin of the data's quantization (17 levels for digits, 256 otherwise) and its log-density
integrated with RK4 in ln(sigma) and Hutchinson's divergence estimate (kve_lightning/likelihood.py); the report
gives bits/dim with its standard error over images, the NFE per image and the wall time.
"""


def likelihood_main(argv: list[str] | None = None) -> None:
    """``kve-likelihood``."""
    p = model_parser("kve-likelihood", LIKELIHOOD_DOC)
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="the images' data set (default digits)")
    p.add_argument("--root", default="data", help="where a torchvision data set or an image folder lives")
    p.add_argument("--split", default="val", choices=("val", "all"), help="held-out images only (default) or all")
    p.add_argument("--n", type=int, default=None, help="use the first N images of the split (default: all)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image (default 1)")
    p.add_argument("--steps", type=int, default=64, help="RK4 steps in ln(sigma), 4 NFE each (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="images integrated at once (default 64)")
    p.add_argument("--out", required=True, help="the JSON report to write")
    add_device_argument(p)
    args = p.parse_args(argv)
    try:
        for name in ("probes", "steps", "batch_size") + (("n",) if args.n is not None else ()):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        out = writable_file(Path(args.out), "--out")
        device = parse_device(args.device)
        _, settings, denoiser = load_model(args)
        unet = denoiser.unet
        data = ImageDataModule(dataset=args.dataset, root=args.root, image_size=int(unet.config.sample_size),
                               channels=int(unet.config.in_channels))
        if args.split == "val":
            data.setup("fit")
        split = data.val_set if args.split == "val" else data.full_dataset()
        count = len(split) if args.n is None else min(args.n, len(split))
    except (ValueError, OSError) as err:
        fail(p, err)
    values = []
    start = time.perf_counter()
    with tqdm(total=count, unit="img", desc="bits/dim") as bar:
        for first in range(0, count, args.batch_size):
            index = list(range(first, min(first + args.batch_size, count)))
            images = torch.stack([split[i] for i in index]).to(device)
            values.append(bits_per_dim_per_image(
                denoiser, images, data.levels, generator=index_generators(index),
                steps=args.steps, num_probes=args.probes, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max))
            bar.update(len(index))
    wall = time.perf_counter() - start
    mean, stderr = mean_and_stderr(torch.cat(values))
    report = {"bits_per_dim": mean, "stderr": stderr, "images": count, "split": args.split, "dataset": args.dataset,
              "levels": data.levels, "steps": args.steps, "probes": args.probes, "nfe_per_image": 4 * args.steps,
              "wall_seconds": round(wall, 3), "seconds_per_image": round(wall / count, 4),
              "sigma_min": settings.sigma_min, "sigma_max": settings.sigma_max}
    payload = (json.dumps(report, indent=2) + "\n").encode()
    save_atomic(out, lambda f: f.write(payload))
    print(f"{mean:.4f} +- {stderr:.4f} bits/dim over {count} images ({4 * args.steps} NFE each, {wall:.1f} s): "
          f"{out}", file=sys.stderr)


INPAINT_DOC = """Fill in the masked part of images with the model's conditional (inpaint_karras_ve: Algorithm 2 with the
known pixels replaced at every noise level, RePaint resampling and reconstruction guidance).

    kve-inpaint --ckpt runs/digits/checkpoints/last.ckpt --split val --n 16 --mask bottom --out inpaint/digits
    kve-inpaint --model exported/faces --images photos/ --mask hole.png --out inpaint/faces --seeds 0-7

The images are the files of --images (recursively, sorted by path; each must be the model's size) or the held-out
split of a data module (--split val with --dataset/--root, the split `kve fit` validates on). --mask names the
pixels to fill: a half (bottom, top, left, right), the center square, random:P (each pixel with probability P), or a
PNG of the image size whose white pixels are filled. Writes {image:05d}_{seed:06d}.png for every image and seed
(image = its position in the list), mask.png (white = filled) and grid.png (per image: original | masked |
completions), atomically; manifest.json records the weights, sampler settings, resampling, mask and images, and a
rerun of the same command completes only the missing PNGs (a folder of other settings is refused).
"""


def inpaint_main(argv: list[str] | None = None) -> None:
    """``kve-inpaint``."""
    p = model_parser("kve-inpaint", INPAINT_DOC)
    images_from = p.add_mutually_exclusive_group(required=True)
    images_from.add_argument("--images", help="a folder of images of the model's size")
    images_from.add_argument("--split", choices=("val",), help="the data module's held-out split (--dataset, --root)")
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="the data set of --split (default digits)")
    p.add_argument("--root", default="data", help="where a torchvision data set or an image folder lives")
    p.add_argument("--n", type=int, default=None, help="use the first N images (default: all)")
    p.add_argument("--mask", required=True, help=f"the pixels to fill: {', '.join(MASK_SPECS)}")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seeds", default="0-3", help='completions per image, one per seed (default "0-3")')
    p.add_argument("--resample", type=int, default=RESAMPLE,
                   help=f"RePaint resampling: each step runs R times (NFE x R; default {RESAMPLE}, see the README)")
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help=f"reconstruction-guidance weight w (0: replacement only; each evaluation then also costs a "
                        f"backward pass; default {GUIDANCE:g}, see the README)")
    p.add_argument("--batch-size", type=int, default=64, help="completions sampled at once (default 64)")
    p.add_argument("--grid-images", type=int, default=32, help="images in grid.png, 0 for none (default 32)")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out the completions whose PNG is already in --out (default)")
    add_device_argument(p)
    add_sampler_arguments(p)
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        for name in ("batch_size", "resample") + (("n",) if args.n is not None else ()):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.grid_images < 0:
            raise ValueError(f"--grid-images must be >= 0, got {args.grid_images}")
        if not 0 <= args.guidance < math.inf:
            raise ValueError(f"--guidance must be a finite number >= 0, got {args.guidance}")
        device = parse_device(args.device)
        _, settings, denoiser = load_model(args)
        settings = settings.replace(**sampler_overrides(args))
        size, channels = int(denoiser.unet.config.sample_size), int(denoiser.unet.config.in_channels)
        mask = parse_mask(args.mask, size).to(device)
        images = load_images(args, size, channels)
        if len(images) * len(seeds) > MAX_SEEDS:
            raise ValueError(f"{len(images)} images x {len(seeds)} seeds is more than {MAX_SEEDS:,} completions: "
                             f"split them over several runs")
        manifest = sample_manifest(denoiser.unet, settings) | {"inpainting": {
            "resample": args.resample, "guidance": args.guidance, "mask": args.mask,
            "mask_sha256": hashlib.sha256(mask.cpu().numpy().tobytes()).hexdigest(),
            "images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(), "images": len(images)}}
        out = prepare_output_dir(args.out)
        for name in ("grid.png", "mask.png"):
            if (out / name).is_dir():
                raise IsADirectoryError(f"{str(out / name)!r} is a directory: cannot write {name} there")
        open_sample_folder(out, manifest)
    except (ValueError, OSError) as err:
        fail(p, err)
    save_png((~mask[0]).float(), out / "mask.png")
    jobs = [(i, s, out / f"{i:05d}_{s:06d}.png") for i in range(len(images)) for s in seeds]
    done = existing_pngs([path for _, _, path in jobs], manifest) if args.skip_existing else set()
    todo = [job for job in jobs if job[2] not in done]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="img", desc="inpainting") as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            x = complete(denoiser, images[[i for i, _, _ in batch]].to(device), mask, [s for _, s, _ in batch],
                         settings, args.resample, args.guidance)
            for (_, _, path), image in zip(batch, to_unit(x)):
                save_png(image, path)
            bar.update(len(batch))
    if args.grid_images:
        shown = range(min(args.grid_images, len(images)))
        completions = torch.stack([torch.stack([read_png(out / f"{i:05d}_{s:06d}.png") for s in seeds[:8]])
                                   for i in shown]).float() / 127.5 - 1
        save_png(inpainting_grid(images[list(shown)], mask.cpu(), completions), out / "grid.png")
    print(f"wrote {len(todo)} completions to {out} ({len(jobs) - len(todo)} were there)", file=sys.stderr)


def load_images(args: argparse.Namespace, size: int, channels: int) -> torch.Tensor:
    """The first --n images [N, C, H, W] in [-1, 1] of --images (each of the model's size, else a ``ValueError``
    naming it) or of the held-out split (--split val)."""
    data = ImageDataModule(dataset="folder" if args.images else args.dataset, root=args.images or args.root,
                           image_size=size, channels=channels)
    if args.images:
        images = data.full_dataset()
        for path in images.paths[:args.n]:
            with Image.open(path) as image:
                if image.size != (size, size):
                    raise ValueError(f"image {str(path)!r} is {image.size[0]}x{image.size[1]} pixels, the model's "
                                     f"images are {size}x{size}")
    else:
        data.setup("fit")
        images = data.val_set
    return torch.stack([images[i] for i in range(min(args.n or len(images), len(images)))])


PHEMA_DOC = """Post-hoc EMA: the EMA of any relative std, reconstructed from a run's power-function EMA snapshots.

    kve-phema --snapshots runs/digits --list
    kve-phema --snapshots runs/digits --ckpt runs/digits/checkpoints/last.ckpt --std 0.07 --out digits-0.07.ckpt
    kve-phema --snapshots runs/digits --ckpt runs/digits/checkpoints/last.ckpt --std 0.04,0.12 --export out/d-{std}

The snapshots come from training with `--model.phema_stds [0.05,0.1]` (kve_lightning.phema.PostHocEMA). The EMA
of each --std at the newest snapshot's step is the combination of all snapshots whose profile best matches its
power-function profile in least squares (Karras et al. 2024, App. C.3). Its profile error e, half the L1 distance
between the combined and the exact weights of the training steps, bounds the result: every weight lies within e
times its range over training of the exact EMA. A std with e above --max-error is refused (--list shows the stds
that pass). --ckpt gives the model (hyper-parameters, architecture, buffers) the weights go into. --out writes a
checkpoint for `kve predict --ckpt_path`, `kve-sample --ckpt` and kve-export; --export a folder as kve-export
writes one. With several stds, --out and --export must contain {std}.
"""


def phema_main(argv: list[str] | None = None) -> None:
    """``kve-phema``."""
    p = argparse.ArgumentParser(prog="kve-phema", description=PHEMA_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", required=True, help="a folder of snapshots, or a run folder holding phema/")
    p.add_argument("--list", action="store_true", help="list the snapshots and the stds they can reconstruct")
    p.add_argument("--ckpt", help="the run's checkpoint (e.g. its last.ckpt) whose model the weights go into")
    p.add_argument("--std", help='relative std(s) to reconstruct, e.g. "0.07" or "0.04,0.07,0.12"')
    p.add_argument("--out", help="the checkpoint to write ({std} is replaced by the std)")
    p.add_argument("--export", help="the diffusers folder to write, as kve-export does ({std} is replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or earlier --export")
    p.add_argument("--max-error", type=float, default=0.05,
                   help="the largest profile error accepted (default 0.05; see above)")
    args = p.parse_args(argv)
    try:
        folder = Path(args.snapshots)
        folder = folder / "phema" if (folder / "phema").is_dir() else folder
        if not folder.is_dir():
            raise FileNotFoundError(f"--snapshots {args.snapshots!r} is not a folder")
        snapshots = list_snapshots(folder)
        if not snapshots:
            raise FileNotFoundError(f"{str(folder)!r} holds no post-hoc EMA snapshots (phema-*.safetensors): train "
                                    f"with --model.phema_stds to write them")
        if args.list:
            reconstructible = [s for s in np.arange(1, 61) / 200 if s < STD_MAX
                               and reconstruction(snapshots, s)[1] <= args.max_error]
            for s in snapshots:
                print(f"step {s.step:>9}  std {s.std:.4f}  gamma {std_to_gamma(s.std):8.3f}  {s.path.name}")
            print(f"reconstructible at step {snapshots[-1].step} with profile error <= {args.max_error:g}: " + (
                f"std {min(reconstructible):g} to {max(reconstructible):g}" if reconstructible else "none"))
            return
        if args.std is None or args.ckpt is None or not (args.out or args.export):
            raise ValueError("give --std, --ckpt and --out and/or --export (or --list)")
        stds = list(dict.fromkeys(parse_stds(args.std)))
        plans = [reconstruction(snapshots, std) for std in stds]
        for std, (_, error, step) in zip(stds, plans):
            if error > args.max_error:
                raise ValueError(f"--std {std:g}: its profile error at step {step} is {error:.3f} > --max-error "
                                 f"{args.max_error:g}: these snapshots cannot reconstruct it (see --list; snapshot "
                                 f"more often)")
        module = KarrasVeModule.from_checkpoint(args.ckpt)
        for snapshot in snapshots:
            check_snapshot_tensors(snapshot, module, args.ckpt)
        outputs = [(phema_path(args.out, std, len(stds)), phema_path(args.export, std, len(stds))) for std in stds]
        for out, export in outputs:
            check_output_file(out, args.overwrite, args.ckpt)
            if export:
                check_output_dir(export, args.overwrite, args.ckpt)
    except (ValueError, OSError) as err:
        fail(p, err)
    for std, (x, error, step), weights, (out, export) in zip(stds, plans, combine(snapshots, [x for x, _, _ in plans]),
                                                            outputs):
        module.load_state_dict(weights, strict=False)
        info = {"std": std, "step": step, "profile_error": error, "coefficients": x.tolist(),
                "snapshots": [s.path.name for s in snapshots]}
        if out:
            checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                          "pytorch-lightning_version": lightning.__version__, "phema": info}
            save_atomic(out, lambda f: torch.save(checkpoint, f))
        if export:
            export_module(module, export, args.ckpt, overwrite=args.overwrite)
        print(f"std {std:g} at step {step} from {len(snapshots)} snapshots, profile error {error:.4f}: "
              f"{', '.join(str(o) for o in (out, export) if o)}", file=sys.stderr)


def parse_stds(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--std {text!r} is not a number or a comma list of numbers") from None


def phema_path(template: str | None, std: float, count: int) -> Path | None:
    """``template`` with {std} replaced; a ``ValueError`` when several stds would share one path."""
    if template is None:
        return None
    if count > 1 and "{std}" not in template:
        raise ValueError(f"{template!r}: with several --std values the output must contain {{std}}")
    return Path(template.replace("{std}", f"{std:g}"))


def check_output_file(out: Path | None, overwrite: bool, ckpt: str) -> None:
    """``out`` may be written: in an existing folder, not a folder, not the checkpoint ``ckpt`` itself, and not an
    existing file unless ``overwrite``."""
    if out is None:
        return
    writable_file(out, "--out")
    if out.exists() and (not overwrite or out.resolve() == Path(ckpt).resolve()):
        raise FileExistsError(f"--out {str(out)!r} exists" + (
            " and is the --ckpt checkpoint" if overwrite else " (pass --overwrite to replace it)"))


def check_snapshot_tensors(snapshot: Snapshot, module: KarrasVeModule, ckpt: str) -> None:
    """The snapshot holds exactly the module's parameters, of the same shapes; a ``ValueError`` naming the first
    that differs otherwise."""
    with safe_open(snapshot.path, framework="pt") as f:
        theirs = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    ours = {name: tuple(p.shape) for name, p in module.named_parameters()}
    diff = [f"{n}: {theirs.get(n, 'missing')} in the snapshots, {ours.get(n, 'missing')} in the checkpoint"
            for n in sorted(theirs.keys() | ours.keys()) if theirs.get(n) != ours.get(n)]
    if diff:
        raise ValueError(f"the snapshots do not fit checkpoint {ckpt!r} ({len(diff)} tensors differ; {diff[0]}): "
                         f"give the checkpoint of the run that wrote them")
