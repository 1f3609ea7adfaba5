"""Checkpoint -> PNGs, without a config: the EMA weights a checkpoint holds, the stochastic Karras VE sampler.

    python scripts/sample.py --ckpt runs/digits/version_0/checkpoints/last.ckpt --out samples --seeds 0-63 --grid

Writes {seed:06d}.png per seed (and grid.png with --grid), the same bytes as `kve predict` for the same seeds and
sampler settings. Sampler flags override the settings stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.data import parse_seeds
from kve_lightning.images import prepare_output_dir, save_grid, save_png, seed_path
from kve_lightning.module import KarrasVeModule, to_unit
from kve_lightning.sampling import SCHEDULES, SOLVERS


def load_module(ckpt: str | Path, device: torch.device) -> KarrasVeModule:
    """The module a checkpoint holds (its ``state_dict``: the EMA weights when trained with EMA)."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        module = KarrasVeModule.load_from_checkpoint(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated files, pickles of other objects, checkpoints of other models
        raise ValueError(f"{str(path)!r} is not a readable kve-lightning checkpoint: {err}") from None
    return module.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `kve fit`")
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
        module = load_module(args.ckpt, torch.device(args.device))
        out = prepare_output_dir(args.out)
    except (ValueError, OSError) as err:
        p.exit(2, f"error: {err}\n")
    overrides = {k: v for k, v in dict(num_steps=args.steps, schedule=args.schedule, solver=args.solver,
                                       s_churn=args.s_churn, s_min=args.s_min, s_max=args.s_max,
                                       s_noise=args.s_noise).items() if v is not None}
    with tqdm(total=len(seeds), unit="img", desc="sampling") as bar:
        for start in range(0, len(seeds), args.batch_size):
            batch = seeds[start:start + args.batch_size]
            try:
                images = to_unit(module.sample(batch, **overrides))
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
