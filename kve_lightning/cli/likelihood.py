"""``kve likelihood``: bits/dim of held-out images through the probability-flow ODE."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Literal

import torch
from tqdm import tqdm

from kve_lightning.cli.common import DataSource, at_least, check_outputs, load_model, parse_device, writable_file
from kve_lightning.likelihood import (bits_per_dim_per_image, class_bits_per_dim, classify, index_generators,
                                      mean_and_stderr, with_labels)
from kve_lightning.sampling import MAX_STEPS
from kve_lightning.storage import save_atomic

MAX_PROBES = 1000

DOC = """Bits per dimension of held-out images under a trained model, through the probability-flow ODE.

    kve likelihood --ckpt_path runs/digits/checkpoints/last.ckpt --split val --probes 1 --ode_steps 64 \\
        --out report.json

The images are the data module's (--data.*, by default the checkpoint's: the same held-out split it was validated
on), its held-out split (--split val, never trained on) or all of them, the first --n. Each image is dequantized
uniformly inside its bin of the data's quantization (17 levels for digits, 256 otherwise) and its log-density
integrated over the model's trained noise range with RK4 in ln(sigma) and Hutchinson's divergence estimate
(kve_lightning/likelihood.py); the report gives bits/dim with its standard error over images, the NFE per image and
the wall time. `kve test` computes the same on the held-out split with Lightning.

A conditional model gives log p(x | c) with each image's own label, and the report adds bits/dim per class; with
--classify true it is also a generative classifier, argmax_c log p(x | c) + log p(c) (p(c) uniform), and the
report gives its accuracy (K ODE solves per image, the same dequantization and probes for every class).
"""

def run(out: str, ckpt_path: str | None = None, pipeline: str | None = None, data: DataSource = DataSource(),
        split: Literal["val", "all"] = "val", n: int | None = None, probes: int = 1, ode_steps: int = 64,
        batch_size: int = 64, device: str | None = None, overwrite: bool = False, classify_images: bool = False
        ) -> None:
    """Write the bits/dim report of a split to ``out``.

    Args:
        out: the JSON report to write.
        ckpt_path: a checkpoint written by `kve fit` (read weights-only).
        pipeline: a folder written by `kve export`, instead of ``ckpt_path``.
        data: the data set and its split.
        split: "val" (the held-out images) or "all".
        n: use the first n images of the split (default: all).
        probes: Hutchinson probes per image (at most 1000; the estimate's error falls as 1/sqrt(probes)).
        ode_steps: RK4 steps in ln(sigma), 4 network evaluations each (at most 100,000).
        batch_size: images integrated at once.
        device: the torch device (default: cuda if available, else cpu).
        overwrite: replace an existing ``out``.
        classify_images: a conditional model's generative-classifier accuracy too (K times the NFE).
    """
    for flag, value in (("--probes", probes), ("--ode_steps", ode_steps), ("--batch_size", batch_size),
                        ("--n", 1 if n is None else n)):
        at_least(flag, value, 1)
    if probes > MAX_PROBES or ode_steps > MAX_STEPS:
        raise ValueError(f"need --probes <= {MAX_PROBES} and --ode_steps <= {MAX_STEPS:,}, got --probes {probes}, "
                         f"--ode_steps {ode_steps}")
    check_outputs({"--out": out}, {"--ckpt_path": ckpt_path, "--pipeline": pipeline})
    path = writable_file(out, "--out", overwrite)
    where = parse_device(device)
    trained = load_model(ckpt_path, pipeline, where)
    module = data.data_module(trained, held_out=split == "val")
    if split == "val":
        module.setup("fit")
    images = module.val_set if split == "val" else module.full_dataset()
    count = len(images) if n is None else min(n, len(images))
    num_classes = trained.denoiser.num_classes
    if classify_images and not num_classes:
        raise ValueError("--classify_images true needs a conditional model; this one has num_classes=0")
    values, labels, predicted = [], [], []
    start = time.perf_counter()
    with tqdm(total=count, unit="img", desc="bits/dim") as bar:
        for first in range(0, count, batch_size):
            index = list(range(first, min(first + batch_size, count)))
            batch = torch.stack([images[i][0] for i in index]).to(where)
            batch_labels = torch.tensor([int(images[i][1]) for i in index]) if num_classes else None
            ode = dict(steps=ode_steps, num_probes=probes, sigma_min=trained.trained[0], sigma_max=trained.trained[1])
            if classify_images:
                per_class = class_bits_per_dim(trained.denoiser, batch, module.levels, index, num_classes, **ode)
                values.append(per_class.gather(1, batch_labels[:, None])[:, 0])
                predicted.append(classify(per_class, batch[0].numel()))
            else:
                values.append(bits_per_dim_per_image(with_labels(trained.denoiser, batch_labels), batch, module.levels,
                                                     generator=index_generators(index), **ode))
            labels.append(batch_labels)
            bar.update(len(index))
    wall = time.perf_counter() - start
    mean, stderr = mean_and_stderr(torch.cat(values))
    hp = module.hparams
    report = {"bits_per_dim": mean, "stderr": stderr if math.isfinite(stderr) else None,  # one image: none
              "images": count, "split": split, "dataset": hp.dataset, "split_seed": hp.split_seed,
              "val_fraction": hp.val_fraction, "levels": module.levels, "ode_steps": ode_steps, "probes": probes,
              "nfe_per_image": 4 * ode_steps, "wall_seconds": round(wall, 3),
              "seconds_per_image": round(wall / count, 4), "sigma_min": trained.trained[0],
              "sigma_max": trained.trained[1], "model": trained.source}
    if num_classes:
        labels, bpd = torch.cat(labels), torch.cat(values)
        report["bits_per_dim_per_class"] = {str(c): mean_and_stderr(bpd[labels == c])[0]
                                            for c in range(num_classes) if (labels == c).any()}
        report["conditional"] = "log p(x | c), each image with its own label"
    if classify_images:
        report["classifier_accuracy"] = (torch.cat(predicted) == labels).double().mean().item()
        report["nfe_per_image"] = 4 * ode_steps * num_classes
    payload = (json.dumps(report, indent=2) + "\n").encode()
    save_atomic(path, lambda f: f.write(payload))
    accuracy = f", classifier accuracy {report['classifier_accuracy']:.3f}" if classify_images else ""
    print(f"{mean:.4f} +- {stderr:.4f} bits/dim over {count} images{accuracy} ({report['nfe_per_image']} NFE each, "
          f"{wall:.1f} s): {path}", file=sys.stderr)
