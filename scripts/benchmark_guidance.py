"""Requested-class accuracy and per-class FID-digits of a conditional digits model against the guidance weight w.

    python scripts/benchmark_guidance.py --ckpt_path runs/digits_cond/checkpoints/last.ckpt --scales 1,1.5,2,3 \
        --per_class 100 [--guide_ckpt_path EARLY.ckpt] [--guidance_sigma_max 5] --out-md guidance.md [--plot g.png]

For every w of ``--scales`` it samples ``--per_class`` images of each class (seeds 0 .. per_class - 1 for every class
and every w: common random numbers), classifier-free guided (or autoguided with ``--guide_ckpt_path``) at the
checkpoint's sampler settings. The **requested-class accuracy** is the fraction a classifier of the real digits
assigns to the requested class: scikit-learn's logistic regression on the 80 % training part of the fixed stratified
split of ``metrics.digits_split`` (its accuracy on the other 20 % is printed beside, the ceiling), fitted on pixels
in [-1, 1]. **Per-class FID-digits** is FID-digits of a class's samples against all of that class's 1,797-digit
images (about 180): small counts, so compare rows with each other. The table also gives the NFE per image
(``guidance.guided_nfe``: two network evaluations per step inside the guidance interval). Writes a markdown table
(``--out-md``, the rows as JSON beside it) and, with ``--plot``, accuracy and mean per-class FID against w.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.guidance import guided_nfe
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import digits_split, digits_with_labels, fid_from_images


def digits_classifier():
    """Logistic regression of the real digits' pixels, and its held-out accuracy (``metrics.digits_split``)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = digits_split()
    classifier = LogisticRegression(max_iter=2000).fit(x_train.flatten(1).numpy(), y_train.numpy())
    return classifier, float(classifier.score(x_test.flatten(1).numpy(), y_test.numpy()))


def measure(module: KarrasVeModule, scale: float, per_class: int, classifier, batch_size: int, **settings) -> dict:
    """One row: the samples of every class at guidance weight ``scale``, their accuracy and per-class FID."""
    classes = module.hparams.num_classes
    seeds = [s for _ in range(classes) for s in range(per_class)]
    labels = [c for c in range(classes) for _ in range(per_class)]
    batches = [module.sample(seeds[i:i + batch_size], labels=labels[i:i + batch_size], guidance_scale=scale,
                             **settings).clamp(-1, 1)
               for i in tqdm(range(0, len(seeds), batch_size), desc=f"w={scale:g}", unit="batch")]
    samples = torch.cat(batches)
    predicted = torch.from_numpy(classifier.predict(samples.flatten(1).numpy()))
    requested = torch.tensor(labels)
    real, real_labels = digits_with_labels()
    fids = {str(c): fid_from_images(real[real_labels == c], samples[requested == c]) for c in range(classes)}
    nfe = guided_nfe(module.sampler.replace(guidance_scale=scale, **settings))
    return {"w": scale, "accuracy": (predicted == requested).double().mean().item(), "nfe": nfe,
            "fid_per_class": fids, "fid_mean": sum(fids.values()) / classes}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a conditional digits checkpoint (num_classes 10)")
    p.add_argument("--guide_ckpt_path", default=None, help="a weaker model that guides (autoguidance)")
    p.add_argument("--scales", default="1,1.5,2,3", help="guidance weights w, comma-separated")
    p.add_argument("--per_class", type=int, default=100, help="samples per class and w")
    p.add_argument("--guidance_sigma_min", type=float, default=None, help="the guidance interval's bottom")
    p.add_argument("--guidance_sigma_max", type=float, default=None, help="the guidance interval's top")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--out-md", default=None, help="write the table here (and the rows as .json beside it)")
    p.add_argument("--plot", default=None, help="write accuracy and mean per-class FID against w here (PNG)")
    args = p.parse_args(argv)
    guide = {} if args.guide_ckpt_path is None else {"guide_ckpt_path": args.guide_ckpt_path}
    module = KarrasVeModule.from_checkpoint(args.ckpt_path, **guide)
    if not module.hparams.num_classes:
        raise SystemExit(f"--ckpt_path {args.ckpt_path!r} is an unconditional model (num_classes 0)")
    interval = {k: v for k, v in (("guidance_sigma_min", args.guidance_sigma_min),
                                  ("guidance_sigma_max", args.guidance_sigma_max)) if v is not None}
    classifier, ceiling = digits_classifier()
    rows = [measure(module, float(w), args.per_class, classifier, args.batch_size, **interval)
            for w in args.scales.split(",")]
    lines = [f"classifier: logistic regression of the real digits, held-out accuracy {ceiling:.3f}; "
             f"{args.per_class} samples per class; {'autoguidance' if guide else 'classifier-free guidance'}"
             f"{f', interval {interval}' if interval else ''}", "",
             "| w | NFE | requested-class accuracy | mean per-class FID-digits | worst class (FID) |",
             "|---|---|---|---|---|"]
    for row in rows:
        worst = max(row["fid_per_class"], key=row["fid_per_class"].get)
        lines.append(f"| {row['w']:g} | {row['nfe']} | {row['accuracy']:.3f} | {row['fid_mean']:.2f} | "
                     f"{worst} ({row['fid_per_class'][worst]:.2f}) |")
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
        Path(args.out_md).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, left = plt.subplots(figsize=(5, 3.5))
        scales = [r["w"] for r in rows]
        left.plot(scales, [r["accuracy"] for r in rows], "o-", color="C0")
        left.set_xlabel("guidance weight w")
        left.set_ylabel("requested-class accuracy", color="C0")
        right = left.twinx()
        right.plot(scales, [r["fid_mean"] for r in rows], "s--", color="C1")
        right.set_ylabel("mean per-class FID-digits", color="C1")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
