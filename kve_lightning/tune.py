"""``kve-tune``: search S_churn, S_tmin, S_tmax, S_noise of EDM Algorithm 2 at a fixed NFE on common random numbers.

EDM (Karras et al. 2022, Sec. 4, Appendix E.2) tuned the stochasticity per model by grid search and noted that the
search is noisy. Here every arm samples the same seeds (``module.sample`` / the pipeline draw x_0 and every step's
churn noise eps_i from one generator per seed), so two arms differ by their settings only; each arm's FID is
compared with the baseline's, EDM Table 5's VE settings (``SamplerSettings``' defaults), by a paired bootstrap over
the seeds. The search is a compass search: from the baseline, move one setting at a time (S_tmin, S_tmax by factors,
S_churn, S_noise by steps), keep going while the FID drops, shrink the steps when no move helps.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from kve_lightning.commands import (add_device_argument, add_sampler_arguments, fail, load_model, model_parser,
                                    parse_device, sampler_overrides, writable_file)
from kve_lightning.data import DATASETS, ImageDataModule
from kve_lightning.images import save_atomic
from kve_lightning.metrics import feature_moments, feature_net, frechet_distance, matrix_sqrt
from kve_lightning.sampling import GAMMA_MAX, SamplerSettings

SEARCHED = ("s_churn", "s_min", "s_max", "s_noise")
METRICS = {"fid-digits": "digits", "fid-inception": "inception"}
Evaluate = Callable[[SamplerSettings], torch.Tensor]  # settings -> features [n, d] of the same n seeds


@dataclass(frozen=True)
class Move:
    """One searched setting: moved by factors ``step ** (1 / 2**level)`` (``log``) or by ``step / 2**level``."""

    name: str
    step: float
    log: bool


def moves(settings: SamplerSettings) -> list[Move]:
    """S_tmax, S_tmin by factors of 10 (EDM searched them on log grids), S_churn by half its useful range
    N (sqrt(2) - 1) (above it gamma_i is capped), S_noise by 0.02."""
    return [Move("s_max", 10.0, True), Move("s_min", 10.0, True),
            Move("s_churn", settings.num_steps * GAMMA_MAX / 2, False), Move("s_noise", 0.02, False)]


def round_significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def moved(settings: SamplerSettings, move: Move, sign: int, level: int) -> SamplerSettings | None:
    """``settings`` with ``move.name`` moved one step in direction ``sign`` at refinement ``level``, rounded to 4
    significant digits (so that the YAML holds exactly what was measured) and kept where it has an effect: S_tmin,
    S_tmax in [sigma_min, sigma_max], S_churn in [0, N (sqrt(2) - 1)], S_noise >= 0. ``None`` when the move leaves
    the value unchanged or makes S_tmin > S_tmax."""
    value = getattr(settings, move.name)
    if move.name == "s_churn":
        value = min(value, settings.num_steps * GAMMA_MAX)
    if move.log:
        new = value * move.step ** (sign / 2**level)
        new = min(max(new, settings.sigma_min), settings.sigma_max)
    else:
        new = max(value + sign * move.step / 2**level, 0.0)
        if move.name == "s_churn":
            new = min(new, settings.num_steps * GAMMA_MAX)
    new = round_significant(new)
    if new == value:
        return None
    try:
        return settings.replace(**{move.name: new})
    except ValueError:  # s_min > s_max
        return None


def effect(settings: SamplerSettings) -> tuple:
    """What Algorithm 2 does with the churn settings: gamma, the steps i with S_tmin <= sigma_i <= S_tmax, S_noise.
    Two settings with the same effect sample the same images: an arm is run once per effect."""
    sigmas = settings.sigmas().tolist()[:-1]
    steps = tuple(i for i, s in enumerate(sigmas) if settings.s_min <= s <= settings.s_max)
    gamma = min(settings.s_churn / settings.num_steps, GAMMA_MAX)
    return (gamma, steps, settings.s_noise) if gamma > 0 and steps else (0.0,)


@dataclass
class Arm:
    """One evaluated setting: its FID on all n seeds, its FID on every bootstrap resample, its wall time."""

    settings: SamplerSettings
    fid: float
    resampled: torch.Tensor
    seconds: float
    diff: float = 0.0
    interval: tuple[float, float] = (0.0, 0.0)


@dataclass
class Scorer:
    """FID of features against fixed real statistics, on all n rows and on B bootstrap resamples of the n row
    indices: the same resamples for every arm, so the differences between arms are paired."""

    real_mu: torch.Tensor
    real_sqrt_cov: torch.Tensor
    counts: torch.Tensor  # [B, n]: how often each row is drawn in each resample

    @classmethod
    def from_real(cls, real_features: torch.Tensor, n: int, resamples: int, seed: int) -> Scorer:
        mu, cov = feature_moments(real_features)
        index = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
        counts = torch.zeros(resamples, n).scatter_add_(1, index, torch.ones(resamples, n))
        return cls(mu, matrix_sqrt(cov), counts)

    def __call__(self, features: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The FID of ``features`` [n, d] and its B resampled values."""
        fid = frechet_distance(self.real_mu, self.real_sqrt_cov, *feature_moments(features)).item()
        n, d = features.shape
        chunk = max(1, 2**24 // (n * d + d * d))  # resamples at once: <= 128 MiB of float64 intermediates
        resampled = [frechet_distance(self.real_mu, self.real_sqrt_cov, *feature_moments(features, counts))
                     for counts in self.counts.split(chunk)]
        return fid, torch.cat(resampled)


def tune(evaluate: Evaluate, scorer: Scorer, baseline: SamplerSettings, searched: Sequence[str], budget_s: float,
         clock: Callable[[], float] = time.monotonic, levels: int = 3,
         report: Callable[[Arm, Arm], None] = lambda arm, best: None) -> list[Arm]:
    """Compass search from ``baseline`` over the ``searched`` settings; returns the arms, the baseline first.

    Every move of every setting is tried in both directions at each of ``levels`` step sizes; a move that lowers
    the FID is taken and repeated while it keeps lowering it. No arm starts once the elapsed time plus the mean arm
    time so far would pass ``budget_s`` (the baseline always runs); an interrupt (Ctrl-C) also ends the search.
    ``report(arm, best)`` after each arm."""
    start = clock()
    arms: list[Arm] = []
    seen: set[tuple] = set()

    def run(settings: SamplerSettings) -> Arm:
        seen.add(effect(settings))
        began = clock()
        fid, resampled = scorer(evaluate(settings))
        arms.append(Arm(settings, fid, resampled, clock() - began))
        report(arms[-1], min(arms, key=lambda a: a.fid))
        return arms[-1]

    def out_of_time() -> bool:
        return clock() - start + sum(a.seconds for a in arms) / len(arms) > budget_s

    best = run(baseline)
    try:
        for level in range(levels):
            improved = True
            while improved:
                improved = False
                for move in (m for m in moves(baseline) if m.name in searched):
                    for sign in (1, -1):
                        while (candidate := moved(best.settings, move, sign, level)) is not None:
                            if effect(candidate) in seen:
                                break
                            if out_of_time():
                                return arms
                            arm = run(candidate)
                            if arm.fid >= best.fid:
                                break
                            best, improved = arm, True
    except KeyboardInterrupt:
        print("interrupted: reporting the arms so far", file=sys.stderr)
    return arms


def paired_intervals(arms: list[Arm], confidence: float = 0.95) -> None:
    """Each arm's FID difference to the first arm (the baseline), with the percentile interval of the differences
    over the shared bootstrap resamples (the real statistics fixed)."""
    base = arms[0]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    for arm in arms:
        arm.diff = arm.fid - base.fid
        low, high = torch.quantile(arm.resampled - base.resampled, q).tolist()
        arm.interval = (low, high)


def format_table(arms: list[Arm], best: Arm, confidence: float) -> str:
    pct = f"{confidence:.0%}"
    lines = [f"| arm | S_churn | S_tmin | S_tmax | S_noise | FID | diff to Table 5 | {pct} interval | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, arm in enumerate(arms):
        s = arm.settings
        tag = " (Table 5)" if k == 0 else ""
        tag += " **best**" if arm is best else ""
        lines.append(f"| {k}{tag} | {s.s_churn:g} | {s.s_min:g} | {s.s_max:g} | {s.s_noise:g} | {arm.fid:.2f} | "
                     f"{arm.diff:+.2f} | [{arm.interval[0]:+.2f}, {arm.interval[1]:+.2f}] | {arm.seconds:.0f} |")
    return "\n".join(lines)


def plot(arms: list[Arm], best: Arm, title: str, path: Path) -> None:
    """Each arm's FID difference to the baseline with its paired bootstrap interval, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(arms)))
    y = list(range(len(arms)))[::-1]
    for arm, row in zip(arms, y):
        ax.errorbar([arm.diff], [row], xerr=[[arm.diff - arm.interval[0]], [arm.interval[1] - arm.diff]], fmt="o",
                    color="C3" if arm is best else "C0", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    labels = [f"{k}: {a.settings.s_churn:g} / {a.settings.s_min:g} / {a.settings.s_max:g} / {a.settings.s_noise:g}"
              for k, a in enumerate(arms)]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("FID difference to Table 5 (paired bootstrap interval)")
    ax.set_ylabel("arm: S_churn / S_tmin / S_tmax / S_noise", fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    save_atomic(path, lambda f: f.write(buffer.getvalue()))


def winner_yaml(settings: SamplerSettings, fixed: dict, header: list[str]) -> str:
    """``model:`` with N, the searched settings and the fixed ones: a config for ``kve predict --config``,
    ``kve-sample --config`` and ``kve-export --config``."""
    model = {"num_steps": settings.num_steps} | {name: getattr(settings, name) for name in SEARCHED}
    model |= {k: getattr(settings, k) for k in fixed if k not in model}
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"model": model}, sort_keys=False)


def num_steps_for(nfe: int, solver: str) -> int:
    """N for a number of network evaluations: NFE = 2N - 1 with Heun, N with Euler."""
    steps = (nfe + 1) // 2 if solver == "heun" else nfe
    if steps < 2 or (solver == "heun" and nfe % 2 == 0):
        rule = "2N - 1 (odd, >= 3)" if solver == "heun" else "N (>= 2)"
        raise ValueError(f"--nfe {nfe} is not reachable with the {solver} solver: NFE = {rule}")
    return steps


TUNE_DOC = """Tune the sampler's stochasticity (S_churn, S_tmin, S_tmax, S_noise) of a trained model at a fixed NFE.

    kve-tune --ckpt runs/digits/checkpoints/last.ckpt --nfe 35 --n 1000 --budget 10 --out best.yaml
    kve-sample --ckpt runs/digits/checkpoints/last.ckpt --config best.yaml --out samples/tuned --grid

Every arm samples the same --n seeds (common random numbers: the same initial noise and the same churn noise per
seed), so arms differ only by their settings. The first arm is EDM Table 5's VE settings (80 / 0.05 / 1 / 1.007);
then a compass search moves one setting at a time, keeping moves that lower the FID (against the data set's images,
--metric), with finer steps when none does, until --budget minutes would be exceeded (estimated from the arm times).
Each arm's FID difference to Table 5 gets a paired bootstrap interval (the same resampled seeds for both arms, the
real statistics fixed). Prints a table, writes a plot (--plot) and the best arm as a YAML config (--out: `model:`
with num_steps and the settings) for `kve predict --config`, `kve-sample --config` and `kve-export --config`.
Sampler flags fix settings: the model's own for the rest (a searched one given is left out of the search).
"""


def main(argv: list[str] | None = None) -> None:
    """``kve-tune``."""
    p = model_parser("kve-tune", TUNE_DOC)
    p.add_argument("--nfe", type=int, default=35, help="network evaluations per image (default 35: N = 18 Heun)")
    p.add_argument("--metric", default="fid-digits", choices=tuple(METRICS),
                   help="fid-digits (offline, default) or fid-inception (needs torch-fidelity and its weights)")
    p.add_argument("--n", type=int, default=1000, help="samples per arm: seeds --seed to --seed + n - 1 (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the first seed; also seeds the bootstrap (default 0)")
    p.add_argument("--budget", type=float, default=10.0, help="minutes of wall time (default 10)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the percentile intervals (default 0.95)")
    p.add_argument("--out", default="best.yaml", help="the YAML config to write (default best.yaml)")
    p.add_argument("--plot", default=None, help="the plot to write (default: --out with .png)")
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="the real images' data set (default digits)")
    p.add_argument("--root", default="data", help="where a torchvision data set or an image folder lives")
    p.add_argument("--batch-size", type=int, default=500, help="images sampled at once (default 500)")
    add_device_argument(p)
    add_sampler_arguments(p)
    args = p.parse_args(argv)
    began = time.monotonic()
    try:
        for name in ("n", "bootstrap", "batch_size"):
            if getattr(args, name) < (2 if name == "n" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name == 'n' else 1}, "
                                 f"got {getattr(args, name)}")
        if not args.budget > 0 or not math.isfinite(args.budget):
            raise ValueError(f"--budget must be a positive number of minutes, got {args.budget}")
        if not 0 < args.confidence < 1:
            raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
        if not 0 <= args.seed <= 2**63 - args.n:
            raise ValueError(f"--seed {args.seed}: seeds must lie in [0, 2**63)")
        fixed = sampler_overrides(args)
        if "num_steps" in fixed:
            raise ValueError(f"num_steps={fixed['num_steps']} is set by --nfe here: give --nfe instead")
        searched = [name for name in SEARCHED if name not in fixed]
        if not searched:
            raise ValueError(f"nothing to search: all of {list(SEARCHED)} are fixed by flags or --config")
        out = writable_file(Path(args.out), "--out")
        plot_path = writable_file(Path(args.plot) if args.plot else out.with_suffix(".png"), "--plot")
        device = parse_device(args.device)
        sample, stored, denoiser = load_model(args)
        unet = denoiser.unet
        settings = stored.replace(**fixed)
        settings = settings.replace(num_steps=num_steps_for(args.nfe, settings.solver))
        baseline = settings.replace(**{name: getattr(SamplerSettings(), name) for name in searched})  # Table 5
        net = feature_net(METRICS[args.metric]).to(device)
        data = ImageDataModule(dataset=args.dataset, root=args.root, image_size=int(unet.config.sample_size),
                               channels=int(unet.config.in_channels))
        real = data.full_dataset()
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: fid-inception without torch-fidelity/weights
        fail(p, err)
    with torch.no_grad():
        real_features = torch.cat([net(batch.to(device)).double().cpu() for batch in tqdm(
            DataLoader(real, batch_size=args.batch_size), desc="real features", unit="batch")])
    scorer = Scorer.from_real(real_features, args.n, args.bootstrap, args.seed)
    seeds = list(range(args.seed, args.seed + args.n))

    @torch.no_grad()
    def evaluate(arm: SamplerSettings) -> torch.Tensor:
        features = []
        with tqdm(total=args.n, unit="img", desc="arm", leave=False) as bar:
            for first in range(0, args.n, args.batch_size):
                batch = seeds[first:first + args.batch_size]
                features.append(net(sample(batch, **arm.to_dict()).to(device) * 2 - 1).double().cpu())
                bar.update(len(batch))
        return torch.cat(features)

    def report(arm: Arm, best: Arm) -> None:
        s = arm.settings
        tqdm.write(f"S_churn {s.s_churn:g}, S_tmin {s.s_min:g}, S_tmax {s.s_max:g}, S_noise {s.s_noise:g}: "
                   f"{args.metric} {arm.fid:.2f} ({arm.seconds:.0f} s; best {best.fid:.2f})", file=sys.stderr)

    budget_s = args.budget * 60 - (time.monotonic() - began)
    arms = tune(evaluate, scorer, baseline, searched, budget_s, report=report)
    paired_intervals(arms, args.confidence)
    best = min(arms, key=lambda a: a.fid)
    pct = f"{args.confidence:.0%}"
    summary = (f"{args.metric}, {args.n} samples per arm (seeds {seeds[0]}-{seeds[-1]} in every arm), NFE {args.nfe} "
               f"(N = {settings.num_steps}, {settings.solver}), {len(arms)} arms in "
               f"{(time.monotonic() - began) / 60:.1f} min")
    verdict = (f"best {best.fid:.2f} vs Table 5 {arms[0].fid:.2f}: difference {best.diff:+.2f}, {pct} paired bootstrap "
               f"interval [{best.interval[0]:+.2f}, {best.interval[1]:+.2f}] over {args.bootstrap} resamples")
    print(f"{summary}\n\n{format_table(arms, best, args.confidence)}\n\n{verdict}")
    header = [f"kve-tune: the best of {len(arms)} arms by compass search from EDM Table 5's VE settings;",
              f"model {args.ckpt or args.model}; {summary};", f"{verdict}."]
    text = winner_yaml(best.settings, fixed, header)
    save_atomic(out, lambda f: f.write(text.encode()))
    plot(arms, best, f"{args.metric}, n = {args.n}, NFE {args.nfe}: best - Table 5 = {best.diff:+.2f}, "
                     f"{pct} interval [{best.interval[0]:+.2f}, {best.interval[1]:+.2f}]", plot_path)
    print(f"wrote {out} and {plot_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
