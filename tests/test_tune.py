"""kve tune: the Fréchet distance from stored features, the compass search on a metric with a known optimum, common
random numbers, the paired bootstrap, the budget, the YAML it writes (read by kve predict, kve sample, kve export)
and `--config` of kve sample / kve export; bad input."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_refused, export_script, sample_script
from kve_lightning.cli import cli_main
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import (digits_feature_net, digits_images, feature_moments, fid_from_images,
                                   frechet_distance, matrix_sqrt)
from kve_lightning.sampling import GAMMA_MAX, SamplerSettings
from kve_lightning.search import (GUIDANCE, SEARCHED, SOLVER_SETTINGS, TUNED_SOLVERS, Move, PerClass, Scorer,
                                  effect, moved,
                                  paired_intervals, start, tune, winner_yaml)

CHURN = {"s_churn": 2.5, "s_min": 0.1, "s_max": 7.0, "s_noise": 1.02}


def test_frechet_distance_matches_torchmetrics():
    """FID from stored features equals torchmetrics' FrechetInceptionDistance on the images; tolerance 1e-6
    relative: torchmetrics returns float32 (eps 6e-8) and square roots of near-zero eigenvalues of the singular
    64-d covariances differ by ~1e-8 between its eigvals(cov1 cov2) and our eigvalsh(cov1^1/2 cov2 cov1^1/2)."""
    real = digits_images(8, 1)
    fake = (real[:400] + 0.3 * torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    net = digits_feature_net()
    with torch.no_grad():
        mu_r, cov_r = feature_moments(net(real))
        fake_features = net(fake)
    ours = frechet_distance(mu_r, matrix_sqrt(cov_r), *feature_moments(fake_features)).item()
    assert ours == pytest.approx(fid_from_images(real, fake), rel=1e-6)
    # resampling weights give the moments of the resampled rows themselves
    index = torch.randint(400, (3, 400), generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(3, 400).scatter_add_(1, index, torch.ones(3, 400))
    mu_b, cov_b = feature_moments(fake_features, counts)
    for b in range(3):
        mu, cov = feature_moments(fake_features[index[b]])
        torch.testing.assert_close(mu_b[b], mu)
        torch.testing.assert_close(cov_b[b], cov)


def scorer_and_noise(n=200, d=4, resamples=50):
    """Features Z of n seeds (fixed: the common random numbers) and a Scorer whose real statistics are Z's own."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return Scorer.from_real(z, n, resamples, seed=0), z


def test_finds_a_known_optimum():
    """A fake metric: features Z + v(settings), real statistics those of Z, so FID = |v|^2 exactly (a shift leaves
    the covariance alone), with its minimum 0 at S_tmax = 5, S_tmin = 0.2, S_churn = 0.3 N (sqrt(2) - 1),
    S_noise = 1. The search ends within half its finest step of each: factor 10^(1/4) for S_tmin/S_tmax, N (sqrt(2)
    - 1) / 8 for S_churn, 0.005 for S_noise (steps 10, N (sqrt(2) - 1) / 2, 0.02 halved twice)."""
    scorer, z = scorer_and_noise()
    baseline = SamplerSettings(num_steps=100)  # sigma ratio 1.09 per step: every move changes the churned steps
    cap = 100 * GAMMA_MAX

    def v(s: SamplerSettings) -> torch.Tensor:
        return torch.tensor([math.log10(s.s_max / 5), math.log10(s.s_min / 0.2), min(s.s_churn, cap) / cap - 0.3,
                             (s.s_noise - 1) / 0.02], dtype=torch.float64)

    arms, best = tune(lambda s: (z + v(s), z), (scorer, scorer), baseline, SEARCHED, budget_s=1e9)
    assert best is min(arms, key=lambda a: a.fid)  # FD-pixels the same in every arm: it vetoes nothing
    s = best.settings
    assert abs(math.log10(s.s_max / 5)) <= 0.125 + 1e-3 and abs(math.log10(s.s_min / 0.2)) <= 0.125 + 1e-3
    assert abs(s.s_churn - 0.3 * cap) <= cap / 16 + 1e-3 and abs(s.s_noise - 1) <= 0.0025 + 1e-9
    assert best.fid == pytest.approx(v(s).square().sum().item(), abs=1e-9)
    assert arms[0].settings == baseline and best.fid < arms[0].fid / 50


