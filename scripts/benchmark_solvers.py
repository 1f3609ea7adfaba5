"""FID-digits of a trained digits model for each solver at equal NFE budgets, on the same seeds.

    python scripts/benchmark_solvers.py --ckpt_path runs/digits/checkpoints/last.ckpt [--nfe 7,15,35] [--n 1000]
        [--out-md benchmarks/solvers.md]

Each row is ``SamplerSettings`` overrides of the checkpoint's settings (D clipped as the model ships), sampled with
``nfe_budget`` set to each column's NFE: the solver picks its N (``SamplerSettings.nfe_budget``), and a cell whose
solver spends fewer evaluations than the budget names its actual NFE; one no N fits is "-". Every cell samples the
seeds 0 .. n-1, one generator per seed (common random numbers: the same start noise in every cell); FID against all
1,797 digits, with the real-vs-real floor (two disjoint halves) for scale. The k-diffusion rows of the issue's table
are this package's solvers in tests/test_solvers.py (equal to k-diffusion's to 1e-12 on the same noise); the
"EDM rho = 7" rows use k-diffusion's schedule, Karras rho = 7 on the model's [sigma_min, sigma_max].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import build_fid, digits_fid_floor, digits_images

EDM = dict(schedule="edm", rho=7.0)
# label -> SamplerSettings overrides of the checkpoint's settings
ROWS = {
    "Algorithm 2, checkpoint settings": {},
    "Algorithm 2, checkpoint churn, EDM rho = 7": EDM,
    "Heun, deterministic, EDM rho = 7 (k-diffusion sample_heun)": EDM | dict(s_churn=0.0),
    "DPM-Solver++(2M) SDE, eta 1, midpoint, S_noise 1, EDM rho = 7": EDM | dict(solver="dpmpp_2m_sde", s_noise=1.0),
    "DPM-Solver++(2M) SDE, eta 1, heun, S_noise 1, EDM rho = 7": EDM | dict(solver="dpmpp_2m_sde", s_noise=1.0,
                                                                           sde_solver_type="heun"),
    "DPM-Solver++(2M), EDM rho = 7": EDM | dict(solver="dpmpp_2m"),
    "iPNDM-4, EDM rho = 7": EDM | dict(solver="ipndm", ipndm_order=4),
    "iPNDM-3, EDM rho = 7": EDM | dict(solver="ipndm", ipndm_order=3),
    "Restart [3, 1, 0.5, 2.0], deterministic main pass, EDM rho = 7": EDM | dict(
        solver="restart", s_churn=0.0, s_noise=1.0, restart_intervals=[[3, 1, 0.5, 2.0]]),
}


def run(module: KarrasVeModule, nfes: list[int], n: int, batch_size: int) -> list[dict]:
    """One dict per row: its label and, per budget, (FID-digits, NFE spent), or None where no N fits the budget."""
    fid = build_fid(digits_images(module.hparams.image_size, module.hparams.channels), device=module.device)
    seeds = list(range(n))
    results = []
    with tqdm(total=len(ROWS) * len(nfes) * n, unit="img", desc="sampling", file=sys.stderr) as bar:
        for label, overrides in ROWS.items():
            row = dict(label=label)
            base = module.sampler.replace(**overrides)
            for nfe in nfes:
                try:
                    settings = base.replace(nfe_budget=nfe)
                except ValueError:  # no N fits this budget (e.g. Heun at an NFE below 3)
                    row[nfe] = None
                    bar.update(n)
                    continue
                fid.reset()
                for start in range(0, n, batch_size):
                    batch = seeds[start:start + batch_size]
                    fid.update(module.sample(batch, **settings.to_dict()).clamp(-1, 1), real=False)
                    bar.update(len(batch))
                row[nfe] = (fid.compute().item(), settings.nfe)
            results.append(row)
            print(row, file=sys.stderr)
    return results


def markdown(results: list[dict], nfes: list[int], n: int, command: str) -> str:
    lines = [f"FID-digits of {n} samples (seeds 0-{n - 1} in every cell) against all 1,797 digits; real-vs-real floor "
             f"(898 vs 898): {digits_fid_floor():.2f}. A cell spending fewer evaluations than its column names them "
             f"in parentheses. Produced by `{command}`.", "",
             "| solver (same model, same seeds) | " + " | ".join(f"{nfe} NFE" for nfe in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for row in results:
        cells = ["-" if row[nfe] is None else f"{row[nfe][0]:.2f}" + ("" if row[nfe][1] == nfe else f" ({row[nfe][1]})")
                 for nfe in nfes]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by `kve fit`")
    p.add_argument("--nfe", default="7,15,35", help="the NFE budgets, comma-separated")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-md", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    module = KarrasVeModule.from_checkpoint(args.ckpt_path).to(args.device)
    results = run(module, nfes, args.n, args.batch_size)
    command = " ".join(["python scripts/benchmark_solvers.py", *(sys.argv[1:] if argv is None else argv)])
    table = markdown(results, nfes, args.n, command)
    print(table)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table)
    return results


if __name__ == "__main__":
    main()
