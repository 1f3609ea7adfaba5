"""inpaint_karras_ve: known entries kept exactly, the unknown ones drawn from the exact conditional of a mixture."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused, export_script
from kve_lightning import ImageDataModule
from kve_lightning.cli import cli_main
from kve_lightning.exact import GaussianMixture
from kve_lightning.storage import to_unit
from kve_lightning.sampling import inpaint_karras_ve, sample_karras_ve

D = 4


@pytest.fixture(scope="module")
def mixture():
    """Three isotropic components in 1 x 4 x 4 with distinct top and bottom halves (component 2: left half 0.5,
    right half -0.5)."""
    means = torch.stack([torch.full((1, D, D), 0.5), torch.full((1, D, D), -0.5),
                         torch.cat([torch.full((1, D, D // 2), 0.5), torch.full((1, D, D // 2), -0.5)], 2)])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, torch.tensor([0.1, 0.2, 0.15]))


TOP = torch.zeros(1, 1, D, D, dtype=torch.bool)
TOP[..., : D // 2, :] = True


def observation(mixture):
    g = torch.Generator().manual_seed(1)
    return mixture.means[:1] + 0.12 * torch.randn((1, 1, D, D), generator=g, dtype=torch.float64)


def test_known_entries_are_kept_and_the_rest_varies_with_the_seed(mixture):
    y = observation(mixture).expand(3, -1, -1, -1).clone()
    a = inpaint_karras_ve(mixture.denoiser, y, TOP, num_steps=6, generator=[torch.Generator().manual_seed(s)
                                                                             for s in (0, 1, 2)])
    assert torch.equal(a[TOP.expand_as(a)], y[TOP.expand_as(y)])
    unknown = a[~TOP.expand_as(a)].reshape(3, -1)
    assert not torch.equal(unknown[0], unknown[1]) and not torch.equal(unknown[1], unknown[2])


def test_a_rows_result_does_not_depend_on_its_batch(mixture):
    y = torch.cat([observation(mixture), mixture.means[1:2], mixture.means[2:3]])
    mask = torch.stack([TOP[0], ~TOP[0], torch.zeros_like(TOP[0])])  # a row with nothing known among them
    for micro_batch in (0, 2):  # 2: the guided denoiser runs on padded chunks of 2 rows
        batch = inpaint_karras_ve(mixture.denoiser, y, mask, num_steps=6, micro_batch=micro_batch,
                                  generator=[torch.Generator().manual_seed(s) for s in range(3)])
        for k in range(3):
            alone = inpaint_karras_ve(mixture.denoiser, y[k:k + 1], mask[k:k + 1], num_steps=6,
                                      micro_batch=micro_batch, generator=[torch.Generator().manual_seed(k)])
            torch.testing.assert_close(alone[0], batch[k], rtol=0, atol=1e-12)


def test_everything_known_gives_y_and_nothing_known_gives_the_unconditional_sample(mixture):
    y = observation(mixture).expand(2, -1, -1, -1).clone()
    everything = torch.ones(1, 1, D, D, dtype=torch.bool)
    assert torch.equal(inpaint_karras_ve(mixture.denoiser, y, everything, num_steps=5), y)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    free = inpaint_karras_ve(mixture.denoiser, y, ~everything, num_steps=5, resample=1, generator=gens())
    plain = sample_karras_ve(mixture.denoiser, y.shape, num_steps=5, generator=gens(), dtype=y.dtype)
    assert torch.equal(free, plain)


def test_default_settings_reach_the_exact_conditional_component_weights(mixture):
    """The top half observed: the exact conditional's weights are w_k N(y_o; mu_k,o, s_k^2 I) normalised (here
    one-hot on component 0). 4,000 completions at 18 steps, each assigned to the component whose bottom-half mean is
    nearest. Measured: replacement alone (R = 1, w = 0) misplaces 3.3 % of the mass, R = 2 0.2 %, guidance w = 1
    alone under 0.1 %, the defaults (both) less; the sampling error of a fraction p is sqrt(p (1 - p) / n) < 0.3 %
    here, so the defaults and w = 1 meet the 2 % goal by far more than 3 standard errors and replacement alone misses
    it by more than 3."""
    y_o = observation(mixture)
    mu_o, mu_u = (m.flatten(1) for m in (mixture.means[:, :, : D // 2], mixture.means[:, :, D // 2:]))
    var = mixture.stds**2
    log_w = mixture.weights.log() - 0.5 * ((y_o[:, :, : D // 2].flatten(1) - mu_o) ** 2).sum(1) / var \
        - 0.5 * mu_o.shape[1] * var.log()
    exact = torch.softmax(log_w, 0)
    y = y_o.expand(4000, -1, -1, -1).clone()

    def weight_error(**kwargs):
        x = inpaint_karras_ve(mixture.denoiser, y, TOP, num_steps=18, generator=torch.Generator().manual_seed(0),
                              **kwargs)
        nearest = torch.cdist(x[:, :, D // 2:].flatten(1), mu_u).argmin(1)
        return (torch.bincount(nearest, minlength=3).double() / len(y) - exact).abs().max().item()

    assert weight_error() < 0.02
    assert weight_error(resample=1, guidance=1.0) < 0.02
    assert weight_error(resample=1, guidance=0.0) > 0.025


def test_guidance_works_under_inference_mode(mixture):
    """Lightning validates under torch.inference_mode, where autograd is off: the guided denoiser still
    differentiates, and the result equals the one outside it."""
    y = observation(mixture).expand(2, -1, -1, -1).clone()
    outside = inpaint_karras_ve(mixture.denoiser, y, TOP, num_steps=4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        inside = inpaint_karras_ve(mixture.denoiser, y.clone(), TOP.clone(), num_steps=4,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mask=torch.ones(1, 1, 3, 3, dtype=torch.bool)), "does not broadcast"),
    (dict(mask=torch.ones(1, 1, D, D)), "bool"),
    (dict(y=torch.full((1, 1, D, D), float("nan"))), "finite"),
    (dict(resample=0), "resample=0"),
    (dict(guidance=-1.0), "guidance=-1.0"),
    (dict(guidance=float("nan")), "guidance=nan"),
    (dict(s_churn=-1.0), "s_churn=-1.0"),
])
def test_bad_input_names_it(mixture, kwargs, needle):
    args = dict(y=torch.zeros(1, 1, D, D, dtype=torch.float64), mask=TOP) | kwargs
    with pytest.raises(ValueError, match=needle):
        inpaint_karras_ve(mixture.denoiser, **args)


def test_benchmark_script_runs_and_resampling_helps(monkeypatch):
    """scripts/benchmark_inpainting.py on one observation: every (R, w, N) row, and the error falls from replacement
    at 4 steps to R = 4 at 50 steps."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    from benchmark_inpainting import main

    rows = main(["--observations", "1", "--n", "200"])
    assert len(rows) == 28 and all(0 <= r["weight_error"] <= 1 and r["sliced_w2"] > 0 for r in rows)
    first = next(r for r in rows if (r["resample"], r["guidance"], r["steps"]) == (1, 0, 4))
    best = next(r for r in rows if (r["resample"], r["guidance"], r["steps"]) == (4, 0, 50))
    assert best["weight_error"] < first["weight_error"] and best["sliced_w2"] < first["sliced_w2"]


