"""Bits/dim of the held-out digits: the trained VE model (probability-flow ODE) next to scikit-learn GaussianMixtures.

    python scripts/benchmark_likelihood.py --ckpt_path runs/digits/checkpoints/last.ckpt --steps 64 --probes 1

Same images (the held-out split of the checkpoint's own data settings, as `kve likelihood` takes it), same
quantization (17 levels in [-1, 1], w = 1/8), same dequantization draws (per-image generators seeded by the image's
index, as `kve test` and `kve likelihood` draw them), same formula: bpd = (-log p(y + w (u - 1/2)) / ln 2 - d log2
w) / d. The mixtures (full covariance, several component counts) are fit on the training split, dequantized with
fresh uniform draws (``--fit-draws`` copies of each image), so that their densities are densities of dequantized
data like the model's. Prints a markdown table with standard errors and the uniform baseline log2(17).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sklearn.mixture import GaussianMixture

from kve_lightning.cli.common import DataSource, load_model
from kve_lightning.likelihood import bits_per_dim_per_image, index_generators, mean_and_stderr
from kve_lightning.sampling import rand_per_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a `kve fit` checkpoint of the digits config")
    p.add_argument("--steps", type=int, default=64, help="RK4 steps of the ODE (4 NFE each)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image")
    p.add_argument("--components", default="1,5,10,20,40", help="GaussianMixture component counts")
    p.add_argument("--fit-draws", type=int, default=4, help="dequantized copies of each training image to fit on")
    args = p.parse_args()

    model = load_model(args.ckpt_path, None, torch.device("cpu"))  # its EMA denoiser, frozen, and its trained noise range
    data = DataSource().data_module(model, held_out=True)  # the checkpoint's own data settings and split
    data.setup("fit")
    levels, w = data.levels, 2 / (data.levels - 1)
    test = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    train = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    d = test[0].numel()

    rows = {}
    start = time.perf_counter()
    rows[f"VE score model (ODE, {args.steps} RK4 steps = {4 * args.steps} NFE, {args.probes} probe)"] = (
        bits_per_dim_per_image(model.denoiser, test, levels, generator=index_generators(range(len(test))),
                               steps=args.steps, num_probes=args.probes, sigma_min=model.trained[0],
                               sigma_max=model.trained[1]))
    model_seconds = time.perf_counter() - start

    # the same dequantization draws as the model's: the first uniform draw of each image's generator
    gens = index_generators(range(len(test)))
    x_test = (test + w * (rand_per_row(test.shape, gens, "cpu", test.dtype) - 0.5)).flatten(1).double().numpy()
    g = torch.Generator().manual_seed(12345)
    fit = torch.cat([train + w * (torch.rand(train.shape, generator=g) - 0.5) for _ in range(args.fit_draws)])
    for k in (int(c) for c in args.components.split(",")):
        gmm = GaussianMixture(k, covariance_type="full", random_state=0, max_iter=500).fit(fit.flatten(1).numpy())
        log_p = torch.from_numpy(gmm.score_samples(x_test))
        rows[f"GaussianMixture, {k} full-covariance components"] = (-log_p / math.log(2) - d * math.log2(w)) / d

    print(f"Held-out digits: {len(test)} images of {d} pixels, {levels} levels; training split {len(train)} images; "
          f"model wall time {model_seconds:.0f} s ({model_seconds / len(test):.2f} s/image)\n")
    print("| model | bits/dim | ± s.e. |")
    print("|---|---|---|")
    for name, values in rows.items():
        mean, se = mean_and_stderr(values.double())
        print(f"| {name} | {mean:.3f} | {se:.3f} |")
    print(f"| uniform over the {levels} levels | {math.log2(levels):.3f} | 0 |")


if __name__ == "__main__":
    main()
