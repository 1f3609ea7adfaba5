"""The search behind ``kve tune``: the solver and its settings at a fixed NFE, on common random numbers, judged by
two metrics.

EDM (Karras et al. 2022, Sec. 4, Appendix E.2) tuned the stochasticity per model by grid search and noted that the
search is noisy. Here every arm samples the same seeds (``module.sample`` / the pipeline draw x_0 and every step's
noise from one generator per seed), so two arms differ by their settings only; each arm's FID is compared with the
baseline's, EDM Table 5's VE settings of Algorithm 2 (``SamplerSettings``' defaults), by a paired bootstrap over the
seeds. The search is a compass search per solver (``SOLVER_SETTINGS``): Algorithm 2 from the baseline (S_churn,
S_tmin, S_tmax, S_noise, the schedule and rho, the clip), Restart, DPM-Solver++(2M) SDE, DPM-Solver++(2M) and iPNDM
from their authors' settings (``STARTS``), each with ``nfe_budget`` setting its N: move one setting at a time,
keep going while the FID drops, shrink the steps when no move helps.

Never one metric: every arm is also scored by FD-pixels (``kve_lightning.metrics.PixelFD``), and a move that lowers
the FID is refused when it makes FD-pixels worse beyond its noise (the paired interval of the difference lying above
zero), against the arm it improves on or against the baseline; so is a solver's best that lowers the FID of the
best so far.

A model that can guide (a conditional one, or any with a guide model) has guidance searched with every solver's
settings (``GUIDANCE``): its weight w and its interval (guidance_sigma_min, guidance_sigma_max], from w = 1. A
conditional model's arms are judged per class (``PerClass``): seed s samples class s mod K, and each metric is the
mean over classes of that class's samples against that class's images.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import torch
import yaml

from kve_lightning.guidance import evaluated_sigmas, guided_nfe, guides_at
from kve_lightning.storage import save_atomic
from kve_lightning.metrics import PixelFD, chunked_frechet, feature_moments, matrix_sqrt
from kve_lightning.sampling import (GAMMA_MAX, MAX_IPNDM_ORDER, SCHEDULES, SDE_SOLVER_TYPES, SamplerSettings,
                                    restart_grids)

TunedSolver = Literal["heun", "restart", "dpmpp_2m_sde", "dpmpp_2m", "ipndm"]
TUNED_SOLVERS: tuple[str, ...] = get_args(TunedSolver)
# Algorithm 2's churn settings: the baseline arm has EDM Table 5's
SEARCHED = ("s_churn", "s_min", "s_max", "s_noise")
# each solver's searched settings, in the order the compass search moves them; restart_n, restart_k, restart_t_min,
# restart_t_max are N_restart, K, t_min, t_max of Restart's first interval
RESTART_PARTS = ("restart_n", "restart_k", "restart_t_min", "restart_t_max")
SOLVER_SETTINGS: dict[str, tuple[str, ...]] = {
    "heun": (*SEARCHED, "schedule", "rho", "clamp_denoised"),
    "restart": ("restart_t_min", "restart_t_max", "restart_k", "restart_n", *SEARCHED, "schedule", "rho",
                "clamp_denoised"),
    "dpmpp_2m_sde": ("eta", "s_noise", "schedule", "rho", "sde_solver_type", "clamp_denoised"),
    "dpmpp_2m": ("schedule", "rho", "clamp_denoised"),
    "ipndm": ("ipndm_order", "schedule", "rho", "clamp_denoised"),
}
# guidance's settings, searched with every solver's where the model can guide (kve tune)
GUIDANCE = ("guidance_scale", "guidance_sigma_max", "guidance_sigma_min")
# where each solver's search starts, over the model's settings: its authors' defaults on EDM's rho = 7 schedule
# (k-diffusion's and diff-sampler's); Restart with a deterministic main pass and the interval of ``restart_start``
EDM_SCHEDULE = {"schedule": "edm", "rho": 7.0}
STARTS: dict[str, dict] = {
    "restart": EDM_SCHEDULE | {"s_churn": 0.0, "s_noise": 1.0},
    "dpmpp_2m_sde": EDM_SCHEDULE | {"eta": 1.0, "s_noise": 1.0, "sde_solver_type": "midpoint"},
    "dpmpp_2m": EDM_SCHEDULE,
    "ipndm": EDM_SCHEDULE | {"ipndm_order": 4},
}
# the value ranges searched where SamplerSettings allows more: S_noise's (EDM's are 1.003-1.007, tuned ones here
# 0.77-0.92, README; far outside, the noise is mostly added or mostly missing and the FID moves by noise only),
# eta's (0: DPM-Solver++(2M), k-diffusion's 1 adds as much noise as the step removes), rho's (EDM's ablation:
# 5-10 best), Restart's K and N_restart (beyond, a restart costs more than the main pass at these budgets), w's
# (1: none; EDM2's best weights are 1.2-2.5, the digits' above 3 lose every quality figure, BENCHMARKS.md)
RANGES = {"s_noise": (0.5, 1.5), "eta": (0.0, 1.5), "rho": (1.0, 20.0), "restart_k": (1, 8), "restart_n": (2, 8),
          "ipndm_order": (1, MAX_IPNDM_ORDER), "guidance_scale": (1.0, 5.0)}
CHOICES = {"schedule": SCHEDULES, "clamp_denoised": (False, True), "sde_solver_type": SDE_SOLVER_TYPES}
# a solver whose start has more than this many times the best start's FID is not searched further: at these sizes
# of step no search closed such a gap, and its share of the budget goes to the others
PRUNE = 2.0
METRICS = {"fid-digits": "digits", "fid-inception": "inception"}
# settings -> what the FID's and FD-pixels' scores take of the same n seeds: features [n, d], images
Evaluate = Callable[[SamplerSettings], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Move:
    """One searched setting: moved by factors ``step ** (1 / 2**level)`` ("log"), by ``step / 2**level``
    ("linear"), by ``max(1, round(step / 2**level))`` ("integer") or to the next of its ``CHOICES`` ("choice")."""

    name: str
    step: float
    kind: Literal["log", "linear", "integer", "choice"]


def moves(settings: SamplerSettings) -> list[Move]:
    """The moves of ``settings.solver``'s searched settings (``SOLVER_SETTINGS``) and guidance's (``GUIDANCE``):
    S_tmax, S_tmin by factors of 10 (EDM searched them on log grids), S_churn by half its useful range N (sqrt(2) -
    1) (above it gamma_i is capped), S_noise by 0.02, eta by 0.25, rho by 2, Restart's t_min, t_max by factors of 2
    and K, N_restart by 1, the iPNDM order by 1, w by 0.5 and the guidance interval's ends by factors of 4; the
    schedule, the clip and the SDE solver type are choices."""
    steps = {"s_max": (10.0, "log"), "s_min": (10.0, "log"), "s_churn": (settings.num_steps * GAMMA_MAX / 2, "linear"),
             "s_noise": (0.02, "linear"), "eta": (0.25, "linear"), "rho": (2.0, "linear"),
             "restart_t_min": (2.0, "log"), "restart_t_max": (2.0, "log"), "restart_k": (1, "integer"),
             "restart_n": (1, "integer"), "ipndm_order": (1, "integer"), "guidance_scale": (0.5, "linear"),
             "guidance_sigma_max": (4.0, "log"), "guidance_sigma_min": (4.0, "log")}
    return [Move(name, *steps.get(name, (0, "choice"))) for name in (*SOLVER_SETTINGS[settings.solver], *GUIDANCE)]


def value_of(settings: SamplerSettings, name: str) -> Any:
    """A searched setting's value: a field, or a part of Restart's first interval."""
    if name in RESTART_PARTS:
        return settings.restart_intervals[0][RESTART_PARTS.index(name)]
    return getattr(settings, name)


def with_value(settings: SamplerSettings, name: str, value: Any) -> SamplerSettings:
    """``settings`` with a searched setting replaced (validated: a ``ValueError`` where it does not fit, as an
    interval that leaves the main grid or a Restart that leaves no main step within the NFE budget)."""
    if name not in RESTART_PARTS:
        return settings.replace(**{name: value})
    first = list(settings.restart_intervals[0])
    first[RESTART_PARTS.index(name)] = value
    return fitted(settings.replace(restart_intervals=[first, *settings.restart_intervals[1:]]))


def fitted(settings: SamplerSettings) -> SamplerSettings:
    """``settings``, once Restart's intervals are known to fit its main grid (``restart_grids``: a ``ValueError``
    otherwise)."""
    if settings.solver == "restart":
        restart_grids(settings.sigmas().tolist(), settings.restart_intervals, settings.rho)
    return settings


def round_significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def moved(settings: SamplerSettings, move: Move, sign: int, level: int) -> SamplerSettings | None:
    """``settings`` with ``move.name`` moved one step in direction ``sign`` at refinement ``level``, rounded to 4
    significant digits (so that the YAML holds exactly what was measured) and kept where it has an effect: S_tmin,
    S_tmax, t_min, t_max and the guidance interval's ends in [sigma_min, sigma_max] (an open end, guidance_sigma_max
    inf or guidance_sigma_min 0, moves from the nearer of those), S_churn in [0, N (sqrt(2) - 1)], the rest in
    ``RANGES``.
    ``None`` when the move leaves the value unchanged or makes settings that do not fit (S_tmin > S_tmax, a
    Restart interval off the main grid or beyond the NFE budget)."""
    value = value_of(settings, move.name)
    if move.kind == "choice":
        options = CHOICES[move.name]
        new = options[(options.index(value) + sign) % len(options)]
    elif move.kind == "integer":
        low, high = RANGES[move.name]
        new = min(max(value + sign * max(1, round(move.step / 2**level)), low), high)
    else:
        cap = settings.num_steps * GAMMA_MAX if move.name == "s_churn" else math.inf
        value = min(value, settings.sigma_max if move.name == "guidance_sigma_max" else cap)
        value = max(value, settings.sigma_min) if move.name == "guidance_sigma_min" else value
        low, high = RANGES.get(move.name, (0.0, cap))
        if move.kind == "log":
            low, high = settings.sigma_min, settings.sigma_max
            new = value * move.step ** (sign / 2**level)
        else:
            new = value + sign * move.step / 2**level
        new = round_significant(min(max(new, low), high))
    if new == value:
        return None
    try:
        return with_value(settings, move.name, new)
    except ValueError:
        return None


def effect(settings: SamplerSettings) -> tuple:
    """What the solver does with the settings: two settings with the same effect sample the same images, so an arm
    is run once per effect. The solver, its noise levels and clip, and: with Algorithm 2 gamma, the steps i with
    S_tmin <= sigma_i <= S_tmax and S_noise (none without churn); with Restart also its grids and S_noise; with
    DPM-Solver++(2M) SDE eta, the solver type and (eta > 0) S_noise; with iPNDM its order; with guidance w and
    which of the evaluations it guides."""
    sigmas = settings.sigmas().tolist()
    common = (settings.solver, tuple(sigmas), settings.clamp_denoised)
    if settings.guidance_scale != 1:
        guided = tuple(guides_at(settings, evaluated_sigmas(settings)).tolist())
        common += (settings.guidance_scale, guided) if any(guided) else ()
    gamma = min(settings.s_churn / settings.num_steps, GAMMA_MAX)
    if settings.solver in ("heun", "euler"):
        steps = tuple(i for i, s in enumerate(sigmas[:-1]) if settings.s_min <= s <= settings.s_max)
        return common + ((gamma, steps, settings.s_noise) if gamma > 0 and steps else (0.0,))
    if settings.solver == "restart":
        grids = restart_grids(sigmas, settings.restart_intervals, settings.rho)
        return common + (gamma, settings.s_min, settings.s_max, settings.s_noise, settings.restart_gamma,
                         tuple((j, k, tuple(grid)) for j, (k, grid) in sorted(grids.items())))
    if settings.solver == "dpmpp_2m_sde":
        return common + (settings.eta, settings.sde_solver_type, settings.s_noise if settings.eta > 0 else None)
    return common + ((settings.ipndm_order,) if settings.solver == "ipndm" else ())


def start(solver: str, settings: SamplerSettings, fixed: Sequence[str]) -> SamplerSettings | None:
    """Where ``solver``'s search starts: ``settings`` (the model's, with an NFE budget) with ``STARTS[solver]``
    but for the ``fixed`` settings; Restart with the given intervals, else the first interval of [3, 2], [3, 1],
    [2, 1] (N_restart, K) on [0.5, 2] (the authors' example, within [sigma_min, sigma_max]) that leaves a main
    pass of at least 3 steps, else the first that fits at all. ``None`` where none fits."""
    settings = settings.replace(**{k: v for k, v in STARTS.get(solver, {}).items() if k not in fixed})
    if solver != "restart":
        return settings.replace(solver=solver)
    t_max = min(2.0, settings.sigma_max)
    t_min = min(max(0.5, settings.sigma_min), t_max / 2)
    candidates = [settings.restart_intervals] if settings.restart_intervals else [
        [[n, k, t_min, t_max]] for n, k in ((3, 2), (3, 1), (2, 1))]
    fitting = []
    for intervals in candidates:
        try:
            fitting.append(fitted(settings.replace(solver="restart", restart_intervals=intervals)))
        except ValueError:
            continue
    return next((s for s in fitting if s.num_steps >= 3), fitting[0] if fitting else None)


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


# a metric of a sample set: its value and its values on the bootstrap resamples (a Scorer, or one per class)
Score = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


@dataclass
class PerClass:
    """The mean over classes of one score per class, each of the rows ``rows[c]`` (the samples of class c) against
    that class's real images: a class-conditional model judged on every class alike. Each class's resamples draw
    within its own rows, the same for every arm, so differences stay paired."""

    scores: list[Score]
    rows: list[torch.Tensor]

    def __call__(self, features: torch.Tensor) -> tuple[float, torch.Tensor]:
        return self.mean(self.each(features))

    def each(self, features: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
        """Each class's score of its rows of ``features``: its value and its resampled values."""
        return [score(features[rows]) for score, rows in zip(self.scores, self.rows)]

    @staticmethod
    def mean(scores: list[tuple[float, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """The mean over classes of ``each``'s scores, and of their resamples."""
        return sum(value for value, _ in scores) / len(scores), torch.stack([r for _, r in scores]).mean(0)


def per_class_scores(real_images: torch.Tensor, real_labels: torch.Tensor, real_features: torch.Tensor,
                     labels: torch.Tensor, bootstrap: int, seed: int) -> tuple[PerClass, PerClass]:
    """The FID's and FD-pixels' scores of samples of classes ``labels`` (features [n, d] and images [n, C, H, W]
    in, the ``PerClass`` mean and its resamples out): per class c, the samples of c against the real images of c,
    FD-pixels on the principal axes of that class's images, in sets of at most half their count. ``kve tune``'s
    judge (an unconditional model's samples and images all of one class: the pooled FID and FD-pixels), and
    ``scripts/benchmark_guidance.py``'s per-class figures."""
    fid, pixels, rows = [], [], []
    for c in range(int(labels.max()) + 1):
        mine, theirs = torch.nonzero(labels == c).flatten(), real_labels == c
        if int(theirs.sum()) < 4:
            raise ValueError(f"class {c} has {int(theirs.sum())} real images: judging it per class needs at least 4")
        pixel_fd = PixelFD(real_images[theirs], len(mine))
        scorer = Scorer.from_moments(pixel_fd.mu, pixel_fd.sqrt_cov, len(mine), bootstrap, seed + c,
                                     pixel_fd.set_size, pixel_fd.floor)
        fid.append(Scorer.from_real(real_features[theirs], len(mine), bootstrap, seed + c))
        pixels.append(lambda images, scorer=scorer, pixel_fd=pixel_fd: scorer(pixel_fd.features(images)))
        rows.append(mine)
    return PerClass(fid, rows), PerClass(pixels, rows)


def worse_beyond_noise(resampled: torch.Tensor, than: torch.Tensor, confidence: float) -> bool:
    """Whether the paired ``confidence`` interval of the difference ``resampled - than`` lies above zero."""
    low = torch.quantile(resampled - than, torch.tensor((1 - confidence) / 2, dtype=torch.float64))
    return bool(low > 0)


def tune(evaluate: Evaluate, scorers: tuple[Score, Score], baseline: SamplerSettings, searched: Sequence[str],
         budget_s: float, clock: Callable[[], float] = time.monotonic, levels: int = 3, confidence: float = 0.95,
         report: Callable[[Arm, Arm], None] = lambda arm, best: None,
         starts: Sequence[SamplerSettings] = ()) -> tuple[list[Arm], Arm | None]:
    """Compass search from ``baseline`` and from each of ``starts`` (other solvers' starting points) over the
    ``searched`` settings of each one's solver (``SOLVER_SETTINGS``); returns the arms (the baseline first) and the
    best (``None`` if none finished).

    ``evaluate(settings)`` gives two feature sets of the same seeds, scored by ``scorers``: the FID's and
    FD-pixels'. An arm improves on another when it has the lower FID and its FD-pixels is not worse beyond its noise
    (``worse_beyond_noise`` at ``confidence``) than the other's or the baseline's. First the baseline and each
    start run once; then, the least promising (highest FID) first, each one's compass search (but for those with
    more than ``PRUNE`` times the best start's FID): every move of every
    setting is tried in both directions at each of ``levels`` step sizes, taken and repeated while it improves on
    that search's best. The best of all is the search's best that improves on the others'. Each search gets an equal
    share of the time left: no arm starts once the elapsed time plus the mean arm time so far would pass its share
    (the baseline always runs); an interrupt (Ctrl-C) also ends the search. ``report(arm, best)`` after each arm, with
    the best so far of its own search."""
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

    def out_of_time(deadline: float) -> bool:
        return clock() - start + sum(a.seconds for a in arms) / len(arms) > deadline

    def compass(deadline: float) -> None:
        """The compass search from ``bests[-1]``, which follows its best."""
        best = bests[-1]
        for level in range(levels):
            improved = True
            while improved:
                improved = False
                for move in (m for m in moves(best.settings) if m.name in searched):
                    for sign in (1, -1):
                        while (candidate := moved(best.settings, move, sign, level)) is not None:
                            if effect(candidate) in seen:
                                break
                            if out_of_time(deadline):
                                return
                            arm = run(candidate)
                            taken = improves(arm, best)
                            best = bests[-1] = arm if taken else best
                            report(arm, best)
                            if not taken:
                                break
                            improved = True

    try:
        overall = run(baseline)
        report(overall, overall)
    except KeyboardInterrupt:
        return arms, None  # none: interrupted in the first arm
    heads, bests = [overall], []
    try:
        for settings in starts:
            if effect(settings) not in seen and not out_of_time(budget_s):
                heads.append(run(settings))
                report(heads[-1], heads[-1])
        heads.sort(key=lambda arm: -arm.fid)
        promising = [head for head in heads if head.fid <= PRUNE * heads[-1].fid]
        for k, head in enumerate(promising):
            bests.append(head)
            compass(clock() - start + (budget_s - (clock() - start)) / (len(promising) - k))
    except KeyboardInterrupt:
        print("interrupted: reporting the arms so far", file=sys.stderr)
    for best in bests + heads:
        overall = best if improves(best, overall) else overall
    return arms, overall


def paired_intervals(arms: list[Arm], confidence: float = 0.95) -> None:
    """Each arm's FID and FD-pixels differences to the first arm (the baseline), with the percentile intervals of
    the differences over the shared bootstrap resamples (the real statistics fixed)."""
    base = arms[0]
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    for arm in arms:
        arm.diff, arm.pixels_diff = arm.fid - base.fid, arm.pixels - base.pixels
        arm.interval = tuple(torch.quantile(arm.resampled - base.resampled, q).tolist())
        arm.pixels_interval = tuple(torch.quantile(arm.pixels_resampled - base.pixels_resampled, q).tolist())


def searched_values(settings: SamplerSettings) -> dict[str, Any]:
    """The settings searched for ``settings.solver`` (``SOLVER_SETTINGS``) as ``SamplerSettings`` fields (Restart's
    interval parts as ``restart_intervals``), rho only where it has an effect (EDM's schedule or Restart's grids),
    and with guidance (w != 1) its settings."""
    names = [n for n in SOLVER_SETTINGS[settings.solver] if n not in RESTART_PARTS]
    names += ["restart_intervals"] if settings.solver == "restart" else []
    names += list(GUIDANCE) if settings.guidance_scale != 1 else []
    values = settings.to_dict()
    return {n: values[n] for n in names if n != "rho" or settings.schedule == "edm" or settings.solver == "restart"}


def describe(settings: SamplerSettings) -> str:
    """The solver and its searched settings, one short line (guidance as "w W on (LO, HI]")."""
    shown = {k: ("clip" if v else "no clip") if k == "clamp_denoised" else v
             for k, v in searched_values(settings).items() if k not in GUIDANCE}
    line = f"{settings.solver}: " + ", ".join(f"{v}" if isinstance(v, str) else f"{k} {v:g}" if isinstance(v, float)
                                              else f"{k} {v}" for k, v in shown.items())
    if settings.guidance_scale != 1:
        line += (f", w {settings.guidance_scale:g} on ({settings.guidance_sigma_min:g}, "
                 f"{settings.guidance_sigma_max:g}]")
    return line


def format_table(arms: list[Arm], best: Arm, confidence: float, metric: str = "FID") -> str:
    pct = f"{confidence:.0%}"
    lines = [f"| arm | settings | NFE | {metric} | diff to Table 5 | {pct} interval | FD-pixels (x real) | "
             f"diff to Table 5 | {pct} interval | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, arm in enumerate(arms):
        tag = " (Table 5)" if k == 0 else ""
        tag += " **best**" if arm is best else ""
        lines.append(f"| {k}{tag} | {describe(arm.settings)} | {guided_nfe(arm.settings)} | {arm.fid:.2f} | "
                     f"{arm.diff:+.2f} | "
                     f"[{arm.interval[0]:+.2f}, {arm.interval[1]:+.2f}] | {arm.pixels:.3f} | {arm.pixels_diff:+.3f} | "
                     f"[{arm.pixels_interval[0]:+.3f}, {arm.pixels_interval[1]:+.3f}] | {arm.seconds:.0f} |")
    return "\n".join(lines)


def plot(arms: list[Arm], best: Arm, title: str, path: Path, metric: str = "FID") -> None:
    """Each arm's FID and FD-pixels differences to the baseline, side by side, with their paired bootstrap
    intervals, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(12, 1.2 + 0.3 * len(arms)))
    y = list(range(len(arms)))[::-1]
    for ax, name, diff, interval in ((axes[0], metric, "diff", "interval"),
                                     (axes[1], "FD-pixels (x real)", "pixels_diff", "pixels_interval")):
        for arm, row in zip(arms, y):
            d, (low, high) = getattr(arm, diff), getattr(arm, interval)
            # a percentile interval need not hold the estimate itself (bootstrap bias): no negative bar
            ax.errorbar([d], [row], xerr=[[max(d - low, 0)], [max(high - d, 0)]], fmt="o",
                        color="C3" if arm is best else "C0", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{name} difference to Table 5 (paired bootstrap interval)", fontsize=8)
    axes[0].set_yticks(y, [f"{k}: {describe(a.settings)}" for k, a in enumerate(arms)], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    save_atomic(path, lambda f: f.write(buffer.getvalue()))


def winner_yaml(settings: SamplerSettings, fixed: dict, header: list[str], guided: bool = False) -> str:
    """``model:`` with N, the solver, its searched settings and the fixed ones: a config for ``kve predict
    --config``, ``kve sample --config`` and ``kve export --config``. Where the search moved guidance (``guided``) or
    it was fixed, w is written even at 1 (``to_dict`` leaves it out there), so that the config does not leave a
    checkpoint's own guidance in place."""
    model = {"num_steps": settings.num_steps, "solver": settings.solver} | searched_values(settings)
    written = settings.to_dict() | {"guidance_scale": settings.guidance_scale}
    model |= {k: v for k, v in written.items()
              if (k in fixed or guided and k == "guidance_scale") and k not in model}
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"model": model}, sort_keys=False)
