"""The search behind ``kve tune``: S_churn, S_tmin, S_tmax, S_noise of EDM Algorithm 2 at a fixed NFE, on common
random numbers, judged by two metrics.

EDM (Karras et al. 2022, Sec. 4, Appendix E.2) tuned the stochasticity per model by grid search and noted that the
search is noisy. Here every arm samples the same seeds (``module.sample`` / the pipeline draw x_0 and every step's
churn noise eps_i from one generator per seed), so two arms differ by their settings only; each arm's FID is
compared with the baseline's, EDM Table 5's VE settings (``SamplerSettings``' defaults), by a paired bootstrap over
the seeds. The search is a compass search: from the baseline, move one setting at a time (S_tmin, S_tmax by factors,
S_churn, S_noise by steps), keep going while the FID drops, shrink the steps when no move helps.

Never one metric: every arm is also scored by FD-pixels (``kve_lightning.metrics.PixelFD``), and a move that lowers
the FID is refused when it makes FD-pixels worse beyond its noise (the paired interval of the difference lying above
zero), against the arm it improves on or against the baseline.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from kve_lightning.storage import save_atomic
from kve_lightning.metrics import chunked_frechet, feature_moments, matrix_sqrt
from kve_lightning.sampling import GAMMA_MAX, SamplerSettings

SEARCHED = ("s_churn", "s_min", "s_max", "s_noise")
# S_noise searched within: EDM's are 1.003-1.007, tuned ones here 0.77-0.92 (README); far outside, the churn noise is
# mostly added or mostly missing and the FID moves by noise only
S_NOISE_RANGE = (0.5, 1.5)
METRICS = {"fid-digits": "digits", "fid-inception": "inception"}
# settings -> the FID's and FD-pixels' features [n, d] of the same n seeds
Evaluate = Callable[[SamplerSettings], tuple[torch.Tensor, torch.Tensor]]


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
    S_tmax in [sigma_min, sigma_max], S_churn in [0, N (sqrt(2) - 1)], S_noise in ``S_NOISE_RANGE``. ``None`` when
    the move leaves the value unchanged or makes S_tmin > S_tmax."""
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
        if move.name == "s_noise":
            new = min(max(new, S_NOISE_RANGE[0]), S_NOISE_RANGE[1])
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
    """One evaluated setting: its FID and FD-pixels on all n seeds and on every bootstrap resample, its wall time,
    and (``paired_intervals``) both differences to the baseline with their intervals."""

    settings: SamplerSettings
    fid: float
    resampled: torch.Tensor
    pixels: float
    pixels_resampled: torch.Tensor
    seconds: float
    diff: float = 0.0
    interval: tuple[float, float] = (0.0, 0.0)
    pixels_diff: float = 0.0
    pixels_interval: tuple[float, float] = (0.0, 0.0)


