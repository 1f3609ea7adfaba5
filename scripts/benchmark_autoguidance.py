"""Autoguidance of a digits model by a weaker one against no guidance, with paired bootstrap intervals.

    python scripts/benchmark_autoguidance.py --ckpt_path runs/digits/checkpoints/last.ckpt \
        --guide_ckpt_path runs/digits-ep15/checkpoints/last.ckpt --scales 1.1,1.2 --n 1000 \
        [--set s_noise=0.72 --set clamp_denoised=false] [--out-md autoguidance.md]

Every row samples the same seeds ``--seed`` .. ``--seed`` + n - 1 (common random numbers; a ``--seed`` past those a
search chose w on gives figures free of that choice), the first without guidance (w = 1), the others
autoguided at w (``D_w = D_guide + w (D_main - D_guide)``, two network calls per step: twice the NFE), at the
checkpoint's sampler settings with the ``--set FIELD=VALUE`` overrides. Each row gives FID-digits and FD-pixels
against all 1,797 digits, as ``kve tune`` scores its arms (``kve_lightning.search.Scorer``), and both differences to
the unguided row with paired bootstrap percentile intervals (the same resampled seeds in every row, the real
statistics fixed): a row wins when its FID interval lies below zero and its FD-pixels interval does not lie above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.guidance import guided_nfe
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import PixelFD, digits_feature_net, digits_images
from kve_lightning.sampling import SamplerSettings
from kve_lightning.search import Arm, Scorer, paired_intervals


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--guide_ckpt_path", required=True, help="the weaker model that guides")
    p.add_argument("--scales", default="1.1,1.2,1.5,2", help="guidance weights w (the unguided row comes first)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a SamplerSettings override")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--out-md", default=None)
    args = p.parse_args(argv)
    defaults = dataclasses.asdict(SamplerSettings())
    overrides = {}
    for pair in args.set:
        key, _, value = pair.partition("=")
        if key not in defaults:
            raise SystemExit(f"--set {pair!r}: {key!r} is not a SamplerSettings field")
        kind = type(defaults[key])
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    module = KarrasVeModule.from_checkpoint(args.ckpt_path, guide_ckpt_path=args.guide_ckpt_path)
    real = digits_images(8, 1)
    net = digits_feature_net()
    with torch.no_grad():
        real_features = net(real).double()
    pixel_fd = PixelFD(real, args.n)
    scorers = (Scorer.from_real(real_features, args.n, args.bootstrap, 0),
               Scorer.from_moments(pixel_fd.mu, pixel_fd.sqrt_cov, args.n, args.bootstrap, 0, pixel_fd.set_size,
                                   pixel_fd.floor))
    seeds = list(range(args.seed, args.seed + args.n))
    arms, scales = [], [1.0] + [float(w) for w in args.scales.split(",")]
    for w in scales:
        settings = module.sampler.replace(guidance_scale=w, **overrides)
        with torch.no_grad():
            images = torch.cat([module.sample(seeds[i:i + args.batch_size], guidance_scale=w, **overrides).clamp(-1, 1)
                                for i in tqdm(range(0, args.n, args.batch_size), desc=f"w={w:g}", unit="batch")])
            (fid, resampled), (pixels, pixels_resampled) = scorers[0](net(images).double()), scorers[1](
                pixel_fd.features(images))
        arms.append(Arm(settings, fid, resampled, pixels, pixels_resampled, 0.0))
        print(f"w={w:g}: FID-digits {fid:.2f}, FD-pixels {pixels:.3f}x", file=sys.stderr)
    paired_intervals(arms, args.confidence)
    pct = f"{args.confidence:.0%}"
    rows = [dict(w=w, nfe=guided_nfe(a.settings), fid=a.fid, fid_diff=a.diff, fid_interval=a.interval,
                 fd_pixels=a.pixels, fd_pixels_diff=a.pixels_diff, fd_pixels_interval=a.pixels_interval)
            for w, a in zip(scales, arms)]
    lines = [f"Autoguidance of `{args.ckpt_path}` by `{args.guide_ckpt_path}`, {args.n} samples per row (seeds "
             f"{seeds[0]}-{seeds[-1]}), settings: the checkpoint's with {overrides}; differences to w = 1 with paired "
             f"bootstrap {pct} intervals ({args.bootstrap} resamples).", "",
             f"| w | NFE | FID-digits | diff | {pct} interval | FD-pixels (x real) | diff | {pct} interval |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['w']:g} | {r['nfe']} | {r['fid']:.2f} | {r['fid_diff']:+.2f} | "
                     f"[{r['fid_interval'][0]:+.2f}, {r['fid_interval'][1]:+.2f}] | {r['fd_pixels']:.3f} | "
                     f"{r['fd_pixels_diff']:+.3f} | [{r['fd_pixels_interval'][0]:+.3f}, "
                     f"{r['fd_pixels_interval'][1]:+.3f}] |")
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
        Path(args.out_md).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
