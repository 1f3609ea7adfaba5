"""The search behind ``kve tune``: S_churn, S_tmin, S_tmax, S_noise of EDM Algorithm 2 at a fixed NFE, on common
random numbers.

EDM (Karras et al. 2022, Sec. 4, Appendix E.2) tuned the stochasticity per model by grid search and noted that the
search is noisy. Here every arm samples the same seeds (``module.sample`` / the pipeline draw x_0 and every step's
churn noise eps_i from one generator per seed), so two arms differ by their settings only; each arm's FID is
compared with the baseline's, EDM Table 5's VE settings (``SamplerSettings``' defaults), by a paired bootstrap over
the seeds. The search is a compass search: from the baseline, move one setting at a time (S_tmin, S_tmax by factors,
S_churn, S_noise by steps), keep going while the FID drops, shrink the steps when no move helps.
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
from kve_lightning.metrics import feature_moments, frechet_distance, matrix_sqrt
from kve_lightning.sampling import GAMMA_MAX, SamplerSettings

SEARCHED = ("s_churn", "s_min", "s_max", "s_noise")
# S_noise searched within: EDM's are 1.003-1.007, tuned ones here 0.77-0.92 (README); far outside, the churn noise is
# mostly added or mostly missing and the FID moves by noise only
S_NOISE_RANGE = (0.5, 1.5)
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

    try:
        best = run(baseline)
    except KeyboardInterrupt:
        return arms  # none: interrupted in the first arm
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
    ``kve sample --config`` and ``kve export --config``."""
    model = {"num_steps": settings.num_steps} | {name: getattr(settings, name) for name in SEARCHED}
    model |= {k: getattr(settings, k) for k in fixed if k not in model}
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"model": model}, sort_keys=False)
