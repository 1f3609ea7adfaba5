"""Checkpoint -> diffusers folder: the EMA weights as safetensors, the sampler settings as the scheduler config.

    python scripts/export_diffusers.py --ckpt runs/digits/version_0/checkpoints/last.ckpt --out exported/digits

Load the folder with `KarrasVeLightningPipeline.from_pretrained(DIR)` or sample it with
`scripts/sample.py --model DIR`; its `unet/` also loads into diffusers' own `KarrasVePipeline` (3-channel models).
Refuses an existing non-empty --out unless --overwrite; exits with code 2 and a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import sys

from kve_lightning.export import export_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `kve fit` (a pickle: trusted sources only)")
    p.add_argument("--out", required=True, help="the folder to write (must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        p.exit(2, f"error: {' '.join(str(err).split())}\n")
    print(f"exported {args.ckpt} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
