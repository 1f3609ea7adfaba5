"""Post-hoc EMA (EDM2): the sigma_rel <-> gamma map, the power-function EMA's exact step weights, the least-squares
reconstruction (against an EMA tracked directly, on random walks and in a real run), resume, and kve phema."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch.nn.utils import parameters_to_vector

from conftest import REPO, SHORT_FIT_ARGS, TINY_MODEL_ARGS, TINY_UNET, assert_refused, folder_state, sample_script
from kve_lightning import ImageDataModule, KarrasVeModule
from kve_lightning.cli import cli_main
from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.lit.ema import PostHocEMA
from kve_lightning.phema import (GAMMA_AT_STD_MAX, STD_MAX, Snapshot, combine, ema_beta, gamma_to_std, list_snapshots,
                                 profile_inner, profile_weights, reconstruction, std_to_gamma)

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------- the math


def test_std_gamma_round_trip_and_edm2_pairs():
    """EDM2 Sec. 3: sigma_rel 0.05 is gamma 16.97 and 0.10 is gamma 6.94 (the wider profile has the smaller gamma)."""
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for std in torch.linspace(0.001, 0.3, 300).tolist():
        assert gamma_to_std(std_to_gamma(std)) == pytest.approx(std, rel=1e-9)
    for gamma in (GAMMA_AT_STD_MAX + 1e-3, 0.0, 1.0, 6.94, 100.0, 1e4):
        assert std_to_gamma(gamma_to_std(gamma)) == pytest.approx(gamma, rel=1e-6)
    # STD_MAX is the peak of sigma_rel(gamma) over gamma > -1
    assert STD_MAX == pytest.approx(0.30028, abs=1e-5)
    assert max(gamma_to_std(g) for g in torch.linspace(-0.999, 50, 100_000).tolist()) <= STD_MAX
    for bad in (0.0, -0.1, STD_MAX, 0.5):
        with pytest.raises(ValueError, match="no power-function EMA"):
            std_to_gamma(bad)


def test_profile_inner_product_against_quadrature():
    """App. C.3's closed form of the integral of p_a p_b, against the midpoint rule on 10^6 points."""
    n = 1_000_000
    tau = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 10

    def p(t, gamma):
        return torch.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0)

    for (t_a, g_a), (t_b, g_b) in [((10, 6.94), (10, 16.97)), ((4, 16.97), (9, 6.94)), ((7.5, 0.5), (3, 2.0))]:
        quadrature = (p(t_a, g_a) * p(t_b, g_b)).sum() * 10 / n
        closed = profile_inner(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, g_a, t_b, g_b)))
        assert closed.item() == pytest.approx(quadrature.item(), rel=1e-6)


def power_ema(thetas: torch.Tensor, std: float, every: int) -> list[tuple[int, torch.Tensor]]:
    """The callback's update (beta from ``ema_beta``, a lerp) over the rows theta_1..theta_T: (step, average)
    every ``every`` steps."""
    gamma, average, out = std_to_gamma(std), thetas[0].clone(), []
    for t, theta in enumerate(thetas, start=1):
        average.lerp_(theta, 1 - ema_beta(gamma, t))
        if t % every == 0:
            out.append((t, average.clone()))
    return out


