"""``kve tune``: the solver and its settings searched at a fixed NFE (``kve_lightning.search``)."""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kve_lightning.cli.common import DataSource, at_least, check_outputs, load_model, parse_device, writable_file
from kve_lightning.metrics import feature_net
from kve_lightning.sampling import SamplerSettings
from kve_lightning.guidance import guided_nfe
from kve_lightning.search import (GUIDANCE, METRICS, RESTART_PARTS, SEARCHED, SOLVER_SETTINGS, TUNED_SOLVERS, Arm,
                                  TunedSolver, describe, format_table, paired_intervals, per_class_scores, start, tune,
                                  winner_yaml)
from kve_lightning.search import plot as plot_arms
from kve_lightning.storage import save_atomic

DOC = """Tune the solver and its settings of a trained model at a fixed NFE budget.

    kve tune --ckpt_path runs/digits/checkpoints/last.ckpt --nfe 7 --n 1000 --budget 10 --out best.yaml
    kve sample --ckpt_path runs/digits/checkpoints/last.ckpt --config best.yaml --out samples/tuned

Every arm samples the same --n seeds (common random numbers: the same initial noise and the same per-step noise per
seed), so arms differ only by their settings, and spends at most --nfe network evaluations per image (each solver
takes the largest N within them: nfe_budget). The first arm is Algorithm 2 with EDM Table 5's VE settings (80 / 0.05
/ 1 / 1.007); then each of --solvers starts from its authors' settings on EDM's rho = 7 schedule (Restart: a
deterministic main pass and one interval on [0.5, 2]), and a compass search per solver, the least promising first
(none for one whose start has more than twice the best start's FID), moves one of its settings at a time: heun
S_churn, S_tmin, S_tmax, S_noise, the schedule, rho, the clip of D; restart its first interval's t_min, t_max, K,
N_restart, and heun's; dpmpp_2m_sde eta, S_noise, the schedule, rho, the solver type, the clip; dpmpp_2m the
schedule, rho, the clip; ipndm the order, the schedule, rho, the clip. A move is kept if it lowers the FID (against
the data set's images, --metric) unless it makes the second metric, FD-pixels (the Frechet distance of raw pixels'
principal components to half of the data set's images, as a multiple of the other half's), worse beyond its noise
than that search's best arm's or Table 5's (the paired --confidence interval of the difference above zero), with
finer steps when no move helps, until its share of --budget minutes would be exceeded (estimated from the arm times)
or no move helps; the winner is the solvers' best that wins by the same rule. The search space: S_tmin, S_tmax,
t_min, t_max in [sigma_min, sigma_max], S_churn in [0, N (sqrt(2) - 1)] (above, the churn is capped), S_noise in
[0.5, 1.5], eta in [0, 1.5], rho in [1, 20], K and N_restart up to 8. A model that can guide (a conditional model:
classifier-free guidance; any model given --guide_ckpt_path: autoguidance) has guidance searched with each solver's
settings, from w = 1: w by 0.5 in [1, 5] and the ends of the guidance interval (guidance_sigma_min,
guidance_sigma_max] by factors of 4 in [sigma_min, sigma_max]. --nfe bounds the solver's steps; guidance adds a
second network evaluation at each step inside its interval, and the NFE column counts both. A conditional model's
arms sample seed s in class s mod K and are judged per class: each metric is the mean over the classes of that
class's samples against that class's images. Ctrl-C ends it and writes the best arm so far (none: nothing written).
Each arm's FID and FD-pixels differences to Table 5 get paired bootstrap intervals (the same resampled seeds for
both arms, the real statistics fixed). Prints a table, writes a plot (--plot) and the best arm as a YAML config
(--out: `model:` with num_steps, the solver and its settings, and a comment with both metrics and this command) for
the --config of `kve predict`, `kve sample` and `kve export`; an existing --out or --plot is refused unless
--overwrite true. --model.* flags fix settings: the model's own for the rest (a searched one given is left out of
the search).
"""


def command_line(values: dict[str, Any]) -> str:
    """``kve tune`` with the options among ``values`` (``run``'s arguments) that are not their defaults."""
    defaults = {k: p.default for k, p in inspect.signature(run).parameters.items()}
    parts = []
    for key, value in values.items():
        if key == "model":
            parts += [f"--model.{k} {v}" for k, v in (value or {}).items()]
        elif key == "data":
            parts += [f"--data.{f.name} {getattr(value, f.name)}" for f in fields(value)
                      if getattr(value, f.name) != getattr(defaults["data"], f.name)]
        elif value != defaults[key]:
            shown = str(value).lower() if value in (True, False) else value
            shown = f"[{','.join(value)}]" if key == "solvers" else shown
            parts.append(f"--{key} {shown}")
    return " ".join(["kve tune", *parts])


