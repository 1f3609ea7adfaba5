"""Every solver of this package and k-diffusion's samplers at equal NFE budgets on the same model and seeds:
FID-digits and FD-pixels of a trained digits model, and the sliced W2 of the same sampler on an exact mixture.

    python scripts/benchmark_solvers.py --ckpt_path runs/digits/checkpoints/last.ckpt [--nfe 5,7,10,15,35,79]
        [--n 1000] [--out-md benchmarks/solvers.md] [--out-png benchmarks/solvers.png]

Our rows (``ROWS``) are ``SamplerSettings`` overrides of the checkpoint's settings (D clipped as the model ships),
sampled with ``nfe_budget`` set to each column's NFE: the solver picks its N, and a cell whose solver spends fewer
evaluations than the budget names its actual NFE; one no N fits is "-". ``--config`` files (``kve tune``'s output)
add a row each, sampled at their own settings. The k-diffusion rows (``K_DIFFUSION``) call ``k_diffusion.sampling``
as its users do, on Karras' rho = 7 schedule over the model's [sigma_min, sigma_max] with as many steps as the budget
buys, on the same clipped denoiser. Every cell samples the seeds 0 .. n-1, one generator per seed, which also draws
each step's noise, in ours and in k-diffusion's (given as its ``noise_sampler``): the same start noise and the same
per-step noise stream in every cell (common random numbers). Two measures of each cell's samples
(``kve_lightning.metrics.Quality``): FID-digits against all 1,797 digits (real-vs-real floor of two halves for scale)
and FD-pixels (1.0: as close to half of the digits as the other half).

Beside them, each row's sampler on the exact 5-component mixture of scripts/benchmark_samplers.py with its
closed-form denoiser (unclipped, float64, the checkpoint's noise range), 2,000 samples against 2,000 exact draws:
the sliced W2 of the solver's own error, with the exact-vs-exact floor.

k-diffusion is not a dependency: install it beside the package for this script only (``pip install --no-deps
k-diffusion torchsde torchdiffeq trampoline``; only ``k_diffusion.sampling`` is loaded). Without it the script says
so and runs our rows.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm import tqdm

from benchmark_samplers import mixture, sliced_w2
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import Quality, digits_fid_floor, digits_images
from kve_lightning.sampling import SamplerSettings, in_micro_batches, randn_per_row, sample_karras_ve

EDM = dict(schedule="edm", rho=7.0)
# label -> SamplerSettings overrides of the checkpoint's settings
ROWS = {
    "Algorithm 2, checkpoint settings": {},
    "Algorithm 2, checkpoint churn, EDM rho = 7": EDM,
    "Heun, deterministic, EDM rho = 7": EDM | dict(s_churn=0.0),
    "DPM-Solver++(2M) SDE, eta 1, midpoint, S_noise 1, EDM rho = 7": EDM | dict(solver="dpmpp_2m_sde", s_noise=1.0),
    "DPM-Solver++(2M), EDM rho = 7": EDM | dict(solver="dpmpp_2m"),
    "iPNDM-4, EDM rho = 7": EDM | dict(solver="ipndm", ipndm_order=4),
    "Restart [3, 1, 0.5, 2.0], deterministic main pass, EDM rho = 7": EDM | dict(
        solver="restart", s_churn=0.0, s_noise=1.0, restart_intervals=[[3, 1, 0.5, 2.0]]),
}
# k-diffusion's sampler -> network evaluations of N steps (sample_heun: none for the correction at sigma_N = 0)
K_DIFFUSION = {"sample_heun": lambda n: 2 * n - 1, "sample_dpmpp_2m": lambda n: n, "sample_dpmpp_2m_sde": lambda n: n,
               "sample_dpmpp_3m_sde": lambda n: n, "sample_lms": lambda n: n, "sample_euler_ancestral": lambda n: n}
STOCHASTIC = ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral")
MIXTURE_N, PROJECTIONS = 2000, 256
# a sampler of one row at one budget: (denoiser(x, sigma [B]) -> D, start eps [B, ...], per-step noise) -> x_N
Run = Callable[[Callable, torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


def k_diffusion_sampling() -> types.ModuleType | None:
    """``k_diffusion.sampling`` without the package's ``__init__`` (which imports its training stack: scikit-image,
    clip, wandb ...), or ``None`` if k-diffusion is not installed."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")