def test_random_walks_exact_ema_and_reconstruction_error():
    """On 2000 random walks of 600 steps (float64): the tracked EMA is exactly sum_i w_i theta_i with the
    profile's step weights; the reconstruction of std 0.07 from snapshots of 0.05 and 0.10 every 30 steps differs
    from the EMA of 0.07 tracked directly by exactly sum_i dw_i theta_i, within its bound e * range."""
    T, every = 600, 30
    thetas = torch.randn(T, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).cumsum(0)
    direct = power_ema(thetas, 0.07, T)[0][1]
    assert torch.allclose(direct, profile_weights(T, std_to_gamma(0.07), T) @ thetas, rtol=0, atol=1e-11)
    tracked = {std: power_ema(thetas, std, every) for std in (0.05, 0.10)}
    snapshots = [Snapshot(Path(), t, std, 0) for std in tracked for t, _ in tracked[std]]
    x, error, step = reconstruction(snapshots, 0.07)
    assert step == T and 0 < error < 0.01
    rebuilt = sum(x_k * average for x_k, (_, average) in zip(x, [a for std in tracked for a in tracked[std]]))
    dw = sum(x_k * profile_weights(s.t, std_to_gamma(s.std), T) for x_k, s in zip(x, snapshots))
    dw -= profile_weights(T, std_to_gamma(0.07), T)
    assert dw.sum().abs() < 1e-12 and 0.5 * dw.abs().sum().item() == pytest.approx(error, rel=1e-12)
    assert torch.allclose(rebuilt - direct, dw @ thetas, rtol=0, atol=1e-10)
    spread = thetas.amax(0) - thetas.amin(0)
    assert ((rebuilt - direct).abs() <= error * spread + 1e-10).all()
    rel_l2 = ((rebuilt - direct).norm() / direct.norm()).item()
    print(f"random walks: profile error {error:.4f}, max abs error {(rebuilt - direct).abs().max():.4f} "
          f"(walk spread up to {spread.max():.1f}), relative L2 error {rel_l2:.2e}")
    # a tracked std is its own reconstruction: the coefficients pick its newest snapshot
    x, error, _ = reconstruction(snapshots, 0.10)
    assert error < 1e-9 and x[-1] == pytest.approx(1, abs=1e-9)


# ---------------------------------------------------------------------------------------------- a real run


class Trajectory(Callback):
    """Sees what the callbacks see after each optimizer step (the raw weights theta_i): accumulates
    sum_i dw_i theta_i in float64 and each weight's min and max over the run."""

    def __init__(self, dw: torch.Tensor):
        self.dw = dw
        self.predicted = self.lo = self.hi = self.last = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        theta = parameters_to_vector(pl_module.parameters()).detach().double()
        if self.predicted is None:
            self.predicted, self.lo, self.hi = torch.zeros_like(theta), theta.clone(), theta.clone()
        self.predicted += self.dw[trainer.global_step - 1] * theta
        torch.minimum(self.lo, theta, out=self.lo), torch.maximum(self.hi, theta, out=self.hi)
        self.last = theta


