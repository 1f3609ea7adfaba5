"""Training throughput of KarrasVeModule under Lightning vs a plain PyTorch loop doing the same work.

    python scripts/benchmark_train.py --steps 300 --repeats 2

Both sides: the digits config's UNet, batch and data, the same DSM loss, AdamW with the warm-up schedule and the
EMA update after every step. Lightning also logs train/loss to TensorBoard, as `kve fit` does. Each measurement
runs in its own process (peak RSS is per process); modes alternate to spread machine noise. Prints a markdown
table with img/s, the ratio Lightning / plain, and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def build(config: Path):
    from kve_lightning import ImageDataModule, KarrasVeModule

    cfg = yaml.safe_load(config.read_text())
    data = ImageDataModule(**cfg.get("data", {}))
    model_cfg = cfg.get("model", {}) | dict(image_size=data.hparams.image_size, channels=data.hparams.channels)
    return KarrasVeModule(**model_cfg), data


def run_plain(config: Path, steps: int, warmup: int) -> float:
    from torch.optim.swa_utils import AveragedModel

    from kve_lightning.ema import ema_update
    from kve_lightning.module import dsm_loss

    module, data = build(config)
    hp = module.hparams
    data.setup("fit")
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    ema = AveragedModel(module, multi_avg_fn=partial(ema_update, decay=hp.ema_decay, warmup=hp.ema_warmup),
                        use_buffers=True)
    module.train()
    step, start = 0, None
    while step < steps:
        for y in data.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            u = torch.rand(y.shape[0])
            sigma = hp.sigma_min * (hp.sigma_max / hp.sigma_min) ** u
            loss = dsm_loss(module.denoiser, y, sigma, torch.randn_like(y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(module)
            step += 1
            if step == steps:
                break
    return (steps - warmup) * data.hparams.batch_size / (time.perf_counter() - start)


def run_lightning(config: Path, steps: int, warmup: int) -> float:
    import lightning as L

    module, data = build(config)
    times = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                times["start"] = time.perf_counter()

        def on_train_end(self, trainer, *args):
            times["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                            default_root_dir=tmp, callbacks=[Clock()])
        trainer.fit(module, data)
    return (steps - warmup) * data.hparams.batch_size / (times["end"] - times["start"])


def child(args) -> None:
    torch.manual_seed(0)
    fn = run_plain if args.mode == "plain" else run_lightning
    img_s = fn(Path(args.config), args.steps, args.warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "img_per_s": img_s, "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", choices=["plain", "lightning"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)
    results = {"plain": [], "lightning": []}
    for r in range(args.repeats):
        for mode in ("plain", "lightning"):
            cmd = [sys.executable, __file__, "--mode", mode, "--config", args.config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
            print(f"repeat {r} {mode}: {results[mode][-1]['img_per_s']:.1f} img/s", file=sys.stderr)
    best = {m: max(x["img_per_s"] for x in v) for m, v in results.items()}
    peak = {m: max(x["peak_rss_mb"] for x in v) for m, v in results.items()}
    print("| loop | img/s (best of {}) | peak RSS (MB) |".format(args.repeats))
    print("|---|---|---|")
    for m in ("plain", "lightning"):
        print(f"| {m} | {best[m]:.1f} | {peak[m]:.0f} |")
    print(f"\nratio lightning / plain: {best['lightning'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