# ---------------------------------------------------------------- kve inpaint and the validation grid

def inpaint(*argv):
    """``kve inpaint ARGV``, in process."""
    cli_main(["inpaint", *map(str, argv)])


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_kve_inpaint_keeps_the_known_pixels_and_resumes_to_the_same_bytes(trained_run, tmp_path, capsys):
    """The held-out split (no --images), bottom half masked: each completion's top half is the original's 8-bit top
    half; a rerun after losing one PNG and truncating another gives the uninterrupted run's bytes; other settings are
    refused."""
    from kve_lightning.storage import read_png, to_pil
    from kve_lightning.masks import parse_mask

    _, ckpt = trained_run
    args = ["--ckpt_path", ckpt, "--n", 3, "--mask", "bottom", "--seeds", "0-1", "--model.num_steps", 3]
    inpaint(*args, "--out", tmp_path / "a")
    first = pngs(tmp_path / "a")
    assert sorted(first) == sorted([f"{i:05d}_{s:06d}.png" for i in range(3) for s in (0, 1)] + ["grid.png", "mask.png"])
    data = ImageDataModule()
    data.setup("fit")
    known = parse_mask("bottom", 8)[0]
    for i in range(3):
        original = torch.from_numpy(np.array(to_pil(to_unit(data.val_set[i][0])), copy=True))[None]
        completions = [read_png(tmp_path / "a" / f"{i:05d}_{s:06d}.png") for s in (0, 1)]
        assert all(torch.equal(c[known], original[known]) for c in completions)
        assert not torch.equal(completions[0], completions[1])
    assert (read_png(tmp_path / "a" / "mask.png")[0] > 127).equal(~known[0])
    # grid: 3 rows of original | masked | 2 completions, 8 x 8 images, 1-pixel padding
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size == (4 * 9 + 1, 3 * 9 + 1)

    (tmp_path / "a" / "00001_000000.png").unlink()
    (tmp_path / "a" / "00002_000001.png").write_bytes(first["00002_000001.png"][:30])
    inpaint(*args, "--out", tmp_path / "a")
    assert pngs(tmp_path / "a") == first
    assert "wrote 2 completions" in capsys.readouterr().err
    line = assert_refused(lambda: inpaint(*args, "--out", tmp_path / "a", "--resample", 3), capsys, "resample",
                          folder=tmp_path)
    assert line.startswith("kve inpaint: error:"), line
    assert pngs(tmp_path / "a") == first