def test_reconstruction_matches_an_ema_tracked_directly(tmp_path):
    """Tiny UNet on digits, 60 steps, EMA on and validations in between: std 0.07 reconstructed from snapshots of
    0.05 and 0.10 (every 6 steps, in the default folder) against a second PostHocEMA tracking 0.07 directly.

    Derived tolerances: the difference must be sum_i dw_i theta_i (the profile mismatch applied to the raw weights,
    accumulated in float64 as training runs) up to float32 rounding, and lie within the profile error e times each
    weight's range over the run (plus that rounding). Rounding: each lerp of magnitude <= M (the weight's largest
    |theta|) errs by at most 4 unit roundoffs u = eps/2 (the difference, the product with a rounded weight, the sum),
    and later updates damp an error made at step t by prod_{j > t} beta_j = (t/T)^(gamma + 1), whose sum over t is
    at most T/(gamma + 2) + 1; the combination adds sum_k |x_k| of those and one rounding to float32.
    """
    T, every, stds = 60, 6, (0.05, 0.10)
    planned = [Snapshot(Path(), t, std, 0) for t in range(every, T + 1, every) for std in stds]
    x, error, _ = reconstruction(planned, 0.07)
    dw = sum(x_k * profile_weights(s.t, std_to_gamma(s.std), T) for x_k, s in zip(x, planned))
    trajectory = Trajectory(dw - profile_weights(T, std_to_gamma(0.07), T))
    L.seed_everything(0)
    module = KarrasVeModule(unet=json.loads(TINY_UNET), num_steps=2, lr=1e-3, warmup_steps=0)
    trainer = L.Trainer(max_steps=T, limit_train_batches=3, limit_val_batches=1, check_val_every_n_epoch=5,
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[
                            PostHocEMA(stds, snapshot_every_n_steps=every), trajectory,
                            PostHocEMA((0.07,), snapshot_every_n_steps=T, dirpath=tmp_path / "direct"),
                            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(module, ImageDataModule(batch_size=16, num_workers=0))

    snapshots = list_snapshots(tmp_path / "phema")
    assert [(s.step, s.std) for s in snapshots] == [(s.step, s.std) for s in planned]
    x_run, error_run, step = reconstruction(snapshots, 0.07)
    assert step == T and torch.equal(x_run, x) and error_run == error
    [direct_snapshot] = list_snapshots(tmp_path / "direct")
    [rebuilt] = combine(snapshots, [x])
    names = [n for n, _ in module.named_parameters()]
    rebuilt = torch.cat([rebuilt[n].double().flatten() for n in names])
    direct = torch.cat([load_file(direct_snapshot.path)[n].double().flatten() for n in names])
    # the trajectory saw the raw weights: its last theta is the checkpoint's current_model_state, not the EMA's
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    raw = torch.cat([ckpt["current_model_state"][n].double().flatten() for n in names])
    ema = torch.cat([ckpt["state_dict"][n].double().flatten() for n in names])
    assert torch.equal(trajectory.last, raw) and not torch.allclose(raw, ema)

    magnitude = torch.maximum(trajectory.lo.abs(), trajectory.hi.abs())
    damped = sum(abs(x_k) * (s.t / (std_to_gamma(s.std) + 2) + 1) for x_k, s in zip(x.tolist(), snapshots))
    damped += T / (std_to_gamma(0.07) + 2) + 1
    rounding = EPS32 * magnitude * (2 * damped + 0.5 * x.abs().sum().item())
    diff = rebuilt - direct
    assert ((diff - trajectory.predicted).abs() <= rounding).all()
    assert (diff.abs() <= error * (trajectory.hi - trajectory.lo) + rounding).all()
    assert (trajectory.predicted.abs() > rounding).float().mean() > 0.5  # the first check is not all rounding
    print(f"tiny UNet, {T} steps: profile error {error:.4f}, max abs error {diff.abs().max():.2e} (weights up to "
          f"{magnitude.max():.2f}), relative L2 error {(diff.norm() / direct.norm()).item():.2e}")


# ---------------------------------------------------------------------------------------------- resume

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"
FIT_ARGS = SHORT_FIT_ARGS
PHEMA = ["--model.phema_stds=[0.05,0.1]", "--model.phema_every_n_steps=4"]
LAST = Path("runs", "digits", "checkpoints", "last.ckpt")
SNAPSHOTS = Path("runs", "digits", "phema")


def fit(folder: Path, monkeypatch, *args: str) -> dict:
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    cli_main(["fit", *FIT_ARGS, *args])
    return torch.load(LAST, weights_only=True)


def phema_state(checkpoint: dict) -> dict:
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("PostHocEMA")]
    return state


def test_snapshots_and_averages_survive_resume_and_the_ema_is_unaffected(tmp_path, monkeypatch, capsys):
    """4 epochs of 3 steps (snapshots every 4) equal 2 epochs + `--ckpt_path last` + 2 epochs: the averages in the
    checkpoint and every snapshot of the whole run; the first half's snapshots stay as they were, a snapshot written
    after the checkpoint goes. The EMA and raw weights are those of a run without post-hoc EMA."""
    whole = fit(tmp_path / "whole", monkeypatch, "--trainer.max_epochs=4", *PHEMA)
    plain = fit(tmp_path / "plain", monkeypatch, "--trainer.max_epochs=4")
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(whole[key][n], plain[key][n]) for n in plain[key]), key

    fit(tmp_path / "half", monkeypatch, "--trainer.max_epochs=2", *PHEMA)
    first = {p.name: p.read_bytes() for p in SNAPSHOTS.iterdir()}
    assert sorted(first) == [f"phema-{s:09d}-{std:.4f}.safetensors" for s in (4, 6) for std in (0.05, 0.1)]
    stale = SNAPSHOTS / "phema-000000010-0.0500.safetensors"  # as if written after last.ckpt, then killed
    save_file(load_file(SNAPSHOTS / "phema-000000004-0.0500.safetensors"), stale,
              metadata={"phema": json.dumps({"step": 10, "std": 0.05, "origin": 0})})
    resumed = fit(tmp_path / "half", monkeypatch, "--trainer.max_epochs=4", "--ckpt_path=last")
    assert not stale.exists()
    assert resumed["global_step"] == whole["global_step"] == 12
    a, b = phema_state(whole), phema_state(resumed)
    assert (a["origin"], a["step"]) == (b["origin"], b["step"]) == (0, 12)
    for std in a["averages"]:
        for name, value in a["averages"][std].items():
            torch.testing.assert_close(b["averages"][std][name], value, rtol=0, atol=1e-6)
    after = {p.name: p for p in SNAPSHOTS.iterdir()}
    assert {n: after[n].read_bytes() for n in first} == first
    whole_snapshots = {s.path.name: s for s in list_snapshots(tmp_path / "whole" / SNAPSHOTS)}
    assert sorted(whole_snapshots) == sorted(set(after) - {n for n in first if "-000000006-" in n})
    for name, snapshot in whole_snapshots.items():
        theirs, ours = load_file(snapshot.path), load_file(after[name])
        assert all(torch.allclose(theirs[n], ours[n], rtol=0, atol=1e-6) for n in theirs), name

    # a fresh run into a folder holding snapshots would mix two runs: refused before any step
    monkeypatch.chdir(tmp_path / "whole")
    assert_refused(lambda: cli_main(["fit", *FIT_ARGS, "--trainer.max_epochs=1", *PHEMA]), capsys,
                   "already holds snapshots", str(SNAPSHOTS), folder=tmp_path / "whole" / SNAPSHOTS)
    # also with other stds: both runs start at step 0, so nothing else would tell their snapshots apart
    assert_refused(lambda: cli_main(["fit", *FIT_ARGS, "--trainer.max_epochs=1", "--model.phema_stds=[0.07]",
                                     "--model.phema_every_n_steps=3"]), capsys, "already holds snapshots",
                   folder=tmp_path / "whole" / SNAPSHOTS)
    assert torch.load(LAST, weights_only=True)["global_step"] == 12


