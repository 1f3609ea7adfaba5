"""The solvers beyond Algorithm 2 against their authors' algorithms written out here in float64, the exact
probability-flow ODE of a Gaussian, and an exact mixture; NFE bookkeeping, per-seed noise and bad settings."""

import json
import math

import numpy as np
import pytest
import torch

from kve_lightning import inpaint_karras_ve, karras_ve_sigmas, sample_karras_ve
from kve_lightning.exact import GaussianMixture, gaussian_pf_ode_solution
from kve_lightning.sampling import SOLVERS, SamplerSettings, randn_per_row
from test_sampling import three_gaussians

SHAPE = (6, 1, 4, 4)
# Every reference below is its authors' code transcribed, in float64, fed the same noise in the same order. The
# two sides differ only in the order of a few roundings per step (e.g. (1 + gamma) sigma against sigma + gamma
# sigma, 3/2 d against 3 d / 2): about 10 roundings of 2.2e-16 per step over at most ~20 steps, amplified by at most
# a small factor by the mixture's denoiser (its Jacobian has norm <= 1 + ||mu||^2 / s^2 ~ 10 here), i.e. < 1e-13
# on values of order 1; 1e-12 leaves a margin of 10 and would still catch any difference in the formulas.
TOL = dict(rtol=1e-12, atol=1e-12)
RESTART = [[3, 2, 0.5, 2.0], [4, 1, 0.06, 0.3]]


