"""EDM's Table 2 on the digits: the same UNet, epochs and seeds trained with three objectives, each sampled
deterministically and with tuned churn at several NFE, with both quality measures and bits/dim.

    python scripts/benchmark_objectives.py \
        --row "A: VE recipe=runs/obj-ve/checkpoints/last.ckpt,runs/obj-ve/tuned35.yaml" \
        --row "EDM precond only=runs/obj-precond/checkpoints/last.ckpt,runs/obj-precond/tuned35.yaml" \
        --row "EDM precond + loss=runs/obj-edm/checkpoints/last.ckpt,runs/obj-edm/tuned35.yaml" \
        --out-md benchmarks/objectives.md

Each ``--row LABEL=CKPT[,TUNED.yaml]`` is a checkpoint and, optionally, the `kve tune` output whose ``model:``
settings (S_churn, S_tmin, S_tmax, S_noise, ...) make its "tuned churn" columns. At each NFE (Heun: N = (NFE + 1) / 2
steps) every row samples seeds 0 .. n-1 twice: deterministic (EDM's Algorithm 1: S_churn 0 on the rho = 7 schedule
over the model's sigma range) and with Algorithm 2's churn (its own schedule and settings, or the tuned ones).
Each cell gives FID-digits against all 1,797 digits and FD-pixels (``kve_lightning.metrics.Quality``). Bits/dim:
the checkpoint's held-out digits through the probability-flow ODE (``--ode-steps`` RK4 steps, one Hutchinson probe,
per-image generators), as `kve likelihood` computes it. Writes a markdown table (``--out-md``, the rows as JSON and a
plot of FID-digits and FD-pixels versus NFE beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from kve_lightning.cli.common import DataSource, load_model
from kve_lightning.likelihood import bits_per_dim_per_image, index_generators, mean_and_stderr
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import Quality, digits_fid_floor, digits_images
from kve_lightning.sampling import SamplerSettings

DETERMINISTIC = dict(s_churn=0.0, schedule="edm", rho=7.0)  # EDM's Algorithm 1 on its own schedule


def parse_row(spec: str) -> tuple[str, str, dict]:
    """``LABEL=CKPT[,TUNED.yaml]`` -> (label, checkpoint, the tuned sampler settings but N)."""
    label, _, rest = spec.partition("=")
    ckpt, _, tuned = rest.partition(",")
    if not tuned:
        return label, ckpt, {}
    settings = yaml.safe_load(Path(tuned).read_text())["model"]
    unknown = set(settings) - set(SamplerSettings.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"--row {spec!r}: {sorted(unknown)} are not sampler settings")
    return label, ckpt, {k: v for k, v in settings.items() if k != "num_steps"}


def bits_per_dim(ckpt: str, ode_steps: int) -> tuple[float, float]:
    """Mean bits/dim of the checkpoint's held-out images and its standard error."""
    model = load_model(ckpt, None, torch.device("cpu"))
    data = DataSource().data_module(model, held_out=True)
    data.setup("fit")
    test = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])  # (image, label) items
    bpd = bits_per_dim_per_image(model.denoiser, test, data.levels, generator=index_generators(range(len(test))),
                                 steps=ode_steps, num_probes=1, sigma_min=model.trained[0],
                                 sigma_max=model.trained[1])
    return mean_and_stderr(bpd.double())


def plot(results: list[dict], nfes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, row in enumerate(results):
        for mode, style in (("deterministic", "-o"), ("churn", "--s")):
            for ax, metric in zip(axes, ("fid", "fd_pixels")):
                ax.plot(nfes, [row[mode][str(n)][metric] for n in nfes], style, color=f"C{k}",
                        label=f"{row['label']}, {mode}")
    for ax, name, ticks in zip(axes, ("FID-digits", "FD-pixels (x real)"), ((3, 5, 10, 20, 50), (0.8, 1, 2, 4))):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.minorticks_off()
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True, help="LABEL=CKPT[,TUNED.yaml] (repeatable)")
    p.add_argument("--nfe", default="7,15,35", help="network evaluations per image (odd: Heun)")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--ode-steps", type=int, default=64, help="RK4 steps of the likelihood ODE (0: no bits/dim)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out-md", default=None, help="write the table here (the rows as .json, the plot as .png)")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    rows = [parse_row(spec) for spec in args.row]
    quality = Quality(digits_images(8, 1), args.n)
    seeds = list(range(args.n))
    results = []
    with tqdm(total=len(rows) * 2 * len(nfes) * args.n, unit="img", desc="sampling") as bar:
        for label, ckpt, tuned in rows:
            module = KarrasVeModule.from_checkpoint(ckpt)
            hp = module.hparams
            row = dict(label=label, ckpt=ckpt, precond=hp.precond, sigma_dist=hp.sigma_dist,
                       loss_weight=hp.loss_weight, tuned=tuned)
            for mode, settings in (("deterministic", DETERMINISTIC), ("churn", tuned)):
                row[mode] = {}
                for nfe in nfes:
                    samples = []
                    for k in range(0, len(seeds), args.batch_size):
                        samples.append(module.sample(seeds[k:k + args.batch_size], num_steps=(nfe + 1) // 2,
                                                     **settings).clamp(-1, 1))
                        bar.update(len(samples[-1]))
                    fid, pixels = quality(torch.cat(samples))
                    row[mode][str(nfe)] = dict(fid=fid, fd_pixels=pixels)
            if args.ode_steps:
                row["bpd"], row["bpd_stderr"] = bits_per_dim(ckpt, args.ode_steps)
            results.append(row)
            print(row, file=sys.stderr)
    command = " ".join(repr(a) if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"FID-digits of {args.n} samples (seeds 0-{args.n - 1} in every cell) against all 1,797 digits (real-vs-"
             f"real floor, two halves: {digits_fid_floor():.2f}) and, in parentheses, FD-pixels (1.0: as close to "
             f"half of the digits as the other half). Deterministic: Heun, S_churn 0, rho = 7 schedule; churn: "
             f"Algorithm 2 with the row's kve-tuned settings. Bits/dim: held-out digits, {args.ode_steps} RK4 steps. "
             f"Produced by `python scripts/benchmark_objectives.py {command}`.", "",
             "| objective | " + " | ".join(f"{n} NFE deterministic | {n} NFE churn" for n in nfes) + " | bits/dim |",
             "|---|" + "---|---|" * len(nfes) + "---|"]
    for row in results:
        cells = [f"{row[mode][str(n)]['fid']:.2f} ({row[mode][str(n)]['fd_pixels']:.2f}x)"
                 for n in nfes for mode in ("deterministic", "churn")]
        bpd = f"{row['bpd']:.3f} ± {row['bpd_stderr']:.3f}" if "bpd" in row else "-"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {bpd} |")
    lines += ["", "Churn settings per row: " + "; ".join(
        f"{row['label']}: " + ", ".join(f"{k} {v}" for k, v in row["tuned"].items()) for row in results)]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        out = Path(args.out_md)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        plot(results, nfes, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