@dataclass
class Scorer:
    """A Frechet distance of features against fixed real statistics, divided by ``scale``, on all n rows and on B
    bootstrap resamples of the row indices: the same resamples for every arm, so the differences between arms are
    paired. With ``set_size`` < n the distance is the mean over sets of ``set_size`` rows (``chunked_frechet``;
    FD-pixels), each resample drawing within each set."""

    real_mu: torch.Tensor
    real_sqrt_cov: torch.Tensor
    counts: torch.Tensor  # [B, n]: how often each row is drawn in each resample
    set_size: int
    scale: float = 1.0

    @classmethod
    def from_real(cls, real_features: torch.Tensor, n: int, resamples: int, seed: int, set_size: int | None = None,
                  scale: float = 1.0) -> Scorer:
        mu, cov = feature_moments(real_features)
        return cls.from_moments(mu, matrix_sqrt(cov), n, resamples, seed, set_size, scale)

    @classmethod
    def from_moments(cls, mu: torch.Tensor, sqrt_cov: torch.Tensor, n: int, resamples: int, seed: int,
                     set_size: int | None = None, scale: float = 1.0) -> Scorer:
        size = n if set_size is None else set_size
        sets = n // size
        index = torch.randint(size, (resamples, sets * size), generator=torch.Generator().manual_seed(seed))
        index += torch.arange(sets).repeat_interleave(size) * size
        counts = torch.zeros(resamples, n).scatter_add_(1, index, torch.ones(resamples, sets * size))
        return cls(mu, sqrt_cov, counts, size, scale)

    def __call__(self, features: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The distance of ``features`` [n, d] and its B resampled values."""
        value = chunked_frechet(self.real_mu, self.real_sqrt_cov, features, self.set_size).item()
        n, d = features.shape
        chunk = max(1, 2**24 // (n * d + d * d))  # resamples at once: <= 128 MiB of float64 intermediates
        resampled = [chunked_frechet(self.real_mu, self.real_sqrt_cov, features, self.set_size, counts)
                     for counts in self.counts.split(chunk)]
        return value / self.scale, torch.cat(resampled) / self.scale


def worse_beyond_noise(resampled: torch.Tensor, than: torch.Tensor, confidence: float) -> bool:
    """Whether the paired ``confidence`` interval of the difference ``resampled - than`` lies above zero."""
    low = torch.quantile(resampled - than, torch.tensor((1 - confidence) / 2, dtype=torch.float64))
    return bool(low > 0)


def tune(evaluate: Evaluate, scorers: tuple[Scorer, Scorer], baseline: SamplerSettings, searched: Sequence[str],
         budget_s: float, clock: Callable[[], float] = time.monotonic, levels: int = 3, confidence: float = 0.95,
         report: Callable[[Arm, Arm], None] = lambda arm, best: None) -> tuple[list[Arm], Arm | None]:
    """Compass search from ``baseline`` over the ``searched`` settings; returns the arms (the baseline first) and
    the best (``None`` if none finished).

    ``evaluate(settings)`` gives two feature sets of the same seeds, scored by ``scorers``: the FID's and
    FD-pixels'. Every move of every setting is tried in both directions at each of ``levels`` step sizes; a move is
    taken, and repeated while it keeps helping, when it lowers the FID and does not make FD-pixels worse beyond its
    noise (``worse_beyond_noise`` at ``confidence``) than the best arm's or the baseline's. No arm starts once the
    elapsed time plus the mean arm time so far would pass ``budget_s`` (the baseline always runs); an interrupt
    (Ctrl-C) also ends the search. ``report(arm, best)`` after each arm."""
    start = clock()
    arms: list[Arm] = []
    seen: set[tuple] = set()

    def run(settings: SamplerSettings) -> Arm:
        seen.add(effect(settings))
        began = clock()
        fid_features, pixel_features = evaluate(settings)
        (fid, resampled), (pixels, pixels_resampled) = scorers[0](fid_features), scorers[1](pixel_features)
        arms.append(Arm(settings, fid, resampled, pixels, pixels_resampled, clock() - began))
        return arms[-1]

    def improves(arm: Arm, best: Arm) -> bool:
        return arm.fid < best.fid and not any(worse_beyond_noise(arm.pixels_resampled, other.pixels_resampled,
                                                                 confidence) for other in (best, arms[0]))

    def out_of_time() -> bool:
        return clock() - start + sum(a.seconds for a in arms) / len(arms) > budget_s

    try:
        best = run(baseline)
        report(best, best)
    except KeyboardInterrupt:
        return arms, None  # none: interrupted in the first arm
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
                                return arms, best
                            arm = run(candidate)
                            taken = improves(arm, best)
                            best = arm if taken else best
                            report(arm, best)
                            if not taken:
                                break
                            improved = True
    except KeyboardInterrupt:
        print("interrupted: reporting the arms so far", file=sys.stderr)
    return arms, best


def paired_intervals(arms: list[Arm], confidence: float = 0.95) -> None:
    """Each arm's FID and FD-pixels differences to the first arm (the baseline), with the percentile intervals of
    the differences over the shared bootstrap resamples (the real statistics fixed)."""
    base = arms[0]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    for arm in arms:
        arm.diff, arm.pixels_diff = arm.fid - base.fid, arm.pixels - base.pixels
        arm.interval = tuple(torch.quantile(arm.resampled - base.resampled, q).tolist())
        arm.pixels_interval = tuple(torch.quantile(arm.pixels_resampled - base.pixels_resampled, q).tolist())


def format_table(arms: list[Arm], best: Arm, confidence: float, metric: str = "FID") -> str:
    pct = f"{confidence:.0%}"
    lines = [f"| arm | S_churn | S_tmin | S_tmax | S_noise | {metric} | diff to Table 5 | {pct} interval | FD-pixels "
             f"(x real) | diff to Table 5 | {pct} interval | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, arm in enumerate(arms):
        s = arm.settings
        tag = " (Table 5)" if k == 0 else ""
        tag += " **best**" if arm is best else ""
        lines.append(f"| {k}{tag} | {s.s_churn:g} | {s.s_min:g} | {s.s_max:g} | {s.s_noise:g} | {arm.fid:.2f} | "
                     f"{arm.diff:+.2f} | [{arm.interval[0]:+.2f}, {arm.interval[1]:+.2f}] | {arm.pixels:.3f} | "
                     f"{arm.pixels_diff:+.3f} | [{arm.pixels_interval[0]:+.3f}, {arm.pixels_interval[1]:+.3f}] | "
                     f"{arm.seconds:.0f} |")
    return "\n".join(lines)


def plot(arms: list[Arm], best: Arm, title: str, path: Path, metric: str = "FID") -> None:
    """Each arm's FID and FD-pixels differences to the baseline, side by side, with their paired bootstrap
    intervals, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(10, 1.2 + 0.3 * len(arms)))
    y = list(range(len(arms)))[::-1]
    for ax, name, diff, interval in ((axes[0], metric, "diff", "interval"),
                                     (axes[1], "FD-pixels (x real)", "pixels_diff", "pixels_interval")):
        for arm, row in zip(arms, y):
            d, (low, high) = getattr(arm, diff), getattr(arm, interval)
            ax.errorbar([d], [row], xerr=[[d - low], [high - d]], fmt="o", color="C3" if arm is best else "C0",
                        capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{name} difference to Table 5 (paired bootstrap interval)", fontsize=8)
    labels = [f"{k}: {a.settings.s_churn:g} / {a.settings.s_min:g} / {a.settings.s_max:g} / {a.settings.s_noise:g}"
              for k, a in enumerate(arms)]
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].set_ylabel("arm: S_churn / S_tmin / S_tmax / S_noise", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    save_atomic(path, lambda f: f.write(buffer.getvalue()))


def winner_yaml(settings: SamplerSettings, fixed: dict, header: list[str]) -> str:
    """``model:`` with N, the searched settings and the fixed ones: a config for ``kve predict --config``,
    ``kve sample --config`` and ``kve export --config``."""
    model = {"num_steps": settings.num_steps} | {name: getattr(settings, name) for name in SEARCHED}
    model |= {k: getattr(settings, k) for k in fixed if k not in model}
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"model": model}, sort_keys=False)
