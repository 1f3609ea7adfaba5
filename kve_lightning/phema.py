"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2:
Sec. 3 and App. C): track power-function EMA profiles of the weights during training, save snapshots of them, and
afterwards reconstruct the EMA of any relative standard deviation as a least-squares combination of the snapshots.

A power-function EMA at training time t averages the weights theta(tau), tau in [0, t], with the profile
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (EDM2 eq. 3). Its width relative to t is
sigma_rel = (gamma + 1)^0.5 (gamma + 2)^-1 (gamma + 3)^-0.5 (eq. 123).

Time is the optimizer step. The per-step update theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1) (eq. 127) gives step i exactly the weight w_i = (i/t)^(gamma+1) - ((i-1)/t)^(gamma+1):
the profile integrated over (i - 1, i], i.e. the continuous average of the piecewise-constant weight trajectory.
So the closed-form inner products of the profiles (App. C.3) hold exactly for the discrete EMA.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

# sigma_rel(gamma) peaks where d/dgamma log sigma_rel^2 = 0, i.e. gamma^2 + 3 gamma + 1 = 0: gamma = (sqrt(5) - 3) / 2
GAMMA_AT_STD_MAX = (math.sqrt(5) - 3) / 2


def gamma_to_std(gamma: float) -> float:
    """sigma_rel of the power-function profile with exponent gamma > -1 (EDM2 eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


STD_MAX = gamma_to_std(GAMMA_AT_STD_MAX)  # 0.3003: no power-function profile is wider


def std_to_gamma(std: float) -> float:
    """The exponent gamma of relative std ``std`` in (0, STD_MAX) (EDM2 eq. 126, Algorithm 2): the largest root of
    (gamma + 2)^2 (gamma + 3) = (gamma + 1) / std^2, i.e. gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + 12 - std^-2."""
    if not 0 < std < STD_MAX:
        raise ValueError(f"relative std {std} is outside (0, {STD_MAX:.4f}): no power-function EMA has it")
    s2 = std**-2
    return float(np.roots([1, 7, 16 - s2, 12 - s2]).real.max())


def ema_beta(gamma: float, t: int, dt: int = 1) -> float:
    """beta of the update at step t, the previous one at t - dt: (1 - dt/t)^(gamma + 1) (EDM2 eq. 127)."""
    return (1 - dt / t) ** (gamma + 1)


def profile_inner(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor) -> torch.Tensor:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for profiles ending at t_a and t_b (EDM2 App. C.3, eq. 151):
    (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) max(t_a, t_b)) * (t_a/t_b)^(gamma_b if t_a < t_b else
    -gamma_a). Broadcasts; float64."""
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
            / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b)))


def profile_weights(t: int, gamma: float, length: int) -> torch.Tensor:
    """[length] weights of steps 1..length in the power-function EMA at step t (zero after t): the profile's mass on
    (i - 1, i], (min(i, t)/t)^(gamma + 1) - (min(i - 1, t)/t)^(gamma + 1)."""
    cdf = (torch.arange(length + 1, dtype=torch.float64).clamp(max=t) / t) ** (gamma + 1)
    return cdf.diff()


def solve_coefficients(ts: Sequence[int], gammas: Sequence[float], t: int, gamma: float) -> torch.Tensor:
    """Coefficients x of the snapshots (profiles ending at ``ts`` with exponents ``gammas``) whose combination
    sum_k x_k p_k is closest in L2 to the profile (t, gamma): the normal equations A x = b with A_jk = <p_j, p_k>,
    b_j = <p_j, p> (EDM2 App. C.3, Algorithm 3), solved by least squares (SVD: snapshots may be nearly dependent),
    then scaled to sum to 1 as EDM2 does, so that constant weights stay constant."""
    ts_, gammas_ = torch.tensor(ts, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64)
    a = profile_inner(ts_[:, None], gammas_[:, None], ts_[None], gammas_[None])
    b = profile_inner(ts_, gammas_, torch.tensor(float(t), dtype=torch.float64),
                      torch.tensor(gamma, dtype=torch.float64))
    x = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    return x / x.sum()