def test_kve_inpaint_export_folder_and_mask_file_give_the_checkpoints_bytes(trained_run, tmp_path):
    """--pipeline (a `kve export` folder) equals --ckpt_path; a mask PNG of the bottom half equals --mask bottom;
    --images reads a folder of the model's size."""
    _, ckpt = trained_run
    export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "export")])
    (tmp_path / "images").mkdir()
    for k in range(2):
        Image.fromarray((np.arange(64).reshape(8, 8) * (2 + k)).astype(np.uint8)).save(tmp_path / "images" / f"{k}.png")
    Image.fromarray(np.repeat([0, 255], 32).reshape(8, 8).astype(np.uint8)).save(tmp_path / "bottom.png")
    common = ["--images", tmp_path / "images", "--seeds", "4", "--model.num_steps", 3]
    inpaint("--ckpt_path", ckpt, "--mask", "bottom", *common, "--out", tmp_path / "ckpt")
    inpaint("--pipeline", tmp_path / "export", "--mask", tmp_path / "bottom.png", *common, "--out",
            tmp_path / "model")
    a, b = pngs(tmp_path / "ckpt"), pngs(tmp_path / "model")
    assert sorted(a) == ["00000_000004.png", "00001_000004.png", "grid.png", "mask.png"] and a == b


def test_the_validation_grid_is_kve_inpaints_grid(trained_run, tmp_path):
    """InpaintingGrid.images (what validation logs) of the first 3 held-out images with 2 completions is the grid.png
    of `kve inpaint` with the checkpoint's settings and seeds 0-1, to the 8-bit rounding of its PNGs."""
    from kve_lightning.lit.callbacks import InpaintingGrid
    from kve_lightning.lit.module import KarrasVeModule
    from kve_lightning.storage import read_png

    _, ckpt = trained_run
    inpaint("--ckpt_path", ckpt, "--n", 3, "--mask", "bottom", "--seeds", "0-1", "--out", tmp_path)
    data = ImageDataModule()
    data.setup("fit")
    originals = torch.stack([data.val_set[i][0] for i in range(3)])
    grid = InpaintingGrid(images=3, completions=2, mask="bottom").images(KarrasVeModule.from_checkpoint(ckpt),
                                                                        originals)
    written = read_png(tmp_path / "grid.png").float() / 255
    assert grid.shape == written.shape == (3, 3 * 9 + 1, 4 * 9 + 1)
    torch.testing.assert_close(grid, written, rtol=0, atol=1.01 / 255)


def test_validation_logs_an_inpainting_grid(trained_run):
    """The trained run's TensorBoard holds samples/inpainting: 8 held-out images x (original, masked, 4
    completions)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained_run
    events = sorted(root.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    grid = acc.Images("samples/inpainting")[-1]
    assert (grid.width, grid.height) == (6 * 9 + 1, 8 * 9 + 1)