def test_bad_phema_settings_are_refused_when_the_module_is_built():
    for stds, every, match in (((0.5,), 10, "no power-function EMA"), ((0.05, 0.05), 10, "distinct"),
                               ((0.05,), 0, "phema_every_n_steps=0")):
        with pytest.raises(ValueError, match=match):
            KarrasVeModule(unet=json.loads(TINY_UNET), phema_stds=stds, phema_every_n_steps=every)


# ---------------------------------------------------------------------------------------------- kve phema


def phema_main(argv: list[str]) -> None:
    """``kve phema ARGV``, in process."""
    cli_main(["phema", *argv])


def run_phema(capsys, *args: str) -> str:
    """``kve phema ARGS``, which must succeed: its stdout and stderr."""
    capsys.readouterr()
    phema_main(list(args))
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_kve_phema_lists_and_writes_a_checkpoint_and_an_export_that_sample_alike(phema_run, tmp_path, capsys):
    run, ckpt = phema_run
    out = run_phema(capsys, "--snapshots", str(run), "--list", "true")
    assert out.count("std 0.0500") == out.count("std 0.1000") == 3, out
    assert "reconstructible at step 6 with profile error <= 0.05: std 0.045 to 0.13" in out, out
    snapshots = list_snapshots(run / "phema")
    errors = {std: reconstruction(snapshots, std)[1] for std in (0.04, 0.045, 0.13, 0.135)}
    assert errors[0.04] > 0.05 >= errors[0.045] and errors[0.13] <= 0.05 < errors[0.135], errors  # the 0.005 grid

    out = run_phema(capsys, "--snapshots", str(run / "phema"), "--ckpt_path", str(ckpt), "--std", "0.07,0.12",
                    "--out", str(tmp_path / "p-{std}.ckpt"), "--export", str(tmp_path / "export-{std}"))
    assert "std 0.07 at step 6 from 6 snapshots" in out, out
    written = read_checkpoint(tmp_path / "p-0.07.ckpt")
    x, error, step = reconstruction(snapshots, 0.07)
    assert written["phema"] == {"std": 0.07, "step": 6, "profile_error": error, "coefficients": x.tolist(),
                                "snapshots": [s.path.name for s in snapshots]}
    [expected] = combine(snapshots, [x])
    base = read_checkpoint(ckpt)
    assert written["hyper_parameters"] == {k: v for k, v in base["hyper_parameters"].items() if k != "_instantiator"}
    assert written["state_dict"].keys() == base["state_dict"].keys() and expected.keys() <= base["state_dict"].keys()
    assert all(torch.equal(written["state_dict"][n], v) for n, v in expected.items())
    assert not torch.equal(written["state_dict"]["denoiser.unet.conv_in.weight"],
                           read_checkpoint(tmp_path / "p-0.12.ckpt")["state_dict"]["denoiser.unet.conv_in.weight"])
    # --overwrite true replaces an existing --out (refused without it: the bad-input test)
    (tmp_path / "p-0.12.ckpt").write_bytes(b"mine")
    run_phema(capsys, "--snapshots", str(run), "--ckpt_path", str(ckpt), "--std", "0.12",
              "--out", str(tmp_path / "p-0.12.ckpt"), "--overwrite", "true")
    assert read_checkpoint(tmp_path / "p-0.12.ckpt")["phema"]["std"] == 0.12

    sample_script(["--ckpt_path", str(tmp_path / "p-0.07.ckpt"), "--seeds", "0-2", "--out", str(tmp_path / "a")])
    sample_script(["--pipeline", str(tmp_path / "export-0.07"), "--seeds", "0-2", "--out", str(tmp_path / "b")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    cli_main(["predict", CONFIG, *TINY_MODEL_ARGS, f"--ckpt_path={tmp_path / 'p-0.07.ckpt'}",
              "--seeds=0-2", f"--out={tmp_path / 'c'}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    assert (tmp_path / "c" / "000002.png").read_bytes() == (tmp_path / "a" / "000002.png").read_bytes()


def other_architecture(path: Path) -> Path:
    module = KarrasVeModule(unet=json.loads(TINY_UNET) | {"block_out_channels": [8, 16]})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no snapshots", "holds no post-hoc EMA snapshots"),
    ("unknown folder", "is not a folder"),
    ("std too wide", "outside (0, 0.3003)"),
    ("std not reconstructible", "profile error at step 6 is 0.072 > --max_error 0.05"),
    ("std not a number", "'abc' is not a number"),
    ("architecture", "the snapshots do not fit checkpoint"),
    ("several stds, one file", "must contain {std}"),
    ("existing out", "exists (pass --overwrite true"),
    ("out is the checkpoint", "is --ckpt_path"),
    ("no ckpt", "give --std, --ckpt_path and --out"),
])
def test_kve_phema_bad_input_exits_2_and_writes_nothing(phema_run, tmp_path, capsys, case, message):
    run, ckpt = phema_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing.ckpt").write_bytes(b"mine")
    snapshots, std, base, out = str(run), "0.07", str(ckpt), str(tmp_path / "out.ckpt")
    if case == "no snapshots":
        snapshots = str(tmp_path / "empty")
    elif case == "unknown folder":
        snapshots = str(tmp_path / "nowhere")
    elif case == "architecture":
        base = str(other_architecture(tmp_path / "other.ckpt"))
    elif case == "existing out":
        out = str(tmp_path / "existing.ckpt")
    elif case == "out is the checkpoint":
        out = base
    else:
        std = {"std too wide": "0.5", "std not reconstructible": "0.15", "std not a number": "abc",
               "several stds, one file": "0.07,0.08"}.get(case, std)
    before = folder_state(run / "phema")
    args = ["--snapshots", snapshots, "--std", std, "--out", out, "--export", str(tmp_path / "export")]
    args += [] if case == "no ckpt" else ["--ckpt_path", base]
    line = assert_refused(lambda: phema_main(args), capsys, message, folder=tmp_path)
    assert line.startswith("kve phema: error:"), line
    assert folder_state(run / "phema") == before
    assert (tmp_path / "existing.ckpt").read_bytes() == b"mine"