def profile_error(ts: Sequence[int], gammas: Sequence[float], x: torch.Tensor, t: int, gamma: float) -> float:
    """Half the L1 distance of the reconstructed and the target weights of steps 1..t, e = 1/2 sum_i |dw_i|.
    As sum_i dw_i = 0, every reconstructed weight is within e * (its range over steps 1..t) of the exact EMA:
    |sum_i dw_i theta_i| = |sum_i dw_i (theta_i - c)| <= 2e * max_i |theta_i - c| with c the midrange."""
    dw = -profile_weights(t, gamma, t)
    for t_k, gamma_k, x_k in zip(ts, gammas, x.tolist()):
        dw += x_k * profile_weights(t_k, gamma_k, t)
    return 0.5 * dw.abs().sum().item()


# ------------------------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True)
class Snapshot:
    """A saved power-function EMA: of relative std ``std`` at optimizer step ``step``, tracked since ``origin`` by the
    training run ``run`` (the SHA-256 prefix of its weights when tracking began; empty in older snapshots)."""
    path: Path
    step: int
    std: float
    origin: int
    run: str = ""

    @property
    def t(self) -> int:
        """Steps averaged: the profile's end in EDM2's t."""
        return self.step - self.origin


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:09d}-{std:.4f}.safetensors"


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in ``folder`` (``phema-*.safetensors``; step, std, origin and run from their header), by step
    and std; a ``ValueError`` naming a file that is not one, or whose header no training run writes (a step not after
    its origin, a std no power-function EMA has)."""
    snapshots = []
    for path in sorted(Path(folder).glob("phema-*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads(f.metadata()["phema"])
            snapshot = Snapshot(path, int(meta["step"]), float(meta["std"]), int(meta["origin"]),
                                str(meta.get("run", "")))
        except Exception as err:  # truncated, not safetensors, no or bad metadata
            raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot: {type(err).__name__}: {err}") from None
        if not (0 <= snapshot.origin < snapshot.step and 0 < snapshot.std < STD_MAX):
            raise ValueError(f"{str(path)!r} has an impossible header: step {snapshot.step}, origin {snapshot.origin}, "
                             f"std {snapshot.std} (need 0 <= origin < step and 0 < std < {STD_MAX:.4f})")
        snapshots.append(snapshot)
    return sorted(snapshots, key=lambda s: (s.step, s.std))


def reconstruction(snapshots: Sequence[Snapshot], std: float) -> tuple[torch.Tensor, float, int]:
    """(coefficients of ``snapshots``, profile error, step) of the EMA of relative std ``std`` at the newest
    snapshot's step; a ``ValueError`` if the snapshots come from different runs."""
    origins, runs = sorted({s.origin for s in snapshots}), sorted({s.run for s in snapshots})
    if len(origins) > 1 or len(runs) > 1:
        raise ValueError(f"the snapshots come from different runs (runs {runs}, tracked from steps {origins}): keep "
                         f"one run's")
    t = max(s.t for s in snapshots)
    ts, gammas = [s.t for s in snapshots], [std_to_gamma(s.std) for s in snapshots]
    gamma = std_to_gamma(std)
    x = solve_coefficients(ts, gammas, t, gamma)
    return x, profile_error(ts, gammas, x, t, gamma), t + origins[0]


def combine(snapshots: Sequence[Snapshot], coefficients: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """For each coefficient vector, sum_k x_k * snapshot_k (accumulated in float64, returned in the snapshots'
    dtypes); each file is read once, with a progress bar. A ``ValueError`` if the snapshots hold different tensors."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in coefficients]
    first: dict[str, torch.Tensor] = {}
    for k, snapshot in enumerate(tqdm(snapshots, unit="snapshot", desc="post-hoc EMA", leave=False)):
        tensors = load_file(snapshot.path)
        first = first or tensors
        if {n: v.shape for n, v in tensors.items()} != {n: v.shape for n, v in first.items()}:
            raise ValueError(f"{str(snapshot.path)!r} holds other tensors than {str(snapshots[0].path)!r}")
        bad = next((n for n, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()), None)
        if bad is not None:
            raise ValueError(f"{str(snapshot.path)!r} holds non-finite values in {bad}: refusing to average them")
        for out, x in zip(sums, coefficients):
            for name, value in tensors.items():
                out[name] = out.get(name, 0) + x[k].item() * value.double()
    return [{n: v.to(first[n].dtype) for n, v in out.items()} for out in sums]
