"""Wall clock of our sampler (`sample_karras_ve` + `VEDenoiser`) vs diffusers' `KarrasVePipeline`, same UNet.

    python scripts/benchmark_sampling_speed.py --size 32 --batch 16 --steps 10 --repeats 3
    python scripts/benchmark_sampling_speed.py --size 8 --batch 64 --steps 10 --micro-batch 16   # its cost
    python scripts/benchmark_sampling_speed.py --config configs/cifar10.yaml --batch 128 --steps 18   # its UNet

Both run the same 3-channel Fourier UNet2DModel (the digits UNet at ``--size``, or a config's UNet at its image
size) at the same batch and the same NFE (2N - 1 for N steps), on the same device, alternating, in one process; the
best of ``--repeats`` is kept for each (CUDA synchronized before and after). Prints a markdown table and the ratio
ours / diffusers (below 1: ours is faster); ``--json PATH`` also writes them there. With ``--micro-batch M`` a third
row runs ours with the UNet on padded chunks of M rows (``SamplerSettings.micro_batch``, batch-independent bytes),
to price that option.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from diffusers import KarrasVePipeline, UNet2DModel
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler

from kve_lightning import VEDenoiser, sample_karras_ve
from kve_lightning.denoiser import default_unet_config, unet_config
from kve_lightning.storage import save_atomic


def table(summary: dict) -> str:
    """The markdown table of a summary: each sampler's best wall clock, img/s and ms per NFE, and the ratios."""
    lines = [f"device {summary['device']}, UNet {summary['unet_params_m']:.2f} M params, batch "
             f"{' x '.join(map(str, summary['shape']))}, {summary['steps']} steps = {summary['nfe']} NFE",
             "", f"| sampler | best of {summary['repeats']} (s) | img/s | ms per NFE |", "|---|---|---|---|"]
    for k, v in summary["seconds"].items():
        lines.append(f"| {k} | {v:.3f} | {summary['shape'][0] / v:.1f} | {1000 * v / summary['nfe']:.1f} |")
    lines += ["", f"ratio ours / diffusers: {summary['seconds']['ours'] / summary['seconds']['diffusers']:.3f}"]
    if summary["micro_batch"]:
        name = f"ours, micro_batch {summary['micro_batch']}"
        lines.append(f"ratio micro_batch {summary['micro_batch']} / whole batch: "
                     f"{summary['seconds'][name] / summary['seconds']['ours']:.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, help="image size (default: the config's data.image_size, else 32)")
    p.add_argument("--config", type=Path, help="use this config's UNet (model.unet) instead of the digits UNet")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=0, help="also time ours with this micro_batch (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the timings and the table to this JSON file")
    args = p.parse_args()
    if args.config:
        cfg = yaml.safe_load(args.config.read_text())
        if cfg.get("data", {}).get("channels", 3) != 3:
            p.error(f"--config {str(args.config)!r}: diffusers' KarrasVePipeline needs 3 channels")
        size = args.size or cfg.get("data", {}).get("image_size", 32)
        config = unet_config(size, 3, cfg.get("model", {}).get("unet"))
    else:
        size = args.size or 32
        config = default_unet_config(size, 3)
    torch.manual_seed(0)
    unet = UNet2DModel(**config).to(args.device).eval()
    pipe = KarrasVePipeline(unet=unet, scheduler=KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    denoiser = VEDenoiser(unet)
    shape = (args.batch, 3, size, size)

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
    summary = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device,
        "config": str(args.config) if args.config else None, "shape": list(shape), "steps": args.steps,
        "nfe": 2 * args.steps - 1, "repeats": args.repeats, "micro_batch": args.micro_batch,
        "unet_params_m": sum(q.numel() for q in unet.parameters()) / 1e6,
        "seconds": {k: min(v) for k, v in times.items()}, "all_seconds": times,
    }
    summary["table"] = table(summary)
    print(summary["table"])
    if args.json:
        save_atomic(args.json, lambda f: f.write(json.dumps(summary, indent=2).encode()))


if __name__ == "__main__":
    main()
