"""Wall clock of our sampler (`sample_karras_ve` + `VEDenoiser`) vs diffusers' `KarrasVePipeline`, same UNet.

    python scripts/benchmark_sampling_speed.py --size 32 --batch 16 --steps 10 --repeats 3
    python scripts/benchmark_sampling_speed.py --size 8 --batch 64 --steps 10 --micro-batch 16   # its cost

Both run the same 3-channel Fourier UNet2DModel at the same batch and the same NFE (2N - 1 for N steps), on the
same device, alternating, in one process; the best of ``--repeats`` is kept for each. Prints a markdown table and
the ratio ours / diffusers (below 1: ours is faster). With ``--micro-batch M`` a third row runs ours with the UNet
on padded chunks of M rows (``SamplerSettings.micro_batch``, batch-independent bytes), to price that option.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import KarrasVePipeline, UNet2DModel
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler

from kve_lightning import VEDenoiser, sample_karras_ve
from kve_lightning.denoiser import default_unet_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=0, help="also time ours with this micro_batch (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    unet = UNet2DModel(**default_unet_config(args.size, 3)).to(args.device).eval()
    pipe = KarrasVePipeline(unet=unet, scheduler=KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    denoiser = VEDenoiser(unet)
    shape = (args.batch, 3, args.size, args.size)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def ours(micro_batch: int = 0):
        gen = torch.Generator().manual_seed(0)
        return sample_karras_ve(denoiser, shape, num_steps=args.steps, generator=gen, device=args.device,
                                micro_batch=micro_batch)

    def theirs():
        gen = torch.Generator().manual_seed(0)
        return pipe(batch_size=args.batch, num_inference_steps=args.steps, generator=gen, output_type="np")

    runs = {"ours": ours, "diffusers": theirs}
    if args.micro_batch:
        runs[f"ours, micro_batch {args.micro_batch}"] = lambda: ours(args.micro_batch)
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    nfe = 2 * args.steps - 1
    print(f"device {args.device}, UNet {sum(q.numel() for q in unet.parameters()) / 1e6:.2f} M params, "
          f"batch {args.batch} x 3 x {args.size} x {args.size}, {args.steps} steps = {nfe} NFE")
    print("| sampler | best of {} (s) | ms per NFE |".format(args.repeats))
    print("|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.3f} | {1000 * v / nfe:.1f} |")
    print(f"\nratio ours / diffusers: {best['ours'] / best['diffusers']:.3f}")
    if args.micro_batch:
        print(f"ratio micro_batch {args.micro_batch} / whole batch: "
              f"{best[f'ours, micro_batch {args.micro_batch}'] / best['ours']:.3f}")


if __name__ == "__main__":
    main()
