"""Post-hoc EMA on a short digits run: reconstructed EMAs against EMAs of the same relative std tracked directly.

    python scripts/benchmark_phema.py [--steps 300] [--every 25] [--targets 0.03,0.07,0.15,0.2]

Trains the default job's model (configs/digits.yaml: its UNet, learning rate, warm-up, EMA, batch size; no grid)
for --steps optimizer steps with two ``PostHocEMA`` callbacks: one tracking sigma_rel 0.05 and 0.10 with a snapshot
every --every steps, one tracking each --targets std directly (snapshot at the end). For each target it reports
the profile error e of the least-squares reconstruction from the 0.05/0.10 snapshots, the largest absolute and the
relative L2 error of the reconstructed weights against the directly tracked ones, and, for scale, the relative L2
distance between the directly tracked EMA and the 0.05 one at the same step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from safetensors.torch import load_file

from kve_lightning import ImageDataModule, KarrasVeModule
from kve_lightning.lit.ema import PostHocEMA
from kve_lightning.phema import combine, list_snapshots, reconstruction

REPO = Path(__file__).resolve().parents[1]


def flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].double().flatten() for n in names])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--every", type=int, default=25, help="steps between 0.05/0.10 snapshots (default 25)")
    p.add_argument("--targets", default="0.03,0.07,0.15,0.2", help="stds tracked directly and reconstructed")
    args = p.parse_args(argv)
    targets = [float(s) for s in args.targets.split(",")]
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    L.seed_everything(config["seed_everything"])
    data = ImageDataModule(**config["data"])
    if config["model"].get("sigma_max") == "auto":  # what the kve CLI resolves: the training split's largest distance
        config["model"]["sigma_max"] = data.max_pairwise_distance()
    module = KarrasVeModule(**config["model"])  # no sample grid: that is a callback of `kve fit`
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False,
                            limit_val_batches=0, enable_model_summary=False, default_root_dir=tmp, callbacks=[
                                PostHocEMA((0.05, 0.10), snapshot_every_n_steps=args.every),
                                PostHocEMA(targets, snapshot_every_n_steps=args.steps, dirpath=Path(tmp, "direct"))])
        start = time.perf_counter()
        trainer.fit(module, data)
        wall = time.perf_counter() - start
        snapshots = list_snapshots(Path(tmp, "phema"))
        names = [n for n, _ in module.named_parameters()]
        direct = {s.std: flat(load_file(s.path), names) for s in list_snapshots(Path(tmp, "direct"))}
        narrow = flat(load_file(next(s for s in reversed(snapshots) if s.std == 0.05).path), names)
        plans = [reconstruction(snapshots, std) for std in targets]
        rebuilt = [flat(w, names) for w in combine(snapshots, [x for x, _, _ in plans])]
    print(f"{args.steps} steps in {wall:.0f} s, {len(snapshots)} snapshots (0.05 and 0.10 every {args.every} steps), "
          f"{narrow.numel():,} weights\n")
    print("| sigma_rel | profile error e | max abs error | relative L2 error | relative L2 distance to the 0.05 EMA |")
    print("|---|---|---|---|---|")
    for std, (_, error, _), r in zip(targets, plans, rebuilt):
        diff = r - direct[std]
        print(f"| {std:g} | {error:.4f} | {diff.abs().max():.2e} | {(diff.norm() / direct[std].norm()):.2e} | "
              f"{((direct[std] - narrow).norm() / direct[std].norm()):.2e} |")


if __name__ == "__main__":
    main()
