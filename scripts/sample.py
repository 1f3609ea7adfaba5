"""Checkpoint or exported folder -> PNGs, without a config: the EMA weights, the stochastic Karras VE sampler.

    python scripts/sample.py --ckpt runs/digits/version_0/checkpoints/last.ckpt --out samples --seeds 0-63 --grid
    python scripts/sample.py --model exported/digits --out samples --seeds 0-63 --grid

Writes {seed:06d}.png per seed (and grid.png with --grid), the same bytes as `kve predict` for the same seeds and
sampler settings, from a checkpoint (--ckpt, a pickle read weights-only: trust only your own) or from a folder
written by scripts/export_diffusers.py (--model: safetensors and JSON, no pickle). Sampler flags override the stored
settings.

Each PNG is written atomically, and the folder's manifest.json records the weights' SHA-256, the image size and the
sampler settings (the same manifest as `kve predict`'s). Rerun an interrupted command and it samples only the seeds
whose PNG is missing (--no-skip-existing: all of them again); a folder whose manifest differs is refused (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from kve_lightning.data import parse_seeds
from kve_lightning.images import (check_sample_folder, existing_seeds, open_sample_folder, prepare_output_dir,
                                  sample_manifest, save_grid, save_png, seed_path)
from kve_lightning.export import load_checkpoint_module
from kve_lightning.module import to_unit
from kve_lightning.pipeline import KarrasVeLightningPipeline
from kve_lightning.sampling import SCHEDULES, SOLVERS

Sampler = Callable[[list[int]], torch.Tensor]
SETTINGS = ("num_steps", "schedule", "solver", "sigma_min", "sigma_max", "rho", "s_churn", "s_min", "s_max",
            "s_noise", "clamp_denoised")


def load_pipeline(model_dir: str | Path, device: torch.device) -> KarrasVeLightningPipeline:
    """The pipeline an exported folder holds, read from safetensors and JSON only (``use_safetensors=True``)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    try:
        pipe = KarrasVeLightningPipeline.from_pretrained(path, use_safetensors=True)
    except Exception as err:  # missing parts, corrupt JSON or safetensors, another pipeline's folder
        raise ValueError(f"cannot load model folder {str(path)!r}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_sampler(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Sampler, dict[str, Any]]:
    """``seeds -> images`` [B, C, H, W] in [0, 1] from --ckpt or --model (the same images) with the sampler
    ``overrides``, and the manifest of those images (a ``ValueError`` for invalid settings)."""
    device = torch.device(args.device)
    if args.ckpt is not None:
        module = load_checkpoint_module(args.ckpt).to(device)
        manifest = sample_manifest(module.denoiser.unet, module.sampler_settings | overrides)
        return lambda seeds: to_unit(module.sample(seeds, **overrides)), manifest
    pipe = load_pipeline(args.model, device)
    config = dict(pipe.scheduler.config)
    manifest = sample_manifest(pipe.unet, {k: config[k] for k in SETTINGS} | overrides)
    kwargs = dict(overrides)
    steps = kwargs.pop("num_steps", config["num_steps"])
    return lambda seeds: pipe(seeds=seeds, num_inference_steps=steps, output_type="pt", **kwargs).images, manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by `kve fit` (a pickle: trusted sources only)")
    source.add_argument("--model", help="a folder written by scripts/export_diffusers.py (no pickle)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seeds", default="0-63", help='seeds, e.g. "0-63" or "0-9,20" (default 0-63)')
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, help="num_steps N (NFE = 2N - 1 with heun)")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--solver", choices=SOLVERS)
    p.add_argument("--s-churn", type=float)
    p.add_argument("--s-min", type=float)
    p.add_argument("--s-max", type=float)
    p.add_argument("--s-noise", type=float)
    p.add_argument("--clamp-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clip D(x; sigma) to [-1, 1] while sampling (default: the model's setting)")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out the seeds whose PNG is already in --out (default); a folder of other weights or "
                        "settings is refused either way")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in dict(num_steps=args.steps, schedule=args.schedule, solver=args.solver,
                                       s_churn=args.s_churn, s_min=args.s_min, s_max=args.s_max,
                                       s_noise=args.s_noise, clamp_denoised=args.clamp_denoised).items()
                 if v is not None}
    try:
        seeds = parse_seeds(args.seeds)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        sample, manifest = load_sampler(args, overrides)
        out = prepare_output_dir(args.out)
        check_sample_folder(out, manifest)
    except (ValueError, OSError) as err:
        p.exit(2, f"error: {' '.join(str(err).split())}\n")
    open_sample_folder(out, manifest)
    done = existing_seeds(out, seeds) if args.skip_existing else set()
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


if __name__ == "__main__":
    main()