def run(ckpt_path: str | None = None, pipeline: str | None = None, guide_ckpt_path: str | None = None, nfe: int = 35,
        solvers: list[TunedSolver] = list(TUNED_SOLVERS),
        metric: Literal["fid-digits", "fid-inception"] = "fid-digits", n: int = 1000, seed: int = 0,
        budget: float = 10.0, bootstrap: int = 200, confidence: float = 0.95, out: str = "best.yaml",
        plot: str | None = None,
        data: DataSource = DataSource(), batch_size: int = 500, device: str | None = None, overwrite: bool = False,
        model: dict[str, Any] | None = None) -> None:
    """Search, print the table, write the best arm's config and the plot.

    Args:
        ckpt_path: a checkpoint written by `kve fit` (read weights-only).
        pipeline: a folder written by `kve export`, instead of ``ckpt_path``.
        guide_ckpt_path: a checkpoint of a weaker model of the same data (an earlier checkpoint, a smaller UNet):
            autoguidance is searched (w and its interval); without one a conditional model searches classifier-free
            guidance.
        nfe: network evaluations per image, at most, without guidance: each arm's solver takes the largest N within
            them (``nfe_budget``; 35: N = 18 Heun steps, 35 DPM-Solver++ steps); guidance adds one per step inside
            its interval.
        solvers: the solvers searched, each from its own start; the first arm is Algorithm 2 (heun) whatever they
            are.
        metric: "fid-digits" (offline) or "fid-inception" (needs torch-fidelity and its weights).
        n: samples per arm: seeds ``seed`` to ``seed + n - 1``.
        seed: the first seed; also seeds the bootstrap.
        budget: minutes of wall time.
        bootstrap: bootstrap resamples.
        confidence: of the percentile intervals.
        out: the YAML config to write.
        plot: the plot to write (default: ``out`` with .png).
        data: the real images' data set (all of it; default: the checkpoint's).
        batch_size: images sampled at once.
        device: the torch device (default: cuda if available, else cpu).
        overwrite: replace an existing ``out`` or ``plot``.
    """
    command = command_line(locals())
    began = time.monotonic()
    for flag, value, low in (("--n", n, 2), ("--bootstrap", bootstrap, 1), ("--batch_size", batch_size, 1)):
        at_least(flag, value, low)
    if not budget > 0 or not math.isfinite(budget):
        raise ValueError(f"--budget must be a positive number of minutes, got {budget}")
    if not 0 < confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence}")
    if not 0 <= seed <= 2**63 - n:
        raise ValueError(f"--seed {seed}: seeds must lie in [0, 2**63)")
    fixed = dict(model or {})
    for name, flag in (("num_steps", "--nfe"), ("nfe_budget", "--nfe"), ("solver", "--solvers")):
        if name in fixed:
            raise ValueError(f"{name}={fixed[name]} is set by {flag} here: give {flag} instead")
    if not solvers or len(set(solvers)) < len(solvers):
        raise ValueError(f"--solvers must name each searched solver once, got {solvers}")
    # a fixed restart_intervals fixes all its parts
    fixed_names = set(fixed) | (set(RESTART_PARTS) if "restart_intervals" in fixed else set())
    plot = plot if plot else str(Path(out).with_suffix(".png"))
    check_outputs({"--out": out, "--plot": plot}, {"--ckpt_path": ckpt_path, "--pipeline": pipeline,
                                                   "--guide_ckpt_path": guide_ckpt_path})
    out, plot_path = writable_file(out, "--out", overwrite), writable_file(plot, "--plot", overwrite)
    device = parse_device(device)
    trained = load_model(ckpt_path, pipeline, device, guide_ckpt_path)
    classes = trained.denoiser.num_classes
    guiding = bool(classes) or trained.guide is not None
    if classes and n < 2 * classes:
        raise ValueError(f"--n {n}: a model of {classes} classes is judged per class and needs at least 2 samples of "
                         f"each (--n >= {2 * classes})")
    searched = sorted(({n for solver in solvers for n in SOLVER_SETTINGS[solver]}
                       | (set(GUIDANCE) if guiding else set())) - fixed_names)
    if not searched:
        raise ValueError(f"nothing to search: all settings of {solvers} are fixed by --model.* or --config")
    # guidance's search starts unguided, on the default interval (w = 1: Table 5's sampler)
    settings = trained.settings_with(fixed).replace(**{name: getattr(SamplerSettings(), name) for name in GUIDANCE
                                                       if name not in fixed})
    try:
        settings = settings.replace(solver="heun", nfe_budget=nfe)
    except ValueError as err:
        raise ValueError(f"--nfe {nfe}: {err}") from None
    baseline = settings.replace(**{name: getattr(SamplerSettings(), name) for name in SEARCHED  # Table 5
                                   if name not in fixed})
    starts = [s for s in (start(solver, settings, list(fixed)) for solver in solvers if solver != "heun") if s]
    try:
        net = feature_net(METRICS[metric]).to(device)
    except RuntimeError as err:  # fid-inception without torch-fidelity or its weights
        raise ValueError(str(err)) from None
    real = data.data_module(trained, held_out=False).full_dataset()
    with torch.no_grad():
        batches = list(tqdm(DataLoader(real, batch_size=batch_size), desc="real images", unit="batch"))
        real_images, real_labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        real_features = torch.cat([net(batch.to(device)).double().cpu() for batch in real_images.split(batch_size)])
    seeds = list(range(seed, seed + n))
    labels = [s % classes for s in seeds] if classes else None
    # an unconditional model is one class: all samples against all images
    one_class = torch.zeros(len(real_images), dtype=torch.long), torch.zeros(n, dtype=torch.long)
    scorers = per_class_scores(real_images, real_labels if classes else one_class[0], real_features,
                               torch.tensor(labels) if classes else one_class[1], bootstrap, seed)

    @torch.no_grad()
    def evaluate(arm: SamplerSettings) -> tuple[torch.Tensor, torch.Tensor]:
        features, pixels = [], []
        with tqdm(total=n, unit="img", desc="arm", leave=False) as bar:
            for first in range(0, n, batch_size):
                batch = seeds[first:first + batch_size]
                images = trained.sample(batch, arm, None if labels is None else labels[first:first + batch_size])
                images = images.to(device) * 2 - 1
                features.append(net(images).double().cpu())
                pixels.append(images.cpu())
                bar.update(len(batch))
        return torch.cat(features), torch.cat(pixels)

    def report(arm: Arm, best: Arm) -> None:
        tqdm.write(f"{describe(arm.settings)} (NFE {guided_nfe(arm.settings)}): {metric} {arm.fid:.2f}, FD-pixels "
                   f"{arm.pixels:.3f}x ({arm.seconds:.0f} s; this solver's best {best.fid:.2f}, {best.pixels:.3f}x)",
                   file=sys.stderr)

    budget_s = budget * 60 - (time.monotonic() - began)
    arms, best = tune(evaluate, scorers, baseline, searched, budget_s, confidence=confidence, report=report,
                      starts=starts)
    if best is None:
        print("kve tune: interrupted during the first (Table 5) arm: no arm finished, nothing written", file=sys.stderr)
        sys.exit(130)
    paired_intervals(arms, confidence)
    pct = f"{confidence:.0%}"
    judged = (f"; seed s in class s mod {classes}, each metric the mean over classes of a class's samples against "
              f"its images" if classes else "")
    summary = (f"{metric}, {n} samples per arm (seeds {seeds[0]}-{seeds[-1]} in every arm{judged}), at most {nfe} NFE "
               f"unguided (best: {guided_nfe(best.settings)}, N = {best.settings.num_steps}), solvers "
               f"{', '.join(solvers)}{', guidance' if guiding else ''}, {len(arms)} arms in "
               f"{(time.monotonic() - began) / 60:.1f} min")
    verdict = (f"best {metric} {best.fid:.2f} vs Table 5 {arms[0].fid:.2f}: difference {best.diff:+.2f}, {pct} paired "
               f"bootstrap interval [{best.interval[0]:+.2f}, {best.interval[1]:+.2f}] over {bootstrap} resamples; "
               f"FD-pixels {best.pixels:.3f}x vs {arms[0].pixels:.3f}x (real images: 1; sets of at most half "
               f"{'a class' if classes else 'the images'}), difference {best.pixels_diff:+.3f}, "
               f"[{best.pixels_interval[0]:+.3f}, {best.pixels_interval[1]:+.3f}]")
    print(f"{summary}\n\n{format_table(arms, best, confidence, metric)}\n\n{verdict}")
    header = [f"kve tune: the best of {len(arms)} arms, compass searches per solver from EDM Table 5's VE settings "
              f"and the solvers' own;", f"{summary}; model {trained.source};", f"{verdict};", f"found by: {command}"]
    text = winner_yaml(best.settings, fixed, header, guided=guiding and "guidance_scale" in searched)
    save_atomic(out, lambda f: f.write(text.encode()))
    plot_arms(arms, best, f"{metric}, n = {n}, NFE {nfe}: best - Table 5 = {best.diff:+.2f}, {pct} interval "
                     f"[{best.interval[0]:+.2f}, {best.interval[1]:+.2f}]; FD-pixels {best.pixels_diff:+.3f}",
              plot_path, metric)
    print(f"wrote {out} and {plot_path}", file=sys.stderr)