def test_a_move_that_worsens_fd_pixels_beyond_its_noise_is_refused():
    """The FID of ``test_finds_a_known_optimum`` wants S_noise = 1; FD-pixels' features are Z shifted by
    200 (1.007 - S_noise) along one axis, so every S_noise move of the finest step (0.005) adds 1 to FD-pixels
    while the paired resamples move it by 2 * 1 * (the resampled mean's deviation, sd 1 / sqrt(200) = 0.07): far
    beyond the noise. The search must keep Table 5's S_noise and still find the other three settings."""
    scorer, z = scorer_and_noise()
    baseline = SamplerSettings(num_steps=100)
    cap = 100 * GAMMA_MAX

    def evaluate(s: SamplerSettings) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.tensor([math.log10(s.s_max / 5), math.log10(s.s_min / 0.2), min(s.s_churn, cap) / cap - 0.3,
                          (s.s_noise - 1) / 0.02], dtype=torch.float64)
        return z + v, z + torch.tensor([200 * (1.007 - s.s_noise), 0, 0, 0], dtype=torch.float64)

    arms, best = tune(evaluate, (scorer, scorer), baseline, SEARCHED, budget_s=1e9)
    s = best.settings
    assert s.s_noise == baseline.s_noise and best.pixels == arms[0].pixels == 0
    assert abs(math.log10(s.s_max / 5)) <= 0.125 + 1e-3 and abs(math.log10(s.s_min / 0.2)) <= 0.125 + 1e-3
    assert abs(s.s_churn - 0.3 * cap) <= cap / 16 + 1e-3
    lowest = min(arms, key=lambda a: a.fid)
    assert lowest.fid < best.fid and lowest.settings.s_noise < baseline.s_noise  # tried, lower FID, refused


def test_guidance_is_searched_with_the_churn():
    """A fake metric of guidance (FID = |v|^2, as above) that wants w = 2 on the evaluations at sigma <= 2 exactly
    and S_noise = 0.907: v = ((w - 2) / 0.5, evaluations guided above 2, evaluations unguided at or below 2, (S_noise
    - 0.907) / 0.02), each guided-or-not count of the solver's own evaluations (``guidance.evaluated_sigmas``). From
    w = 1 (no guidance: every interval the same arm) the search finds w within half its finest step (0.5 / 4) and
    both interval ends where the counts are 0: guidance_sigma_max within one finest factor (4^(1/4)) of the
    evaluated sigma nearest 2 and below the next above it, guidance_sigma_min below the smallest evaluated
    sigma."""
    from kve_lightning.guidance import evaluated_sigmas, guides_at

    scorer, z = scorer_and_noise()
    baseline = SamplerSettings(num_steps=18, sigma_max=10.0)
    evaluated = evaluated_sigmas(baseline)
    seen = []

    def v(s: SamplerSettings) -> torch.Tensor:
        guided = guides_at(s, evaluated_sigmas(s))
        sigma = evaluated_sigmas(s)
        seen.append(s)
        return torch.tensor([(s.guidance_scale - 2) / 0.5, float((guided & (sigma > 2)).sum()),
                             float((~guided & (sigma <= 2)).sum()) if s.guidance_scale != 1 else 10.0,
                             (s.s_noise - 0.907) / 0.02], dtype=torch.float64)

    arms, best = tune(lambda s: (z + v(s), z), (scorer, scorer), baseline, [*SEARCHED, *GUIDANCE], budget_s=1e9)
    s = best.settings
    assert best.fid == pytest.approx(0, abs=1e-3) and abs(s.guidance_scale - 2) <= 0.0625 + 1e-9
    above, below = evaluated[evaluated > 2].min().item(), evaluated[evaluated <= 2].max().item()
    assert below <= s.guidance_sigma_max < above and s.guidance_sigma_min < evaluated.min().item()
    # at w = 1 no interval was tried twice: one arm per effect
    assert len({effect(a) for a in seen}) == len(seen) and all(a.guidance_scale != 1 or a.guidance_sigma_max == math.inf
                                                               for a in seen)


