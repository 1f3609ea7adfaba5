"""Checkpoint or exported folder -> PNGs, without a config: the EMA weights, the stochastic Karras VE sampler.

    python scripts/sample.py --ckpt runs/digits/version_0/checkpoints/last.ckpt --out samples --seeds 0-63 --grid
    python scripts/sample.py --model exported/digits --out samples --seeds 0-63 --grid

Writes {seed:06d}.png per seed (and grid.png with --grid), the same bytes as `kve predict` for the same seeds and
sampler settings, from a checkpoint (--ckpt, a pickle: trusted sources only) or from a folder written by
scripts/export_diffusers.py (--model: safetensors and JSON, no pickle). Sampler flags override the stored settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from kve_lightning.data import parse_seeds
from kve_lightning.images import prepare_output_dir, save_grid, save_png, seed_path
from kve_lightning.export import load_checkpoint_module
from kve_lightning.module import to_unit
from kve_lightning.pipeline import KarrasVeLightningPipeline
from kve_lightning.sampling import SCHEDULES, SOLVERS

Sampler = Callable[[list[int], dict[str, Any]], torch.Tensor]


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


def load_sampler(args: argparse.Namespace) -> Sampler:
    """``(seeds, overrides) -> images`` [B, C, H, W] in [0, 1], from --ckpt or --model (the same images)."""
    device = torch.device(args.device)
    if args.ckpt is not None:
        module = load_checkpoint_module(args.ckpt).to(device)
        return lambda seeds, overrides: to_unit(module.sample(seeds, **overrides))
    pipe = load_pipeline(args.model, device)

    def sample(seeds: list[int], overrides: dict[str, Any]) -> torch.Tensor:
        overrides = dict(overrides)
        steps = overrides.pop("num_steps", pipe.scheduler.config.num_steps)
        return pipe(seeds=seeds, num_inference_steps=steps, output_type="pt", **overrides).images

    return sample


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
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        sample = load_sampler(args)
        out = prepare_output_dir(args.out)
    except (ValueError, OSError) as err:
        p.exit(2, f"error: {' '.join(str(err).split())}\n")
    overrides = {k: v for k, v in dict(num_steps=args.steps, schedule=args.schedule, solver=args.solver,
                                       s_churn=args.s_churn, s_min=args.s_min, s_max=args.s_max,
                                       s_noise=args.s_noise).items() if v is not None}
    with tqdm(total=len(seeds), unit="img", desc="sampling") as bar:
        for start in range(0, len(seeds), args.batch_size):
            batch = seeds[start:start + args.batch_size]
            try:
                images = sample(batch, overrides)
            except ValueError as err:
                p.exit(2, f"error: {err}\n")
            for seed, image in zip(batch, images):
                save_png(image, seed_path(out, seed))
            bar.update(len(batch))
    if args.grid:
        save_grid(out, seeds)
    print(f"wrote {len(seeds)} images to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
