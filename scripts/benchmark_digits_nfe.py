"""FID-digits and FD-pixels of a trained digits model versus network evaluations (NFE), for our sampler and
diffusers' schedule.

    python scripts/benchmark_digits_nfe.py --ckpt_path runs/digits/checkpoints/last.ckpt --num-samples 500

Rows: ours with the checkpoint's settings (VE schedule, Table 5 VE churn, Heun, D clipped to [-1, 1]); ours without
the clip (Algorithm 2 as written); and diffusers' KarrasVeScheduler arithmetic
(its sigma^2-valued schedule walked as sigma, its start 100 * eps and defaults S_tmax = 50), replayed exactly
through `sample_karras_ve(sigmas=..., latents=...)` -- tests/test_denoiser.py checks that this replay matches the
real pipeline call for call. The same seeds serve every row; FID against all 1,797 digits, FD-pixels beside it;
the real-vs-real floor (two disjoint halves) is printed for scale.
"""

from __future__ import annotations

import argparse

import torch
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler
from tqdm import tqdm

from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import Quality, digits_fid_floor, digits_images
from kve_lightning.sampling import randn_per_row, sample_karras_ve


def diffusers_schedule(num_steps: int) -> tuple[torch.Tensor, float, dict]:
    """The sigmas KarrasVePipeline walks (its schedule reversed, then 0), its initial noise scale and churn settings."""
    scheduler = KarrasVeScheduler()
    scheduler.set_timesteps(num_steps)
    c = scheduler.config
    churn = dict(s_churn=c.s_churn, s_min=c.s_min, s_max=c.s_max, s_noise=c.s_noise)
    return torch.cat([scheduler.schedule.flip(0).double(), torch.zeros(1)]), scheduler.init_noise_sigma, churn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--steps", default="4,8,18,40,256", help="N per run; NFE = 2N - 1")
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args()
    module = KarrasVeModule.from_checkpoint(args.ckpt_path)
    hp = module.hparams
    quality = Quality(digits_images(hp.image_size, hp.channels), args.num_samples)
    seeds = list(range(args.num_samples))
    shape = (hp.channels, hp.image_size, hp.image_size)

    def score(**kwargs) -> tuple[float, float]:
        samples = []
        for start in range(0, len(seeds), args.batch_size):
            batch = seeds[start:start + args.batch_size]
            gens = [torch.Generator().manual_seed(s) for s in batch]
            if "init_sigma" in kwargs:  # diffusers: x_0 = init_noise_sigma * eps from the same generators
                kw = dict(kwargs)
                # our latents are unit noise scaled by sigma_0 (x_0 = sigma_0 * latents): diffusers' x_0 / sigma_0
                scale = kw.pop("init_sigma") / kw["sigmas"][0].item()
                latents = scale * randn_per_row((len(batch), *shape), gens, "cpu", torch.float32)
                x = sample_karras_ve(module.denoiser, latents.shape, generator=gens, latents=latents, **kw)
            else:
                x = module.sample(batch, **kwargs)
            samples.append(x.clamp(-1, 1))
        return quality(torch.cat(samples))

    rows = {"ours (checkpoint settings)": lambda n: dict(num_steps=n),
            "ours, no clip (Algorithm 2 as written)": lambda n: dict(num_steps=n, clamp_denoised=False)}
    steps = [int(s) for s in args.steps.split(",")]
    table = {}
    with tqdm(total=len(steps) * (len(rows) + 1), desc="runs") as bar:
        for name, kwargs in rows.items():
            table[name] = []
            for n in steps:
                table[name].append(score(**kwargs(n)))
                bar.update()
        table["diffusers KarrasVeScheduler arithmetic"] = []
        for n in steps:
            sigmas, init_sigma, churn = diffusers_schedule(n)
            table["diffusers KarrasVeScheduler arithmetic"].append(
                score(sigmas=sigmas, init_sigma=init_sigma, **churn))
            bar.update()
    print(f"FID-digits, {args.num_samples} samples vs the 1,797 digits (real-vs-real floor, 898 vs 898: "
          f"{digits_fid_floor():.2f}), and in parentheses FD-pixels (1.0: as close as real digits)\n")
    print("| sampler | " + " | ".join(f"{2 * n - 1} NFE" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{fid:.2f} ({pixels:.2f}x)" for fid, pixels in values) + " |")


if __name__ == "__main__":
    main()
