"""Inpainting against the exact conditional of a Gaussian mixture: replacement alone and RePaint resampling vs NFE.

    python scripts/benchmark_inpainting.py [--observations 8] [--n 1000] [--out-md benchmarks/inpainting.md]

The mixture: three isotropic components in 1 x 4 x 4 (weights 0.5/0.3/0.2, stds 0.1/0.2/0.15, distinct top and
bottom halves). Each observation is the top half of one draw from the mixture; its exact conditional is again a
mixture, with weights proportional to w_k N(y_o; mu_k,o, s_k^2 I) and bottom halves N(mu_k,u, s_k^2 I).
``inpaint_karras_ve`` completes ``--n`` copies of each observation (one generator for the batch); reported per
(steps N, resample R, guidance w), averaged over the observations: the largest error in the conditional component weights
(completions assigned to the nearest bottom-half mean) and the sliced W2 of the completed bottom halves to as many
exact conditional draws, next to the sliced W2 between two sets of exact draws (the metric's noise floor).
NFE = R (2N - 1). Writes a markdown table (``--out-md``) and a plot beside it (matplotlib).

    python scripts/benchmark_inpainting.py --ckpt_path runs/digits/checkpoints/last.ckpt [--seeds 2] [--out-md F]

With ``--ckpt_path``, a trained digits model on real images instead: the bottom half of every held-out digit (the split
checkpoint's `kve fit` validated on) is masked and completed ``--seeds`` times per (N, R, w); the completions are
classified by the shipped digits feature network (metrics.py, its ``head``) and the fraction whose class is the
original digit's is reported, with its standard error over digits, next to: nearest-neighbour completion (the
bottom half of the training digit whose top half is closest in L2), the top half alone (bottom half blank), and
the classifier on the original digits (the ceiling). Each sampler row is repeated with the exact denoiser of the
training digits (a mixture of N(digit, 0.05^2 I)) in place of the model: the exact conditional of that mixture
is, in effect, the nearest neighbour's completion, so the gap between those rows and nearest neighbour is the
conditioning method's alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmark_samplers import sliced_w2
from kve_lightning.cli.common import DataSource, load_model, load_yaml, sampler_section
from kve_lightning.exact import GaussianMixture
from kve_lightning.likelihood import mean_and_stderr
from kve_lightning.masks import complete, parse_mask
from kve_lightning.metrics import digits_feature_net, digits_with_labels
from kve_lightning.sampling import inpaint_karras_ve

D = 4
STEPS = (4, 9, 18, 50)
METHODS = ((1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (1, 1.0), (2, 1.0), (1, 30.0))  # (resample R, guidance w)
# the digits measure: (R, w, steps N)
DIGITS_METHODS = ((1, 0.0, 9), (1, 0.0, 18), (1, 0.0, 50), (2, 0.0, 18), (2, 0.0, 50), (4, 0.0, 18), (4, 0.0, 50),
                  (1, 1.0, 18), (2, 1.0, 18), (1, 3.0, 18), (1, 10.0, 18), (1, 30.0, 18))


def method_name(resample: int, guidance: float) -> str:
    name = "replacement" if resample == 1 else f"RePaint R = {resample}"
    return name + (f", guidance w = {guidance:g}" if guidance else "")


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
    p.add_argument("--ckpt_path", default=None, help="a trained digits checkpoint: the held-out digits measure instead")
    p.add_argument("--seeds", type=int, default=2, help="with --ckpt_path: completions per held-out digit")
    p.add_argument("--config", default=None, help="with --ckpt_path: sampler settings over the model's (the model: section of `kve "
                                           "tune`'s output or of a `kve fit` config)")
    args = p.parse_args(argv)
    command = f"`python scripts/benchmark_inpainting.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    if args.ckpt_path:
        return digits(args, command)
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
    for resample, guidance in METHODS:
        for steps in STEPS:
            errors, w2 = [], []
            for y_o, (weights, mu_u, stds) in zip(observations, conditionals):
                y = torch.zeros(args.n, 1, D, D, dtype=torch.float64)
                y[:, :, : D // 2] = y_o
                x = inpaint_karras_ve(gm.denoiser, y, mask, resample=resample, guidance=guidance, num_steps=steps,
                                      generator=torch.Generator().manual_seed(1))
                completed = x[:, :, D // 2:].flatten(1)
                nearest = torch.cdist(completed, mu_u).argmin(1)
                errors.append((torch.bincount(nearest, minlength=3).double() / args.n - weights).abs().max().item())
                w2.append(sliced_w2(completed, exact_draws(weights, mu_u, stds, args.n, g), directions))
            rows.append(dict(resample=resample, guidance=guidance, steps=steps, nfe=resample * (2 * steps - 1),
                             weight_error=sum(errors) / len(errors), sliced_w2=sum(w2) / len(w2)))
            print(rows[-1], file=sys.stderr)
    lines = [f"Exact 3-component mixture in 1x4x4, top half observed ({args.observations} observations, {args.n} "
             f"completions each); sliced W2 noise floor (exact vs exact): {sum(floor) / len(floor):.4f}. Produced by "
             f"{command}.", "",
             "NFE counts network evaluations; with guidance each also costs a backward pass (about 2 more).", "",
             "| resample R | guidance w | steps N | NFE | max component-weight error | sliced W2 |",
             "|---|---|---|---|---|---|"]
    # (the plot draws a weight error of 0 at 1e-4, its log axis' floor)
    lines += [f"| {r['resample']} | {r['guidance']:g} | {r['steps']} | {r['nfe']} | {r['weight_error']:.4f} | "
              f"{r['sliced_w2']:.4f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for resample, guidance in METHODS:
            sel = [r for r in rows if (r["resample"], r["guidance"]) == (resample, guidance)]
            label = method_name(resample, guidance)
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


def sampler_config(path: str) -> dict:
    """The ``model:`` sampler settings of a YAML file as `kve sample --config` reads them (`kve tune`'s output, or a
    `kve fit` config whose other sections and training settings are dropped)."""
    config = load_yaml(Path(path).read_text())
    model = sampler_section(config, set()).get("model", {}) if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise SystemExit(f"--config {path!r}: expected a mapping `model:` of sampler settings")
    return model


def digits(args: argparse.Namespace, command: str) -> list[dict]:
    """The held-out digits measure (see the module docstring)."""
    model = load_model(args.ckpt_path, None, torch.device("cpu"))
    base = model.settings_with(sampler_config(args.config) if args.config else {})
    data = DataSource().data_module(model, held_out=True)  # the checkpoint's own data settings and split
    data.setup("fit")
    images, labels = digits_with_labels()
    train, held_out = images[data.train_set.indices], data.val_set.indices
    x, y = images[held_out], labels[held_out]
    mask = parse_mask("bottom", model.image_size)
    net = digits_feature_net()

    def correct(completed: torch.Tensor) -> torch.Tensor:
        return (net.head(net(completed)).argmax(1) == y.repeat(len(completed) // len(y))).double()

    def top_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist((a * mask).flatten(1), (b * mask).flatten(1))

    nearest = train[top_distance(x, train).argmin(1)]
    # the exact denoiser of the training digits (each a N(digit, 0.05^2 I) component): its exact conditional given a
    # top half is, in effect, the nearest neighbour's bottom half, so this row measures the conditioning method alone
    empirical = GaussianMixture(torch.full((len(train),), 1 / len(train)), train.double(),
                                torch.full((len(train),), 0.05))
    exact_denoiser = lambda z, sigma: empirical.denoiser(z.double(), sigma).to(z.dtype)  # noqa: E731
    references = {"original digits (classifier ceiling)": correct(x),
                  "nearest neighbour (closest training top half)": correct(torch.where(mask, x, nearest)),
                  "top half alone (bottom blank)": correct(torch.where(mask, x, -torch.ones_like(x)))}
    rows = []
    for name, hits in references.items():
        rows.append(dict(method=name, nfe=0, **dict(zip(("accuracy", "stderr"), mean_and_stderr(hits)))))
        print(rows[-1], file=sys.stderr)
    seeds = [s for s in range(args.seeds) for _ in range(len(x))]  # row k: digit k % len(x), seed k // len(x)
    rows_x = x.repeat(args.seeds, 1, 1, 1)
    for resample, guidance, steps in DIGITS_METHODS:
        settings = base.replace(num_steps=steps)
        completed = torch.cat([complete(model.denoiser, rows_x[k:k + 64], mask, seeds[k:k + 64], settings, resample,
                                        guidance) for k in range(0, len(seeds), 64)])
        exact = complete(exact_denoiser, rows_x, mask, seeds, settings, resample, guidance)
        method = method_name(resample, guidance)
        for name, images in ((method, completed), (f"{method}, exact training-set denoiser", exact)):
            hits = correct(images).view(args.seeds, len(x)).mean(0)  # per digit: the fraction of its completions
            rows.append(dict(method=name, nfe=resample * (2 * steps - 1),
                             **dict(zip(("accuracy", "stderr"), mean_and_stderr(hits)))))
            print(rows[-1], file=sys.stderr)
    lines = [f"Held-out digits ({len(x)}), bottom half masked, {args.seeds} completions each; the fraction classified "
             f"as the original digit by the shipped digits feature network, ± its standard error over digits. "
             f"Checkpoint `{Path(args.ckpt_path).name}`, settings {base.to_dict()}; produced by {command}.", "",
             "| method | NFE | correct class |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['nfe'] or '-'} | {100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} % |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