def test_per_class_scores_are_the_mean_of_each_classes_distance():
    """``PerClass`` of a Scorer per class is the mean of the classes' Frechet distances (each class's rows against
    its own real statistics), on all rows and on each bootstrap resample."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    real = [torch.randn(50, 3, generator=g, dtype=torch.float64) + c for c in range(3)]
    scorers = [Scorer.from_real(real[c], 20, 7, seed=c) for c in range(3)]
    rows = [torch.nonzero(labels == c).flatten() for c in range(3)]
    value, resampled = PerClass(scorers, rows)(features)
    each = [scorers[c](features[rows[c]]) for c in range(3)]
    def closed_form(a, b):  # ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), scipy's sqrtm
        import scipy.linalg

        (mu_a, c_a), (mu_b, c_b) = feature_moments(a), feature_moments(b)
        return ((mu_a - mu_b).square().sum() + torch.trace(c_a + c_b)).item() - 2 * float(
            scipy.linalg.sqrtm((c_a @ c_b).numpy()).real.trace())

    assert value == pytest.approx(sum(closed_form(real[c], features[rows[c]]) for c in range(3)) / 3, rel=1e-9)
    torch.testing.assert_close(resampled, sum(r for _, r in each) / 3, rtol=1e-12, atol=0)


def solver_metric(s: SamplerSettings) -> torch.Tensor:
    """A fake metric over solvers (FID = |v|^2, as in ``test_finds_a_known_optimum``): DPM-Solver++(2M) SDE reaches
    0 at eta = 0.5, rho = 4, S_noise = 1.1, clipped, midpoint; Algorithm 2 at best 1 (S_tmax = 5), Restart 1.21
    (t_max = 4), DPM-Solver++(2M) 1.44 everywhere, iPNDM 100 (more than twice the best start's: not searched)."""
    if s.solver == "dpmpp_2m_sde":
        v = [s.eta - 0.5, (s.rho - 4) / 8 if s.schedule == "edm" else 1.0, (s.s_noise - 1.1) / 0.2,
             (0.0 if s.clamp_denoised else 0.7) + (0.0 if s.sde_solver_type == "midpoint" else 0.5)]
    elif s.solver == "heun":
        v = [1.0, math.log10(s.s_max / 5), 0, 0]
    elif s.solver == "restart":
        v = [1.1, math.log10(s.restart_intervals[0][3] / 4), 0, 0]
    else:
        v = [1.2 if s.solver == "dpmpp_2m" else 10.0, 0, 0, 0]
    return torch.tensor(v, dtype=torch.float64)


def solver_search(pixels=lambda s: torch.zeros(4, dtype=torch.float64)):
    scorer, z = scorer_and_noise()
    settings = SamplerSettings(sigma_max=10.0, nfe_budget=15)
    starts = [start(solver, settings, []) for solver in TUNED_SOLVERS if solver != "heun"]
    return tune(lambda s: (z + solver_metric(s), z + pixels(s)), (scorer, scorer), settings,
                sorted({n for names in SOLVER_SETTINGS.values() for n in names}), budget_s=1e9, starts=starts)


def test_finds_the_best_solver_and_its_settings():
    """Every solver's start runs, on the same budget (N from nfe_budget); the compass searches find DPM-Solver++(2M)
    SDE's optimum within half of each finest step (eta 0.25 / 8, rho 2 / 8, S_noise 0.02 / 8) with its discrete
    choices; iPNDM is not searched beyond its start; no effect runs twice; the YAML holds what won."""
    arms, best = solver_search()
    assert [a.settings.solver for a in arms[:5]] == ["heun", "restart", "dpmpp_2m_sde", "dpmpp_2m", "ipndm"]
    assert all(a.settings.nfe <= 15 for a in arms) and {a.settings.nfe for a in arms[:5]} == {15}
    assert arms[1].settings.restart_intervals == ((3, 2, 0.5, 2.0),) and arms[1].settings.num_steps == 4
    assert [a.settings.solver for a in arms].count("ipndm") == 1
    assert {"heun", "restart", "dpmpp_2m"} <= {a.settings.solver for a in arms[5:]}  # searched
    assert len({effect(a.settings) for a in arms}) == len(arms)
    s = best.settings
    assert s.solver == "dpmpp_2m_sde" and s.clamp_denoised and s.sde_solver_type == "midpoint"
    assert abs(s.eta - 0.5) <= 0.25 / 8 + 1e-9 and abs(s.rho - 4) <= 2 / 8 + 1e-9 and s.schedule == "edm"
    assert abs(s.s_noise - 1.1) <= 0.02 / 8 + 1e-9 and best is min(arms, key=lambda a: a.fid)
    restart = min((a for a in arms if a.settings.solver == "restart"), key=lambda a: a.fid)
    assert restart.settings.restart_intervals[0][3] == pytest.approx(4, rel=0.2)  # t_max found too
    model = yaml.safe_load(winner_yaml(s, {}, ["found"]))["model"]
    assert list(model) == ["num_steps", "solver", "eta", "s_noise", "schedule", "rho", "sde_solver_type",
                           "clamp_denoised"]
    assert SamplerSettings(sigma_max=10.0).replace(**model) == s.replace(num_steps=15)


def test_the_yaml_writes_w_where_guidance_was_searched_or_fixed():
    """An unguided winner of a search that moved guidance says w = 1, and so does a fixed w = 1 (``to_dict`` leaves
    w out at 1, and a checkpoint that guides would then keep its own); a search without guidance writes none."""
    s = SamplerSettings(num_steps=18)
    assert "guidance_scale" not in yaml.safe_load(winner_yaml(s, {}, ["x"]))["model"]
    for model in (yaml.safe_load(winner_yaml(s, {}, ["x"], guided=True))["model"],
                  yaml.safe_load(winner_yaml(s, {"guidance_scale": 1.0}, ["x"]))["model"]):
        assert model["guidance_scale"] == 1.0 and "guidance_sigma_max" not in model
    guided = yaml.safe_load(winner_yaml(s.replace(guidance_scale=1.5, guidance_sigma_max=2.0), {}, ["x"], True))
    assert {k: guided["model"][k] for k in GUIDANCE} == {"guidance_scale": 1.5, "guidance_sigma_max": 2.0,
                                                         "guidance_sigma_min": 0.0}


def test_a_solver_that_worsens_fd_pixels_beyond_its_noise_does_not_win():
    """FD-pixels' features shifted by 5 in every DPM-Solver++(2M) SDE arm: worse than Table 5's beyond any noise,
    so none of its moves is taken and, although it has the lowest FID, Algorithm 2's best wins."""
    arms, best = solver_search(lambda s: torch.tensor([5.0 if s.solver == "dpmpp_2m_sde" else 0, 0, 0, 0],
                                                      dtype=torch.float64))
    lowest = min(arms, key=lambda a: a.fid)
    assert lowest.settings.solver == "dpmpp_2m_sde" and best.settings.solver == "heun"
    assert best is min((a for a in arms if a.settings.solver != "dpmpp_2m_sde"), key=lambda a: a.fid)
    head, *moves = [a.settings.to_dict() for a in arms if a.settings.solver == "dpmpp_2m_sde"]
    assert len(moves) >= 5 and all(sum(m[k] != head[k] for k in head) == 1 for m in moves)  # never left its start


def test_restart_moves_stay_within_the_budget():
    """At 7 NFE Restart starts from [2, 1] (N = 3 main steps); K = 2 leaves N = 2, K = 3 no main pass: refused."""
    s = start("restart", SamplerSettings(sigma_max=10.0, nfe_budget=7), [])
    assert s.restart_intervals == ((2, 1, 0.5, 2.0),) and s.num_steps == 3 and s.nfe == 7
    more = moved(s, Move("restart_k", 1, "integer"), 1, 0)
    assert more.restart_intervals[0][1] == 2 and more.num_steps == 2 and more.nfe == 7
    assert moved(more, Move("restart_k", 1, "integer"), 1, 0) is None
    up = moved(s, Move("restart_t_min", 2.0, "log"), 1, 0)
    assert up.restart_intervals == ((2, 1, 1.0, 2.0),) and moved(up, Move("restart_t_min", 2.0, "log"), 1, 0) is None
    down = Move("restart_t_max", 2.0, "log")
    lower = moved(moved(s, down, -1, 1), down, -1, 1)
    assert lower.restart_intervals[0][3] == pytest.approx(1.0, abs=1e-3)  # t_min snaps to sigma_1 = 0.87 < t_max
    assert moved(lower, down, -1, 1) is None  # t_max 0.707 < sigma_1: no restart fits
    fixed = start("restart", SamplerSettings(sigma_max=10.0, nfe_budget=7, restart_intervals=[[2, 1, 0.1, 1.0]]), [])
    assert fixed.restart_intervals == ((2, 1, 0.1, 1.0),)  # given intervals are kept


def test_identical_arms_have_a_zero_interval():
    """Paired: the same resampled seeds for both arms, so an arm that samples what the baseline samples differs by
    exactly 0 in every resample."""
    scorer, z = scorer_and_noise()
    arms, _ = tune(lambda s: (z + 0.1, z + 0.2), (scorer, scorer), SamplerSettings(num_steps=18), SEARCHED,
                   budget_s=1e9)
    paired_intervals(arms)
    assert len(arms) > 5
    assert all(a.diff == 0 and a.interval == (0.0, 0.0) for a in arms)
    assert all(a.pixels_diff == 0 and a.pixels_interval == (0.0, 0.0) for a in arms)
    assert arms[0].resampled.std() > 0  # the resamples do differ from each other


def test_budget_and_interrupt():
    """No arm starts once elapsed + mean arm time would pass the budget; Ctrl-C ends the search with its arms."""
    scorer, z = scorer_and_noise()
    now = [0.0]

    def evaluate(s):
        now[0] += 60
        return z + s.s_max, z

    arms, _ = tune(evaluate, (scorer, scorer), SamplerSettings(num_steps=18), SEARCHED, budget_s=300,
                   clock=lambda: now[0])
    assert len(arms) == 5 and now[0] == 300
    calls = []

    def interrupted(s):
        calls.append(s)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return z + s.s_max, z

    arms, best = tune(interrupted, (scorer, scorer), SamplerSettings(num_steps=18), SEARCHED, budget_s=1e9)
    assert len(arms) == 2 and best in arms


@pytest.fixture
def spied_sampler(monkeypatch):
    """Every ``KarrasVeModule.sample`` call's seeds and settings."""
    calls = []
    original = KarrasVeModule.sample

    def sample(self, seeds, callback=None, **overrides):
        calls.append(([int(s) for s in seeds], overrides))
        return original(self, seeds, callback=callback, **overrides)

    monkeypatch.setattr(KarrasVeModule, "sample", sample)
    return calls


def tune_main(argv):
    """``kve tune ARGV``, in process."""
    cli_main(["tune", *argv])


def run_tune(ckpt, out, *args):
    tune_main(["--ckpt_path", str(ckpt), "--out", str(out), "--nfe", "5", "--n", "6", "--batch_size", "4",
               "--bootstrap", "20", "--device", "cpu", *args])
    return yaml.safe_load(out.read_text())["model"]


def test_every_arm_samples_the_same_seeds(trained_run, tmp_path, spied_sampler, capsys):
    _, ckpt = trained_run
    best = run_tune(ckpt, tmp_path / "best.yaml", "--seed", "10", "--budget", "1", "--model.micro_batch", "0")
    arms = [spied_sampler[k:k + 2] for k in range(0, len(spied_sampler), 2)]
    assert len(arms) >= 3 and len(spied_sampler) % 2 == 0
    steps = {"heun": 3, "restart": 2, "dpmpp_2m_sde": 5, "dpmpp_2m": 5, "ipndm": 5}  # the most within NFE 5
    for (first, settings), (second, same) in arms:
        assert (first, second) == ([10, 11, 12, 13], [14, 15]) and settings == same
        assert settings["micro_batch"] == 0  # a fixed setting
        spent = SamplerSettings.from_mapping(settings)
        assert spent.num_steps == steps[spent.solver] and spent.nfe == 5
    tried = [s for (_, s), _ in arms]
    assert {s["solver"] for s in tried} == set(TUNED_SOLVERS)  # every solver's start ran
    assert {k: tried[0][k] for k in SEARCHED} == {k: getattr(SamplerSettings(), k) for k in SEARCHED}  # Table 5
    assert tried[0]["solver"] == "heun"
    as_written = [SamplerSettings.from_mapping(s).to_dict() for s in tried]  # the YAML's forms: "inf", lists
    assert any(all(d.get(k) == v for k, v in best.items()) for d in as_written) and best["micro_batch"] == 0
    out = capsys.readouterr().out
    assert "| 0 (Table 5) |" in out and "**best**" in out and (tmp_path / "best.png").stat().st_size > 0
    header = (tmp_path / "best.yaml").read_text().splitlines()[:4]
    assert all(line.startswith("# ") for line in header) and "fid-digits, 6 samples per arm" in header[1]
    assert header[3] == (f"# found by: kve tune --ckpt_path {ckpt} --nfe 5 --n 6 --seed 10 --budget 1.0 --bootstrap 20 "
                         f"--out {tmp_path / 'best.yaml'} --batch_size 4 --device cpu --model.micro_batch 0")


def test_a_guide_makes_kve_tune_search_autoguidance(trained_run, tmp_path, spied_sampler, capsys):
    """An unconditional model with --guide_ckpt_path: arms with w != 1 (autoguidance), none with labels; without a
    guide the guidance settings are never moved."""
    _, ckpt = trained_run
    run_tune(ckpt, tmp_path / "auto.yaml", "--budget", "0.2", "--solvers", "[heun]", "--guide_ckpt_path", str(ckpt))
    scales = [overrides.get("guidance_scale", 1) for _, overrides in spied_sampler]
    assert any(w != 1 for w in scales) and all(o.get("labels") is None for _, o in spied_sampler)
    assert "--guide_ckpt_path" in (tmp_path / "auto.yaml").read_text()  # the command that found it
    spied_sampler.clear()
    run_tune(ckpt, tmp_path / "plain.yaml", "--budget", "0.2", "--solvers", "[heun]")
    assert spied_sampler and all(o.get("guidance_scale", 1) == 1 for _, o in spied_sampler)


def test_tiny_budget_writes_table5(trained_run, tmp_path, spied_sampler):
    _, ckpt = trained_run
    best = run_tune(ckpt, tmp_path / "best.yaml", "--budget", "1e-4")
    assert len(spied_sampler) == 2  # the baseline's two batches only
    own = KarrasVeModule.from_checkpoint(ckpt).sampler
    assert best == {"num_steps": 3, "solver": "heun"} | {k: getattr(SamplerSettings(), k) for k in SEARCHED} | {
        "schedule": own.schedule, "clamp_denoised": own.clamp_denoised}  # rho: no effect on the VE schedule
    # an existing --out and --plot are replaced with --overwrite true (refused without it: test_bad_tune_input)
    (tmp_path / "best.yaml").write_text("mine")
    assert run_tune(ckpt, tmp_path / "best.yaml", "--budget", "1e-4", "--overwrite", "true") == best


def manifest_sampler(folder):
    return json.loads((folder / "manifest.json").read_text())["sampler"]


@pytest.mark.parametrize("solvers", ["all", "[restart]", "[dpmpp_2m_sde]"])
def test_written_yaml_sets_predict_sample_and_export(trained_run, tmp_path, monkeypatch, solvers):
    """The YAML kve tune writes is a config for `kve predict --config`, `kve sample --config` and `kve export
    --config`, whichever solver won; their settings become its values (N from --nfe 5: 3 Heun steps, 2 of Restart's
    main pass, 5 of the others; the checkpoint has 4); flags override it."""
    _, ckpt = trained_run
    chosen = [] if solvers == "all" else ["--solvers", solvers]
    best = run_tune(ckpt, tmp_path / "best.yaml", "--budget", "0.02", *chosen)
    config = str(tmp_path / "best.yaml")
    assert KarrasVeModule.from_checkpoint(ckpt).sampler.num_steps == 4
    assert best["num_steps"] == {"heun": 3, "restart": 2}.get(best["solver"], 5)  # the most within NFE 5
    monkeypatch.chdir(tmp_path)
    cli_main(["predict", f"--ckpt_path={ckpt}", f"--config={config}", "--seeds=0-1",
              f"--out={tmp_path / 'predict'}", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false"])
    sample_script(["--ckpt_path", str(ckpt), "--config", config, "--out", str(tmp_path / "sample"), "--seeds", "0-1"])
    for folder in ("predict", "sample"):
        assert {k: manifest_sampler(tmp_path / folder)[k] for k in best} == best
    assert (tmp_path / "predict" / "000001.png").read_bytes() == (tmp_path / "sample" / "000001.png").read_bytes()
    export_script(["--ckpt_path", str(ckpt), "--config", config, "--out", str(tmp_path / "export")])
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in best} == best
    # a flag beats the file, on a hand-written config of other settings too
    # (a `kve fit` config: its training settings and other sections are dropped)
    (tmp_path / "churn.yaml").write_text(yaml.safe_dump({"model": CHURN | {"lr": 0.1}, "trainer": {"max_epochs": 1}}))
    sample_script(["--ckpt_path", str(ckpt), "--config", str(tmp_path / "churn.yaml"), "--model.s_noise", "1.05",
                   "--out", str(tmp_path / "flag"), "--seeds", "0"])
    assert {k: manifest_sampler(tmp_path / "flag")[k] for k in CHURN} == CHURN | {"s_noise": 1.05}


@pytest.fixture
def bad(tmp_path, trained_run):
    """Bad config files under tmp_path; returns ``fill(arg)`` for {tmp} and {ckpt}."""
    files = {"toplevel.yaml": "model:\n  s_churn: 1\ntrainers:\n  max_epochs: 1\n",
             "typo.yaml": "model:\n  s_chrun: 1\n", "scalar.yaml": "model: 3\n", "list.yaml": "- 1\n",
             "broken.yaml": "model: [1,\n", "value.yaml": "model:\n  s_churn: lots\n",
             "steps.yaml": "model:\n  num_steps: 4\n",
             "heun.yaml": yaml.safe_dump({"model": CHURN | {"schedule": "edm", "rho": 5.0, "clamp_denoised": True}}),
             "existing.yaml": "mine\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "folder").mkdir()
    _, ckpt = trained_run
    return lambda arg: arg.format(tmp=tmp_path, ckpt=ckpt)


CONFIG_CASES = [  # a `kve fit` config's other sections (trainer:, ...) and training settings (model.lr) are dropped
    ("toplevel.yaml", ["'trainers.max_epochs' is not accepted"]),
    ("typo.yaml", ["model", "'s_chrun'"]),
    ("scalar.yaml", ["scalar.yaml", "model: must be a mapping", "3"]),
    ("list.yaml", ["list.yaml", "Unexpected config", "- 1"]),
    ("broken.yaml", ["broken.yaml", "Problems parsing config", "line 2"]),
    ("value.yaml", ["value.yaml", "model.s_churn", "lots"]),
    ("missing.yaml", ["missing.yaml", "does not exist"]),
]


@pytest.mark.parametrize("name, needles", CONFIG_CASES, ids=[getattr(c, "values", c)[0] for c in CONFIG_CASES])
def test_bad_config_sample_and_export(bad, tmp_path, capsys, name, needles):
    config = f"{tmp_path}/{name}"
    line = assert_refused(lambda: sample_script(["--ckpt_path", bad("{ckpt}"), "--config", config,
                                                 "--out", f"{tmp_path}/out"]), capsys, *needles, folder=tmp_path)
    assert line.startswith("kve sample: error:"), line
    line = assert_refused(lambda: export_script(["--ckpt_path", bad("{ckpt}"), "--config", config,
                                                 "--out", f"{tmp_path}/ex"]), capsys, *needles, folder=tmp_path)
    assert line.startswith("kve export: error:"), line


TUNE_CASES = [
    (["--nfe", "2"], ["--nfe 2", "heun", "2N - 1"]),  # the Table 5 arm is Algorithm 2's, whatever --solvers
    (["--nfe", "1", "--solvers", "[dpmpp_2m]"], ["--nfe 1"]),
    (["--n", "1"], ["--n must be >= 2, got 1"]),
    (["--budget", "0"], ["--budget", "got 0.0"]),
    (["--budget", "nan"], ["budget", "nan"]),
    (["--bootstrap", "0"], ["--bootstrap must be >= 1"]),
    (["--confidence", "1"], ["--confidence"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--out", "{tmp}/folder"], ["folder", "is a directory"]),
    (["--out", "{tmp}/nowhere/best.yaml"], ["nowhere", "does not exist"]),
    (["--plot", "{tmp}/folder"], ["--plot", "is a directory"]),
    (["--out", "{tmp}/existing.yaml"], ["existing.yaml", "exists", "--overwrite true"]),
    (["--plot", "{tmp}/best.yaml"], ["--out and --plot are both", "best.yaml"]),
    (["--out", "{ckpt}"], ["--out", "is --ckpt_path"]),
    (["--model.num_steps", "4"], ["num_steps=4", "--nfe"]),
    (["--config", "{tmp}/steps.yaml"], ["num_steps=4", "--nfe"]),
    (["--config", "{tmp}/heun.yaml", "--solvers", "[heun]"], ["nothing to search", "['heun']"]),
    (["--model.solver", "restart"], ["solver=restart", "--solvers"]),
    (["--model.nfe_budget", "7"], ["nfe_budget=7", "--nfe"]),
    (["--solvers", "[ipndm,ipndm]"], ["--solvers", "once", "['ipndm', 'ipndm']"]),
    (["--solvers", "[]"], ["--solvers", "once", "[]"]),
    (["--solvers", "[euler]"], ["solvers", "euler"]),
    (["--config", "{tmp}/typo.yaml"], ["model", "'s_chrun'"]),
    (["--model.s_min", "5", "--model.s_max", "1"], ["s_min must be <= s_max"]),
    (["--ckpt_path", "{tmp}/missing.ckpt"], ["missing.ckpt", "does not exist"]),
    (["--pipeline", "{tmp}/folder"], ["folder", "not an exported"]),
    (["--data.dataset", "cifar10", "--data.root", "{tmp}/folder"], ["cifar10 not found"]),
    (["--metric", "fid-inception"], ["inception"]),
]


@pytest.mark.parametrize("args, needles", TUNE_CASES, ids=[" ".join(a) for a, _ in TUNE_CASES])
def test_bad_tune_input(bad, tmp_path, capsys, args, needles):
    if "fid-inception" in args and importlib.util.find_spec("torch_fidelity"):
        pytest.skip("torch-fidelity is installed: its weights may be cached here")
    argv = ([] if args[0] in ("--ckpt_path", "--pipeline") else ["--ckpt_path", "{ckpt}"]) + args + ["--device", "cpu"]
    argv += ([] if "--out" in args else ["--out", "{tmp}/best.yaml"]) + ([] if "--n" in args else ["--n", "4"])
    line = assert_refused(lambda: tune_main(list(map(bad, argv))), capsys, *needles, folder=tmp_path)
    assert line.startswith("kve tune: error:"), line


@pytest.mark.parametrize("nfe", [7, 15, 35])
def test_the_shipped_configs_spend_their_budget_and_say_how_they_were_found(nfe):
    """configs/digits_nfe{7,15,35}.yaml: settings spending the NFE in their name, and a comment with both metrics
    and the `kve tune` command that found them."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"digits_nfe{nfe}.yaml"
    text = path.read_text()
    settings = SamplerSettings(sigma_max=9.63, **yaml.safe_load(text)["model"])
    assert settings.nfe == nfe
    comments = [line for line in text.splitlines() if line.startswith("# ")]
    if nfe == 35:  # the default job's own sampler, which beat kve tune's 35-NFE result on both metrics
        default = yaml.safe_load((path.parent / "digits.yaml").read_text())["model"]
        shared = [k for k in default if k in settings.to_dict() and k != "sigma_max"]  # sigma_max: auto
        assert shared and all(settings.to_dict()[k] == default[k] for k in shared)
        assert any("FID-digits" in line and "FD-pixels" in line for line in comments) and "kve tune" in text
        return
    assert any("best fid-digits" in line and "FD-pixels" in line for line in comments)
    assert f"at most {nfe} NFE" in text
    assert "# found by: kve tune --ckpt_path runs/obj-ve/checkpoints/last.ckpt " in text
    assert f"--nfe {nfe} " in text
