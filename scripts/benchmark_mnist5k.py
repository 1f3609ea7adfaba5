"""Requested-class accuracy and a per-class sample grid of a conditional mnist5k model (configs/mnist5k.yaml).

    python scripts/benchmark_mnist5k.py --ckpt_path runs/mnist5k/checkpoints/last.ckpt --scales 1,1.5,2 \
        --per_class 100 --grid benchmarks/mnist5k_grid.png [--config runs/mnist5k/tuned35.yaml]

For every w of ``--scales`` it samples ``--per_class`` images of each class (seeds 0 .. per_class - 1 for every class
and every w: common random numbers), classifier-free guided at the checkpoint's sampler settings, or at those of
``--config`` (the ``model:`` sampler settings of a ``kve tune`` output or a ``kve fit`` config; w and the guidance
interval among them, then each w of ``--scales`` on that interval). The
**requested-class accuracy** is the fraction that scikit-learn's logistic regression, fitted on the checkpoint's
training split of the 5,000 real digits (pixels in [-1, 1], at the model's image size), assigns to the requested
class; its accuracy on the held-out split is printed beside, the ceiling. ``--grid`` writes the first 8 samples of
each class at the first w, one row per class, upscaled 4 x.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image

from kve_lightning.guidance import guided_nfe
from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.lit.data import FlipDataset, ImageDataModule
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.sampling import SamplerSettings
from kve_lightning.storage import to_unit


def images_and_labels(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(DataLoader(dataset, batch_size=512))
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a conditional checkpoint of configs/mnist5k.yaml")
    p.add_argument("--scales", default="1,1.5,2", help="guidance weights w, comma-separated")
    p.add_argument("--per_class", type=int, default=100, help="samples per class and w")
    p.add_argument("--grid", default=None, help="write the per-class grid of the first w here (PNG)")
    p.add_argument("--config", default=None, help="a YAML whose model: sampler settings replace the checkpoint's")
    args = p.parse_args(argv)
    module = KarrasVeModule.from_checkpoint(args.ckpt_path)
    if args.config:
        given = yaml.safe_load(Path(args.config).read_text())["model"]
        module.sampler = module.sampler.replace(**{k: v for k, v in given.items()  # sigma_max auto: the model's
                                                   if k in SamplerSettings.__dataclass_fields__ and v != "auto"})
    classes = module.hparams.num_classes
    if not classes:
        raise SystemExit(f"{args.ckpt_path}: an unconditional model (num_classes 0)")
    stored = read_checkpoint(args.ckpt_path).get("datamodule_hyper_parameters") or {}
    data = ImageDataModule(**{k: stored[k] for k in ("dataset", "root", "val_fraction", "split_seed") if k in stored},
                           image_size=module.hparams.image_size, channels=module.hparams.channels)
    data.setup("fit")
    train = data.train_set.dataset if isinstance(data.train_set, FlipDataset) else data.train_set  # no flips
    x_train, y_train = images_and_labels(train)
    x_test, y_test = images_and_labels(data.val_set)
    classifier = LogisticRegression(max_iter=2000).fit(x_train.flatten(1).numpy(), y_train.numpy())
    ceiling = classifier.score(x_test.flatten(1).numpy(), y_test.numpy())
    seeds = list(range(args.per_class)) * classes
    labels = [c for c in range(classes) for _ in range(args.per_class)]
    print(f"classifier: logistic regression on {len(x_train)} training images, {ceiling:.3f} on the {len(x_test)} "
          f"held-out ones\n\n| w | NFE | requested-class accuracy |\n|---|---|---|")
    for k, w in enumerate(float(s) for s in args.scales.split(",")):
        samples = torch.cat([module.sample(seeds[i:i + 250], labels=labels[i:i + 250], guidance_scale=w).clamp(-1, 1)
                             for i in range(0, len(seeds), 250)])
        predicted = torch.from_numpy(classifier.predict(samples.flatten(1).numpy()))
        accuracy = (predicted == torch.tensor(labels)).double().mean().item()
        print(f"| {w:g} | {guided_nfe(module.sampler.replace(guidance_scale=w))} | {accuracy:.3f} |")
        if k == 0 and args.grid:
            rows = samples.unflatten(0, (classes, args.per_class))[:, :8].flatten(0, 1)
            grid = make_grid(to_unit(rows), nrow=min(8, args.per_class), padding=1)
            save_image(torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0], args.grid)


if __name__ == "__main__":
    main()
