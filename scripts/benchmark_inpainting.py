"""Inpainting against the exact conditional of a Gaussian mixture: replacement alone and RePaint resampling vs NFE.

    python scripts/benchmark_inpainting.py [--observations 8] [--n 1000] [--out-md benchmarks/inpainting.md]

The mixture: three isotropic components in 1 x 4 x 4 (weights 0.5/0.3/0.2, stds 0.1/0.2/0.15, distinct top and
bottom halves). Each observation is the top half of one draw from the mixture; its exact conditional is again a
mixture, with weights proportional to w_k N(y_o; mu_k,o, s_k^2 I) and bottom halves N(mu_k,u, s_k^2 I).
``inpaint_karras_ve`` completes ``--n`` copies of each observation (one generator for the batch); reported per
(steps N, resample R), averaged over the observations: the largest error in the conditional component weights
(completions assigned to the nearest bottom-half mean) and the sliced W2 of the completed bottom halves to as many
exact conditional draws, next to the sliced W2 between two sets of exact draws (the metric's noise floor).
NFE = R (2N - 1). Writes a markdown table (``--out-md``) and a plot beside it (matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmark_samplers import sliced_w2
from kve_lightning.exact import GaussianMixture
from kve_lightning.sampling import inpaint_karras_ve

D = 4
STEPS = (4, 9, 18, 50)
RESAMPLE = (1, 2, 4, 8)


def mixture() -> GaussianMixture:
    means = torch.stack([torch.full((1, D, D), 0.5), torch.full((1, D, D), -0.5),
                         torch.cat([torch.full((1, D, D // 2), 0.5), torch.full((1, D, D // 2), -0.5)], 2)])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, torch.tensor([0.1, 0.2, 0.15]))


def exact_conditional(gm: GaussianMixture, y_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [K], bottom-half means [K, d_u], stds [K]) of the mixture given the top half y_o [1, 1, D/2, D]."""
    mu_o = gm.means[:, :, : D // 2].flatten(1)
    var = gm.stds**2
    log_w = gm.weights.log() - 0.5 * ((y_o.flatten(1) - mu_o) ** 2).sum(1) / var - 0.5 * mu_o.shape[1] * var.log()
    return torch.softmax(log_w, 0), gm.means[:, :, D // 2:].flatten(1), gm.stds


def exact_draws(weights, mu_u, stds, n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return mu_u[k] + stds[k, None] * torch.randn((n, mu_u.shape[1]), generator=generator, dtype=torch.float64)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--observations", type=int, default=8, help="observed top halves, each a draw of the mixture")
    p.add_argument("--n", type=int, default=1000, help="completions (and exact draws) per observation")
    p.add_argument("--out-md", default=None, help="write the table here (and the plot beside it, .png)")
    args = p.parse_args(argv)
    gm = mixture()
    g = torch.Generator().manual_seed(0)
    observations = gm.sample(args.observations, generator=g)[0][:, :, : D // 2]
    directions = torch.nn.functional.normalize(torch.randn(256, D * D // 2, generator=g, dtype=torch.float64), dim=1)
    mask = torch.zeros(1, 1, D, D, dtype=torch.bool)
    mask[..., : D // 2, :] = True
    floor, rows = [], []
    conditionals = [exact_conditional(gm, y_o[None]) for y_o in observations]
    for cond in conditionals:
        floor.append(sliced_w2(exact_draws(*cond, args.n, g), exact_draws(*cond, args.n, g), directions))
    for resample in RESAMPLE:
        for steps in STEPS:
            errors, w2 = [], []
            for y_o, (weights, mu_u, stds) in zip(observations, conditionals):
                y = torch.zeros(args.n, 1, D, D, dtype=torch.float64)
                y[:, :, : D // 2] = y_o
                x = inpaint_karras_ve(gm.denoiser, y, mask, resample=resample, num_steps=steps,
                                      generator=torch.Generator().manual_seed(1))
                completed = x[:, :, D // 2:].flatten(1)
                nearest = torch.cdist(completed, mu_u).argmin(1)
                errors.append((torch.bincount(nearest, minlength=3).double() / args.n - weights).abs().max().item())
                w2.append(sliced_w2(completed, exact_draws(weights, mu_u, stds, args.n, g), directions))
            rows.append(dict(resample=resample, steps=steps, nfe=resample * (2 * steps - 1),
                             weight_error=sum(errors) / len(errors), sliced_w2=sum(w2) / len(w2)))
            print(rows[-1], file=sys.stderr)
    lines = [f"Exact 3-component mixture in 1x4x4, top half observed ({args.observations} observations, {args.n} "
             f"completions each); sliced W2 noise floor (exact vs exact): {sum(floor) / len(floor):.4f}. Produced by "
             f"`python scripts/benchmark_inpainting.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| resample R | steps N | NFE | max component-weight error | sliced W2 |", "|---|---|---|---|---|"]
    # (the plot draws a weight error of 0 at 1e-4, its log axis' floor)
    lines += [f"| {r['resample']} | {r['steps']} | {r['nfe']} | {r['weight_error']:.4f} | {r['sliced_w2']:.4f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for resample in RESAMPLE:
            sel = [r for r in rows if r["resample"] == resample]
            label = "replacement" if resample == 1 else f"RePaint R = {resample}"
            axes[0].loglog([r["nfe"] for r in sel], [max(r["weight_error"], 1e-4) for r in sel], "o-", label=label)
            axes[1].loglog([r["nfe"] for r in sel], [r["sliced_w2"] for r in sel], "o-", label=label)
        axes[0].axhline(0.02, color="gray", ls="--", label="2 % goal")
        axes[1].axhline(sum(floor) / len(floor), color="gray", ls="--", label="noise floor")
        for ax, title in zip(axes, ("max conditional component-weight error", "sliced W2 of the completions")):
            ax.set_xlabel("NFE")
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.out_md).with_suffix(".png"), dpi=100)
    return rows


if __name__ == "__main__":
    main()