def steps_within(nfe: int, cost: Callable[[int], int]) -> int | None:
    """The largest N >= 2 whose cost fits ``nfe``, or None."""
    fitting = [n for n in range(2, nfe + 1) if cost(n) <= nfe]
    return fitting[-1] if fitting else None


def ours(settings: SamplerSettings) -> Run:
    """``sample_karras_ve`` with ``settings`` (it micro-batches and clips the denoiser itself)."""
    return lambda denoiser, eps, noise: sample_karras_ve(denoiser, eps.shape, settings=settings, latents=eps,
                                                         generator=noise.generators)


def theirs(kd: types.ModuleType, name: str, num_steps: int) -> Callable[[SamplerSettings], Run]:
    """k-diffusion's ``name`` over ``get_sigmas_karras(num_steps, sigma_min, sigma_max, rho=7)``, on the denoiser
    as ``settings`` evaluate it, with our per-row noise as its ``noise_sampler``."""
    def make(settings: SamplerSettings) -> Run:
        sigmas = kd.get_sigmas_karras(num_steps, settings.sigma_min, settings.sigma_max, rho=7.0)

        def run(denoiser: Callable, eps: torch.Tensor, noise: Noise) -> torch.Tensor:
            extra = dict(noise_sampler=lambda sigma, sigma_next: noise()) if name in STOCHASTIC else {}
            s = sigmas.to(eps.dtype)
            return getattr(kd, name)(clipped(denoiser, settings), s[0] * eps, s, disable=True, **extra)
        return run
    return make


class Noise:
    """Standard normal noise shaped like a batch, row k from ``generators[k]``: what ``sample_karras_ve`` draws."""

    def __init__(self, generators: list[torch.Generator], shape: tuple, dtype: torch.dtype):
        self.generators, self.shape, self.dtype = generators, shape, dtype

    def __call__(self) -> torch.Tensor:
        return randn_per_row(self.shape, self.generators, "cpu", self.dtype)


def cells(module: KarrasVeModule, nfes: list[int], configs: list[Path], kd) -> list[dict]:
    """Every row: its label, kind, and per budget what runs it: (the sampler for given settings, the model's
    settings, and for k-diffusion the NFE spent), absent where nothing fits."""
    base = module.sampler
    rows = []
    for label, overrides in ROWS.items():
        row = dict(label=label, kind="ours", runs={})
        for nfe in nfes:
            try:
                settings = base.replace(**overrides, nfe_budget=nfe)
            except ValueError:  # no N fits this budget (e.g. Heun at an NFE below 3)
                continue
            row["runs"][nfe] = (ours, settings)
        rows.append(row)
    for path in configs:
        settings = base.replace(**yaml.safe_load(path.read_text())["model"])
        rows.append(dict(label=f"`kve tune` winner ({path.name})", kind="tuned", runs={settings.nfe: (ours, settings)}))
    for name, cost in (K_DIFFUSION.items() if kd is not None else ()):
        row = dict(label=f"k-diffusion `{name}`, Karras rho = 7", kind="k-diffusion", runs={})
        for nfe in nfes:
            n = steps_within(nfe, cost)
            if n is not None:
                row["runs"][nfe] = (theirs(kd, name, n), base, cost(n))
        rows.append(row)
    return rows


