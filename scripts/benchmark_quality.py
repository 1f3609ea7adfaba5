"""FID-digits and FD-pixels of trained digits models versus NFE, several checkpoints and sampler settings in one
table.

    python scripts/benchmark_quality.py --row "today=runs/old/checkpoints/last.ckpt" \
        --row "tuned=runs/digits/checkpoints/last.ckpt,s_churn=20,s_max=10" --nfe 7,15,35,79 --n 1000

Each ``--row LABEL=CKPT[,FIELD=VALUE...]`` is a checkpoint with ``SamplerSettings`` overrides (its own settings
otherwise; ``guide_ckpt_path=F`` autoguides it with the model F at the row's ``guidance_scale``, and then each
image costs twice the column's NFE); every row is sampled with D clipped and, with ``--clip both`` (default),
unclipped too, at each NFE (Heun: N = (NFE + 1) / 2 steps), from the same seeds 0 .. n-1 (common random numbers across rows). Each cell gives
two independent measures of the same samples: FID-digits against all 1,797 digits (as `kve tune` and the earlier
tables; real-vs-real floor of two halves ``digits_fid_floor``), and FD-pixels (``kve_lightning.metrics.PixelFD``:
the Frechet distance of raw pixels' top 16 principal components to a fixed half of the digits, in sets of the other
half's size, 898, as a multiple of the other half's; 1.0 is a perfect model). Writes a markdown table
(``--out-md``, and the rows as JSON beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import Quality, digits_fid_floor, digits_images
from kve_lightning.sampling import SamplerSettings


def parse_row(spec: str) -> tuple[str, str, dict]:
    """``LABEL=CKPT[,FIELD=VALUE...]`` -> (label, checkpoint, settings overrides typed by ``SamplerSettings``)."""
    label, _, rest = spec.partition("=")
    ckpt, *pairs = rest.split(",")
    defaults = dataclasses.asdict(SamplerSettings())  # every field (to_dict leaves unused ones out)
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "guide_ckpt_path":  # autoguidance: the module's guide, not a SamplerSettings field
            overrides[key] = value
            continue
        if key not in defaults:
            raise SystemExit(f"--row {spec!r}: {key!r} is not a SamplerSettings field")
        kind = type(defaults[key])
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return label, ckpt, overrides


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True, help="LABEL=CKPT[,FIELD=VALUE...] (repeatable)")
    p.add_argument("--nfe", default="7,15,35,79", help="network evaluations per image (odd: Heun)")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--clip", choices=("both", "on", "off"), default="both", help="D clipped to [-1, 1], or not")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out-md", default=None, help="write the table here (and the rows as .json beside it)")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    rows = [parse_row(spec) for spec in args.row]
    quality = Quality(digits_images(8, 1), args.n)
    clips = {"both": (True, False), "on": (True,), "off": (False,)}[args.clip]
    seeds = list(range(args.n))
    results = []
    with tqdm(total=len(rows) * len(clips) * len(nfes) * args.n, unit="img", desc="sampling") as bar:
        for label, ckpt, overrides in rows:
            guide = {k: overrides.pop(k) for k in ("guide_ckpt_path",) if k in overrides}
            module = KarrasVeModule.from_checkpoint(ckpt, **guide)
            for clip in (overrides.pop("clamp_denoised"),) if "clamp_denoised" in overrides else clips:
                cell = dict(label=label, ckpt=ckpt, clamp_denoised=clip, **guide, **overrides)
                for nfe in nfes:
                    samples = []
                    for k in range(0, len(seeds), args.batch_size):
                        samples.append(module.sample(seeds[k:k + args.batch_size], num_steps=(nfe + 1) // 2,
                                                     clamp_denoised=clip, **overrides).clamp(-1, 1))
                        bar.update(len(samples[-1]))
                    cell[str(nfe)], cell[f"{nfe} fd_pixels"] = quality(torch.cat(samples))
                results.append(cell)
                print(cell, file=sys.stderr)
    floor = digits_fid_floor()
    lines = [f"FID-digits of {args.n} samples (seeds 0-{args.n - 1} in every cell) against all 1,797 digits "
             f"(real-vs-real floor, two halves of the digits: {floor:.2f}), and in parentheses FD-pixels (1.0: as "
             f"close to half of the digits as the other half). Produced by `python scripts/benchmark_quality.py "
             f"{' '.join(repr(a) if ' ' in a else a for a in (argv if argv is not None else sys.argv[1:]))}`.", "",
             "| model and settings | D clipped | " + " | ".join(f"{n} NFE" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    lines += [f"| {c['label']} | {'yes' if c['clamp_denoised'] else 'no'} | "
              + " | ".join(f"{c[str(n)]:.2f} ({c[f'{n} fd_pixels']:.2f}x)" for n in nfes) + " |" for c in results]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
        Path(args.out_md).with_suffix(".json").write_text(json.dumps(dict(floor=floor, rows=results), indent=2))
    return results


if __name__ == "__main__":
    main()