def latents_and_noise(seed: int):
    """The start eps and a noise function drawing from a generator in the order the sampler does (one generator
    for the batch: ``randn_per_row`` then draws the batch at once, as ``torch.randn`` does)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), lambda: torch.randn(SHAPE, generator=g,
                                                                                   dtype=torch.float64)


def ours(seed: int, **settings) -> torch.Tensor:
    return sample_karras_ve(three_gaussians().denoiser, SHAPE, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64, **settings)


# ---------------------------------------------------------------- references, transcribed


def k_diffusion_dpmpp_2m(model, x, sigmas):
    """k-diffusion ``sampling.py:sample_dpmpp_2m``."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def k_diffusion_dpmpp_2m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """k-diffusion ``sampling.py:sample_dpmpp_2m_sde``, its ``noise_sampler(sigma, sigma_next)`` given."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                elif solver_type == "midpoint":
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (
                    -2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def diff_sampler_ipndm(net, latents, t_steps, max_order=4):
    """zju-pi/diff-sampler ``diff-solvers-main/solvers.py:ipndm_sampler`` (no AFS) with ``denoise_to_zero``;
    ``t_steps`` the positive sigmas."""
    x_next = latents * t_steps[0]
    buffer_model = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised = net(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer_model[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer_model[-1] + 5 * buffer_model[-2]) / 12
        elif order == 4:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer_model[-1] + 37 * buffer_model[-2]
                                                 - 9 * buffer_model[-3]) / 24
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur
        else:
            buffer_model.append(d_cur)
    return net(x_next, t_next)


def authors_restart_sampler(net, latents, randn_like, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
                            S_noise, restart_info, restart_gamma):
    """Newbeeer/diffusion_restart_sampling ``benchmarks/generate_restart.py:restart_sampler`` (not PFGM++), its
    ``get_steps`` in float64."""
    def get_steps(min_t, max_t, num_steps, rho):
        step_indices = torch.arange(num_steps, dtype=torch.float64)
        return (max_t ** (1 / rho) + step_indices / (num_steps - 1) * (min_t ** (1 / rho) - max_t ** (1 / rho))) ** rho

    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (
        sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    restart_list = json.loads(restart_info) if restart_info != "" else {}
    restart_list = {int(torch.argmin(abs(t_steps - v[2]), dim=0)): v for k, v in restart_list.items()}
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if i + 1 in restart_list.keys():
            restart_idx = i + 1
            for restart_iter in range(restart_list[restart_idx][1]):
                new_t_steps = get_steps(min_t=t_steps[restart_idx], max_t=restart_list[restart_idx][3],
                                        num_steps=restart_list[restart_idx][0], rho=rho)
                new_total_step = len(new_t_steps)
                x_next = x_next + randn_like(x_next) * (new_t_steps[0] ** 2 - new_t_steps[-1] ** 2).sqrt() * S_noise
                for j, (t_cur, t_next) in enumerate(zip(new_t_steps[:-1], new_t_steps[1:])):
                    x_cur = x_next
                    gamma = restart_gamma if S_min <= t_cur <= S_max else 0
                    t_hat = t_cur + gamma * t_cur
                    x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
                    denoised = net(x_hat, t_hat).to(torch.float64)
                    d_cur = (x_hat - denoised) / t_hat
                    x_next = x_hat + (t_next - t_hat) * d_cur
                    if j < new_total_step - 2 or new_t_steps[-1] != 0:
                        denoised = net(x_next, t_next).to(torch.float64)
                        d_prime = (x_next - denoised) / t_next
                        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ---------------------------------------------------------------- equality with the references


@pytest.mark.parametrize("schedule", ["ve", "edm"])
def test_dpmpp_2m_is_k_diffusions(schedule):
    settings = SamplerSettings(num_steps=9, schedule=schedule, solver="dpmpp_2m")
    latents, _ = latents_and_noise(0)
    theirs = k_diffusion_dpmpp_2m(three_gaussians().denoiser, settings.sigma_max * latents, settings.sigmas())
    torch.testing.assert_close(ours(0, settings=settings), theirs, **TOL)


@pytest.mark.parametrize("solver_type, eta, s_noise", [("midpoint", 1.0, 1.0), ("heun", 1.0, 1.0),
                                                       ("midpoint", 0.5, 1.007), ("heun", 0.0, 1.0)])
def test_dpmpp_2m_sde_is_k_diffusions(solver_type, eta, s_noise):
    """The same per-step Gaussian noise fed to both: k-diffusion's noise_sampler draws from a generator seeded as
    ours, after the same start eps (k-diffusion itself defaults to a Brownian tree over the batch)."""
    settings = SamplerSettings(num_steps=9, schedule="edm", solver="dpmpp_2m_sde", eta=eta, s_noise=s_noise,
                               sde_solver_type=solver_type)
    latents, noise = latents_and_noise(1)
    theirs = k_diffusion_dpmpp_2m_sde(three_gaussians().denoiser, settings.sigma_max * latents, settings.sigmas(),
                                      lambda sigma, sigma_next: noise(), eta, s_noise, solver_type)
    torch.testing.assert_close(ours(1, settings=settings), theirs, **TOL)


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    """eta = 0 removes the noise, and the midpoint update is then DPM-Solver++(2M)'s (the same formula regrouped)."""
    torch.testing.assert_close(ours(2, num_steps=8, solver="dpmpp_2m_sde", eta=0.0),
                               ours(2, num_steps=8, solver="dpmpp_2m"), **TOL)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_is_diff_samplers(order):
    settings = SamplerSettings(num_steps=10, schedule="edm", solver="ipndm", ipndm_order=order)
    latents, _ = latents_and_noise(3)
    theirs = diff_sampler_ipndm(three_gaussians().denoiser, latents, settings.sigmas()[:-1], order)
    torch.testing.assert_close(ours(3, settings=settings), theirs, **TOL)


def test_ipndm_of_order_1_is_euler():
    """diff-sampler's code fails for max_order=1 (it writes into its empty history); order 1 is Euler's method,
    Algorithm 2's Euler without churn."""
    torch.testing.assert_close(ours(3, num_steps=10, solver="ipndm", ipndm_order=1),
                               ours(3, num_steps=10, solver="euler", s_churn=0.0), **TOL)


@pytest.mark.parametrize("s_churn, restart_gamma, s_noise", [(0.0, 0.0, 1.0), (10.0, 0.05, 1.003)])
def test_restart_is_the_authors_restart_sampler(s_churn, restart_gamma, s_noise):
    """Two intervals, t_min snapped to the main grid (0.5 and 0.06 are not on it), K = 2 and 1, churn in the main
    pass and in the restarts inside [s_min, s_max]."""
    settings = SamplerSettings(num_steps=12, schedule="edm", solver="restart", restart_intervals=RESTART,
                               s_churn=s_churn, s_min=0.05, s_max=1.0, s_noise=s_noise, restart_gamma=restart_gamma)
    assert not any(abs(s - t) < 1e-3 for s in settings.sigmas().tolist() for _, _, t, _ in RESTART)
    latents, noise = latents_and_noise(4)
    info = json.dumps({str(k): v for k, v in enumerate(RESTART)})
    theirs = authors_restart_sampler(three_gaussians().denoiser, latents, lambda x: noise(), 12, 0.02, 100.0, 7.0,
                                     s_churn, 0.05, 1.0, s_noise, info, restart_gamma)
    torch.testing.assert_close(ours(4, settings=settings), theirs, **TOL)


# ---------------------------------------------------------------- convergence on the exact ODE


def pf_ode_error(sigmas: torch.Tensor, **settings) -> float:
    """Max error of x at sigma_{N-1} (before the last step, to 0) against the exact ODE solution of N(0.3, 0.5^2)."""
    mean, std = 0.3, 0.5
    gm = GaussianMixture(torch.ones(1), torch.full((1, 1, 2, 2), mean), torch.tensor([std]))
    latents = torch.randn((64, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = {}
    sample_karras_ve(gm.denoiser, latents.shape, sigmas=sigmas, latents=latents,
                     callback=lambda i, sigma, x, denoised: seen.__setitem__(i, x), **settings)
    exact = gaussian_pf_ode_solution(sigmas[0] * latents, sigmas[0].item(), sigmas[-2].item(), mean, std)
    return (seen[len(sigmas) - 2] - exact).abs().max().item()


def observed_orders(grid, steps, **settings) -> list[float]:
    errors = [pf_ode_error(grid(n), **settings) for n in steps]
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_dpmpp_2m_is_second_order():
    orders = observed_orders(lambda n: karras_ve_sigmas(n, dtype=torch.float64), [64, 128, 256], solver="dpmpp_2m")
    assert all(1.9 < p < 2.2 for p in orders), orders  # measured 2.02, 2.01


def uniform_sigmas(n: int) -> torch.Tensor:
    """N sigmas equally spaced from 2 down to 0.2, then 0 (diff-sampler's time-uniform schedule)."""
    return torch.cat([torch.linspace(2.0, 0.2, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_shows_its_order_on_equal_steps(order):
    """Adams-Bashforth of order p on equal steps: the error shrinks as h^p (measured 1.06/1.03, 1.92/1.97,
    2.87/3.04, 4.13/4.43 from N = 8 to 16 to 32). Two limits, both shown here: its warm-up steps of lower order leave
    an O(h^2) error, so for large N every order >= 2 ends second order (order 4 drops to 1.9 by N = 128 on this
    grid); and its fixed coefficients assume equal steps, so on the geometric VE schedule orders 3 and 4 are second
    order too."""
    orders = observed_orders(uniform_sigmas, [8, 16, 32], solver="ipndm", ipndm_order=order)
    assert all(order - 0.2 < p < order + 0.5 for p in orders), orders
    if order > 2:
        ve = observed_orders(lambda n: karras_ve_sigmas(n, dtype=torch.float64), [64, 128, 256], solver="ipndm",
                             ipndm_order=order)
        assert all(1.9 < p < 2.2 for p in ve), ve


# ---------------------------------------------------------------- exact-mixture quality


@pytest.mark.parametrize("settings", [
    dict(solver="dpmpp_2m_sde", s_noise=1.0), dict(solver="dpmpp_2m"), dict(solver="ipndm", schedule="edm"),
    dict(solver="restart", s_churn=0.0, s_noise=1.0, restart_intervals=[[6, 2, 0.05, 0.5]])], ids=str)
def test_new_solvers_reproduce_the_mixture(settings):
    gm = three_gaussians()
    n = 2000
    x = sample_karras_ve(gm.denoiser, (n, *gm.event_shape), nfe_budget=79, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0), **settings)
    labels = gm.nearest_mean(x)
    # binomial standard error of a weight is at most sqrt(0.25 / 2000) = 0.011: allow ~3.5 of them
    torch.testing.assert_close(torch.bincount(labels, minlength=3).double() / n, gm.weights, atol=0.04, rtol=0)
    for k in range(3):
        xk = x[labels == k].flatten(1)
        # a component mean's standard error is 0.2 / sqrt(n_k) per coordinate; the pooled variance's relative one
        # sqrt(2 / (16 n_k)) <= 2.1%, and 79 NFE leave a discretization bias of a few % (Heun: 1%): allow 10%
        torch.testing.assert_close(xk.mean(0), gm.means[k].flatten(), atol=5 * 0.2 / math.sqrt(len(xk)), rtol=0)
        assert xk.var(0).mean().item() == pytest.approx(0.2**2, rel=0.10)


# ---------------------------------------------------------------- bookkeeping


NFE_CASES = [dict(solver="heun", num_steps=6), dict(solver="euler", num_steps=6), dict(solver="dpmpp_2m", num_steps=6),
             dict(solver="dpmpp_2m_sde", num_steps=6), dict(solver="ipndm", num_steps=6),
             dict(solver="restart", num_steps=12, schedule="edm", restart_intervals=RESTART)]


@pytest.mark.parametrize("settings", NFE_CASES, ids=str)
def test_nfe_counts_denoiser_calls(settings):
    """heun 2N - 1, restart 2N - 1 + sum 2K (N_restart - 1) = 23 + 2*2*2 + 2*1*3 = 37, the others N."""
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma[0].item())
        return three_gaussians().denoiser(x, sigma)

    sample_karras_ve(denoiser, SHAPE, generator=torch.Generator().manual_seed(0), **settings)
    s = SamplerSettings(**settings)
    assert len(calls) == s.nfe == {"heun": 11, "euler": 6, "restart": 37}.get(s.solver, 6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_budget_sets_the_steps(solver):
    """The largest N whose NFE fits the budget: every budget from the smallest reachable one to 60 is met exactly,
    or, with two evaluations a step, by one fewer; a smaller budget is refused naming it."""
    intervals = dict(restart_intervals=[[3, 2, 0.5, 2.0]]) if solver == "restart" else {}
    lowest = {"heun": 3, "restart": 11}.get(solver, 2)  # restart: 2 * 2 - 1 + 2 * 2 * (3 - 1)
    for budget in range(lowest, 61):
        s = SamplerSettings(solver=solver, nfe_budget=budget, **intervals)
        assert budget - 1 <= s.nfe <= budget if solver in ("heun", "restart") else s.nfe == budget, (budget, s)
        assert s.replace(num_steps=s.num_steps + 1).nfe > budget  # the next N would overspend
    with pytest.raises(ValueError, match=f"nfe_budget={lowest - 1} is not reachable with solver='{solver}'"):
        SamplerSettings(solver=solver, nfe_budget=lowest - 1, **intervals)


def test_a_budget_follows_the_solver_and_a_step_count_replaces_it():
    budget = SamplerSettings(nfe_budget=15)
    assert budget.num_steps == 8 and budget.replace(solver="dpmpp_2m").num_steps == 15
    assert budget.replace(num_steps=4) == SamplerSettings(num_steps=4)
    assert budget.replace(num_steps=4, nfe_budget=7).num_steps == 4  # the budget given with it wins: 2 * 4 - 1
    assert SamplerSettings.from_mapping(budget.to_dict()) == budget


def test_the_manifest_of_algorithm2_is_that_of_earlier_versions():
    """Heun and Euler with every later setting at its default: the settings of earlier versions, no NFE; any other
    solver or setting: every setting and the NFE, in plain JSON (lists, not tuples)."""
    earlier = {"num_steps", "sigma_min", "sigma_max", "schedule", "rho", "s_churn", "s_min", "s_max", "s_noise",
               "solver", "clamp_denoised", "micro_batch"}
    for s in (SamplerSettings(), SamplerSettings(solver="euler", num_steps=7)):
        assert set(s.manifest()) == earlier and set(s.to_dict()) == earlier | {"extrapolate"}
    for s in (SamplerSettings(solver="restart", restart_intervals=RESTART, nfe_budget=40),
              SamplerSettings(nfe_budget=15), SamplerSettings(solver="ipndm", num_steps=7)):
        manifest = s.manifest()
        assert json.loads(json.dumps(manifest)) == manifest and manifest["nfe"] == s.nfe
        assert SamplerSettings.from_mapping(manifest) == s
    assert SamplerSettings(ipndm_order=3).manifest()["ipndm_order"] == 3


@pytest.mark.parametrize("solver", ["dpmpp_2m_sde", "restart"])
def test_a_rows_sample_depends_on_its_seed_only(solver):
    gm = three_gaussians()
    settings = SamplerSettings(num_steps=10, schedule="edm", solver=solver, restart_intervals=RESTART)
    seeds = list(range(100, 108))
    batch = sample_karras_ve(gm.denoiser, (8, *gm.event_shape), settings=settings,
                             generator=[torch.Generator().manual_seed(s) for s in seeds])
    for k in (0, 3, 7):
        alone = sample_karras_ve(gm.denoiser, (1, *gm.event_shape), settings=settings,
                                 generator=[torch.Generator().manual_seed(seeds[k])])
        assert torch.equal(batch[k], alone[0])
    other = sample_karras_ve(gm.denoiser, (8, *gm.event_shape), settings=settings,
                             generator=[torch.Generator().manual_seed(s) for s in reversed(seeds)])
    assert torch.equal(other.flip(0), batch)


def test_noise_is_drawn_from_each_rows_generator():
    """The start eps of ``randn_per_row``: with all churn and eta off, the latents drawn give the same sample."""
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    latents = randn_per_row((2, 1, 4, 4), gens(), None, torch.float64)
    for solver in ("dpmpp_2m_sde", "dpmpp_2m", "ipndm"):
        drawn = sample_karras_ve(three_gaussians().denoiser, (2, 1, 4, 4), num_steps=6, solver=solver, eta=0.0,
                                 generator=gens(), dtype=torch.float64)
        given = sample_karras_ve(three_gaussians().denoiser, (2, 1, 4, 4), num_steps=6, solver=solver, eta=0.0,
                                 latents=latents)
        assert torch.equal(drawn, given)


BAD = [
    (dict(eta=-0.5), "eta=-0.5"),
    (dict(eta=math.nan), "eta=nan"),
    (dict(restart_gamma=-1.0), "restart_gamma=-1.0"),
    (dict(sde_solver_type="euler"), "sde_solver_type='euler'"),
    (dict(ipndm_order=5), "ipndm_order=5"),
    (dict(ipndm_order=0), "ipndm_order=0"),
    (dict(ipndm_order=2.0), "ipndm_order=2.0"),
    (dict(nfe_budget=1), "nfe_budget=1"),
    (dict(nfe_budget=7.5), "nfe_budget=7.5"),
    (dict(nfe_budget=True), "nfe_budget=True"),
    (dict(solver="restart"), "restart_intervals=[]"),
    (dict(restart_intervals=[[3, 0, 0.5, 2.0]]), "[3, 0, 0.5, 2.0]"),  # K < 1
    (dict(restart_intervals=[[1, 2, 0.5, 2.0]]), "[1, 2, 0.5, 2.0]"),  # N_restart < 2
    (dict(restart_intervals=[[3, 2, 0.01, 2.0]]), "[3, 2, 0.01, 2.0]"),  # below sigma_min
    (dict(restart_intervals=[[3, 2, 0.5, 200.0]]), "[3, 2, 0.5, 200.0]"),  # above sigma_max
    (dict(restart_intervals=[[3, 2, 2.0, 0.5]]), "[3, 2, 2.0, 0.5]"),  # t_min > t_max
    (dict(restart_intervals=[[3, 2, 0.5]]), "[3, 2, 0.5]"),
    (dict(restart_intervals=[[3.5, 2, 0.5, 2.0]]), "[3.5, 2, 0.5, 2.0]"),
    (dict(restart_intervals="3,2,0.5,2"), "restart_intervals='3,2,0.5,2'"),
    (dict(solver="restart", restart_intervals=[[3, 5, 0.5, 2.0]], nfe_budget=20), "nfe_budget=20"),
]


@pytest.mark.parametrize("kwargs, needle", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_solver_settings_are_refused_naming_the_value(kwargs, needle):
    for door in (lambda: SamplerSettings(**kwargs), lambda: SamplerSettings().replace(**kwargs),
                 lambda: sample_karras_ve(lambda x, s: x, (1, 1, 2, 2), **kwargs)):
        with pytest.raises(ValueError) as err:
            door()
        assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("intervals, needle", [
    ([[3, 2, 90.0, 100.0]], "snaps to sigma_0"),  # nearest is sigma_0 = 100: no step lands there
    ([[3, 2, 0.5, 0.52]], "where no restart to t_max = 0.52 fits"),  # snaps above t_max
    ([[3, 2, 0.5, 2.0], [3, 1, 0.52, 1.0]], "as another interval's does"),
])
def test_restart_intervals_that_do_not_fit_the_main_grid_are_refused(intervals, needle):
    with pytest.raises(ValueError, match=needle):
        sample_karras_ve(lambda x, s: x, (1, 1, 2, 2), num_steps=6, solver="restart", restart_intervals=intervals)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s not in ("heun", "euler")])
def test_inpainting_refuses_a_solver_that_cannot_take_its_projection(solver):
    y, mask = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=f"solver='{solver}' cannot take that projection"):
        inpaint_karras_ve(lambda x, s: x, y, mask, solver=solver, restart_intervals=RESTART)


def test_the_validation_inpainting_grid_of_such_a_solver_runs_heun():
    """``kve fit --model.solver dpmpp_2m_sde`` logs its inpainting grid with Algorithm 2 (a tiny untrained UNet)."""
    from conftest import TINY_UNET
    from kve_lightning.lit.callbacks import InpaintingGrid
    from kve_lightning.lit.module import KarrasVeModule

    torch.manual_seed(0)
    module = KarrasVeModule(image_size=8, channels=1, unet=json.loads(TINY_UNET), sigma_max=0.5, num_steps=3,
                            solver="dpmpp_2m_sde").eval()
    grid = InpaintingGrid(images=1, completions=2).images(module, torch.zeros(1, 1, 8, 8))
    assert grid.isfinite().all() and grid.shape[-1] == 1 + 4 * (8 + 1)  # original | masked | 2 completions


def test_kve_sample_and_predict_spend_and_record_the_same_nfe(tmp_path, capsys, monkeypatch):
    """A checkpoint sampling with a budget (dpmpp_2m_sde, 7 NFE): both commands print the NFE spent and write the
    same manifest, recording it (so either resumes the other's folder); a step count given replaces the budget."""
    from conftest import untrained_checkpoint
    from kve_lightning.cli import cli_main

    ckpt = untrained_checkpoint(tmp_path / "t.ckpt", sigma_max=10.0, solver="dpmpp_2m_sde", nfe_budget=7)
    monkeypatch.chdir(tmp_path)
    for k, (flags, nfe) in enumerate((([], 7), (["--model.num_steps=3"], 3), (["--model.solver=heun"], 7))):
        folder = tmp_path / f"out{k}"
        cli_main(["predict", f"--ckpt_path={ckpt}", "--seeds=0-1", f"--out={folder}", "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false", *flags])
        assert f"({nfe} network evaluations per image)" in capsys.readouterr().err
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["sampler"]["nfe"] == nfe
        cli_main(["sample", f"--ckpt_path={ckpt}", "--seeds=0-2", f"--out={folder}", *flags])
        assert f"wrote 1 images to {folder} (2 were there; {nfe} network evaluations" in capsys.readouterr().err
        assert json.loads((folder / "manifest.json").read_text()) == manifest