def clipped(denoiser: Callable, settings: SamplerSettings) -> Callable:
    """The model's denoiser as ``sample_karras_ve`` evaluates it: micro-batched, clipped if ``clamp_denoised``."""
    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = in_micro_batches(denoiser, x, sigma.expand(len(x)).to(x.dtype), settings.micro_batch)
        return out.clamp(-1, 1) if settings.clamp_denoised else out
    return D


def run(module: KarrasVeModule, nfes: list[int], n: int, batch_size: int, configs: list[Path], kd, kinds: set[str],
        on_row: Callable[[list[dict], float], None] = lambda rows, floor: None) -> tuple[list[dict], float]:
    """Each row's label, kind and, per budget, {nfe, fid, fd_pixels, sw2} (the NFE spent; absent where no N
    fits); and the mixture's exact-vs-exact sliced W2 floor. ``on_row(rows so far, floor)`` after each row."""
    quality = Quality(digits_images(module.hparams.image_size, module.hparams.channels), n)
    gm = mixture()
    g = torch.Generator().manual_seed(1)
    truth = gm.sample(MIXTURE_N, g)[0]
    directions = torch.randn((PROJECTIONS, truth[0].numel()), generator=g, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    floor = sliced_w2(gm.sample(MIXTURE_N, g)[0], truth, directions)
    shape = (module.hparams.channels, module.hparams.image_size, module.hparams.image_size)
    seeds = list(range(n))
    rows = [row for row in cells(module, nfes, configs, kd) if row["kind"] in kinds]
    results = []
    with tqdm(total=sum(len(r["runs"]) for r in rows) * n, unit="img", desc="sampling", file=sys.stderr) as bar:
        for row in rows:
            result = dict(label=row["label"], kind=row["kind"])
            for nfe, (make, settings, *spent) in row["runs"].items():
                sampler = make(settings)
                with torch.no_grad():
                    samples = []
                    for start in range(0, n, batch_size):
                        batch = seeds[start:start + batch_size]
                        gens = [torch.Generator().manual_seed(s) for s in batch]
                        noise = Noise(gens, (len(batch), *shape), torch.float32)
                        samples.append(sampler(module.denoiser, noise(), noise).clamp(-1, 1))
                        bar.update(len(batch))
                    fid, fd_pixels = quality(torch.cat(samples))
                    exact = settings.replace(clamp_denoised=False, micro_batch=0)
                    gens = [torch.Generator().manual_seed(s) for s in range(MIXTURE_N)]
                    noise = Noise(gens, (MIXTURE_N, *gm.event_shape), torch.float64)
                    x = make(exact)(gm.denoiser, noise(), noise)
                result[nfe] = dict(nfe=spent[0] if spent else settings.nfe, fid=fid, fd_pixels=fd_pixels,
                                   sw2=sliced_w2(x, truth, directions))
            results.append(result)
            print(result, file=sys.stderr)
            on_row(results, floor)
    return results, floor


def budgets(results: list[dict]) -> list[int]:
    return sorted({k for r in results for k in r if isinstance(k, int)})


def cell(result: dict, nfe: int, text: Callable[[dict], str]) -> str:
    c = result.get(nfe)
    return "-" if c is None else text(c) + ("" if c["nfe"] == nfe else f" ({c['nfe']})")


def markdown(results: list[dict], floor: float, n: int, command: str) -> str:
    nfes = budgets(results)
    head = ["| solver (same model, same seeds) | " + " | ".join(f"{nfe} NFE" for nfe in nfes) + " |",
            "|---|" + "---|" * len(nfes)]
    quality = [f"| {r['label']} | " + " | ".join(cell(r, nfe, lambda c: f"{c['fid']:.2f} ({c['fd_pixels']:.2f}x)")
                                                 for nfe in nfes) + " |" for r in results]
    w2 = [f"| {r['label']} | " + " | ".join(cell(r, nfe, lambda c: f"{c['sw2']:.4f}") for nfe in nfes) + " |"
          for r in results]
    best = []
    for nfe in nfes:
        for kind in ("ours", "tuned", "k-diffusion"):
            cands = [r for r in results if r["kind"] == kind and r.get(nfe) is not None]
            if cands:
                top = min(cands, key=lambda r: r[nfe]["fid"])
                best.append(f"| {nfe} | {kind} | {top['label']} | {top[nfe]['fid']:.2f} | "
                            f"{top[nfe]['fd_pixels']:.2f}x | {top[nfe]['sw2']:.4f} |")
    return "\n".join([
        f"FID-digits of {n} samples (seeds 0-{n - 1} in every cell) against all 1,797 digits, and in parentheses "
        f"FD-pixels (1.0: as close to half of the digits as the other half); real-vs-real FID floor (898 vs 898): "
        f"{digits_fid_floor():.2f}. A cell spending fewer evaluations than its column names them in parentheses; "
        f"\"-\": no N fits. Produced by `{command}`.", "", *head, *quality, "",
        f"Sliced W2 on the exact 5-component mixture (the same sampler on its closed-form denoiser, {MIXTURE_N} "
        f"samples vs {MIXTURE_N} exact draws, {PROJECTIONS} directions); exact-vs-exact floor {floor:.4f}.", "",
        *head, *w2, "", "Best FID-digits per budget and kind (ours: the fixed rows above; tuned: `kve tune`'s "
        "configs):", "", "| NFE | kind | row | FID-digits | FD-pixels | sliced W2 |", "|---|---|---|---|---|---|",
        *best]) + "\n"


def plot(results: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    styles = {"ours": "o-", "tuned": "*", "k-diffusion": "s--"}
    for r in results:
        nfes = [k for k in budgets([r]) if r.get(k) is not None]
        for ax, key in zip(axes, ("fid", "fd_pixels", "sw2")):
            ax.plot([r[k]["nfe"] for k in nfes], [r[k][key] for k in nfes], styles[r["kind"]], label=r["label"],
                    markersize=10 if r["kind"] == "tuned" else 5)
    axes[0].axhline(digits_fid_floor(), color="k", lw=0.8, ls=":", label="real-vs-real FID floor")
    axes[1].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[2].axhline(floor, color="k", lw=0.8, ls=":")
    for ax, name in zip(axes, ("FID-digits", "FD-pixels (x real)", "sliced W2, exact mixture")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by `kve fit`")
    p.add_argument("--nfe", default="5,7,10,15,35,79", help="the NFE budgets, comma-separated")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="a `kve tune` config: one more row at its own settings (repeatable)")
    p.add_argument("--kinds", default="ours,tuned,k-diffusion",
                   help="the kinds of rows to run, comma-separated: ours (ROWS), tuned (--config), k-diffusion")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out-md", type=Path, default=None, help="write the tables here, the rows as .json beside it")
    p.add_argument("--out-png", type=Path, default=None, help="write the plot here")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    kd = k_diffusion_sampling()
    if kd is None:
        print("benchmark_solvers: k-diffusion is not installed: running our rows only (pip install --no-deps "
              "k-diffusion torchsde torchdiffeq trampoline adds its samplers)", file=sys.stderr)
    module = KarrasVeModule.from_checkpoint(args.ckpt_path)
    command = " ".join(["python scripts/benchmark_solvers.py", *(sys.argv[1:] if argv is None else argv)])

    def write(rows: list[dict], floor: float) -> str:
        table = markdown(rows, floor, args.n, command)
        if args.out_md:
            args.out_md.parent.mkdir(parents=True, exist_ok=True)
            args.out_md.write_text(table)
            args.out_md.with_suffix(".json").write_text(json.dumps(dict(floor=floor, rows=rows), indent=1))
        return table

    kinds = set(args.kinds.split(","))
    results, floor = run(module, nfes, args.n, args.batch_size, args.config, kd, kinds, on_row=write)
    print(write(results, floor))
    if args.out_png:
        plot(results, floor, args.out_png)
    return results


if __name__ == "__main__":
    main()
