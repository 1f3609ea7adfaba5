"""``sigma_max: auto``: the training split's largest pairwise distance (Song & Ermon 2020, technique 1), resolved by
the CLI into a number that reaches the model, the checkpoint, the run's config, `kve predict` and `kve export`.

The point sets are built so that every distance is exact in floating point: pixels of -1 and 1 (PNG 0 and 255 map
to exactly -1 and 1), or constants k / 1024 - 1, whose differences, squares and their sums are exact, and the square
root of a perfect square 4 d^2 is exactly 2 |d|. Hence equality, not a tolerance.
"""

import itertools
import json
import math

import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import TensorDataset

from conftest import REPO, TINY_MODEL_ARGS, assert_refused, export_script
from kve_lightning import ImageDataModule
from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.cli import cli_main
from kve_lightning.cli.fit import KveCLI
from kve_lightning.lit.data import largest_pairwise_distance
from kve_lightning.lit.module import KarrasVeModule

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def test_largest_pairwise_distance_is_the_maximum_over_all_pairs_across_chunks():
    x = torch.randn(37, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    flat = x.flatten(1).double()
    brute = max((flat[i] - flat[j]).norm().item() for i, j in itertools.combinations(range(len(x)), 2))
    for chunk_size in (1, 8, 36, 512):  # single rows, ragged chunks, one chunk
        assert largest_pairwise_distance(x, chunk_size=chunk_size) == brute


def staircase_folder(folder, count=11):
    """``count`` 8x8 PNGs, image k with its first 6k pixels white (1) and the rest black (-1): images a and b differ
    by 2 in 6|a - b| pixels, so their distance is 2 sqrt(6 |a - b|)."""
    folder.mkdir()
    for k in range(count):
        Image.frombytes("L", (8, 8), bytes([255] * 6 * k + [0] * (64 - 6 * k))).save(folder / f"{k:02d}.png")
    return folder


def staircase_distance(data: ImageDataModule) -> float:
    """The closed form over the images in ``data``'s training split (files sorted by name: index k is image k)."""
    ks = data.train_set.indices
    return 2 * math.sqrt(6 * (max(ks) - min(ks)))


def test_auto_on_an_image_folder_is_its_closed_form_largest_distance(tmp_path):
    data = ImageDataModule(dataset="folder", root=str(staircase_folder(tmp_path / "images")), val_fraction=0.2)
    value = data.max_pairwise_distance()
    assert len(data.train_set) == 9 and value == staircase_distance(data)
    assert value < 2 * math.sqrt(6 * 10)  # the split left out image 0 or 10: the closed form is the split's


def constant_images(values: torch.Tensor) -> ImageDataModule:
    """A data module whose training split is one 2x2 image per value, every pixel that value."""
    data = ImageDataModule(image_size=2)
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    data.train_set = TensorDataset(images, torch.zeros(len(values), dtype=torch.long))
    return data


def test_subsample_rule_gives_the_exact_maximum_of_the_documented_draw_a_lower_bound():
    n, m = 2048, 100
    values = torch.arange(n) / 1024 - 1  # distance of images k and l: 2 |k - l| / 1024
    data = constant_images(values)
    full = 2 * (n - 1) / 1024
    assert data.max_pairwise_distance(max_images=n) == full  # exact up to max_images
    for seed in (0, 1):
        drawn = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]  # the documented draw
        expected = 2 * (drawn.max() - drawn.min()).item() / 1024
        assert data.max_pairwise_distance(max_images=m, seed=seed) == expected < full


def test_subsample_that_holds_a_farthest_pair_gives_the_exact_maximum():
    """Half the images all -1, half all 1: any draw of both kinds holds a farthest pair (distance 2 * 2 = 4)."""
    data = constant_images(torch.tensor([-1.0, 1.0]).repeat(1024))
    assert data.max_pairwise_distance(max_images=10) == 4.0


def test_digits_auto_is_the_training_splits_largest_distance_printed_once(tmp_path, monkeypatch, capsys):
    """The flag on the default job's data (1,617 training digits): torch.pdist over the split as the reference (a
    direct difference per pair in float64, no chunks; the same pair's norm up to float64 rounding: 1e-12)."""
    monkeypatch.chdir(tmp_path)
    cli = KveCLI(KarrasVeModule, ImageDataModule, run=False,
                 args=[CONFIG, *TINY_MODEL_ARGS, "--model.sigma_max=auto", "--trainer.logger=false"])
    data = ImageDataModule()
    data.setup("fit")
    reference = torch.pdist(torch.stack([x for x, _ in data.train_set]).flatten(1).double()).max().item()
    assert cli.model.sampler.sigma_max == pytest.approx(reference, rel=1e-12)
    assert 9.6 < reference < 9.7  # DESIGN.md: 9.6 over all 1,797 digits
    err = capsys.readouterr().err
    assert err.count("kve: sigma_max auto = 9.62987: the largest pairwise distance of the 1,617 training") == 1, err


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """`kve fit` with ``sigma_max: auto`` in a YAML on the staircase folder, 1 step: (folder, data, checkpoint)."""
    root = tmp_path_factory.mktemp("auto")
    folder = staircase_folder(root / "images")
    extra = root / "auto.yaml"
    extra.write_text(yaml.safe_dump({"model": {"sigma_max": "auto"},
                                     "data": {"dataset": "folder", "root": str(folder), "batch_size": 4}}))
    cli_main(["fit", CONFIG, f"--config={extra}", *TINY_MODEL_ARGS, f"--trainer.default_root_dir={root / 'run'}",
              "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"])
    data = ImageDataModule(dataset="folder", root=str(folder))
    data.setup("fit")
    return folder, data, root / "run" / "checkpoints" / "last.ckpt"


def test_auto_number_reaches_model_checkpoint_and_saved_config(auto_run):
    _, data, ckpt = auto_run
    expected = staircase_distance(data)
    assert read_checkpoint(ckpt)["hyper_parameters"]["sigma_max"] == expected
    assert KarrasVeModule.from_checkpoint(ckpt).sampler.sigma_max == expected
    (saved,) = ckpt.parents[1].glob("lightning_logs/version_*/config.yaml")  # rerunning it reproduces the run
    assert yaml.safe_load(saved.read_text())["model"]["sigma_max"] == expected
    (logged,) = ckpt.parents[1].glob("lightning_logs/version_*/hparams.yaml")  # TensorBoard's hyper-parameters
    assert yaml.safe_load(logged.read_text())["sigma_max"] == expected


def test_predict_with_checkpoint_takes_its_number_for_auto_without_reading_data(auto_run, tmp_path):
    _, data, ckpt = auto_run
    out = tmp_path / "samples"
    cli_main(["predict", CONFIG, *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}", "--model.sigma_max", "auto",
              "--data.dataset=folder", f"--data.root={tmp_path / 'no-such-folder'}", "--seeds=0-1",
              f"--out={out}", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"]["sigma_max"] == staircase_distance(data)


def test_export_scheduler_config_holds_the_number(auto_run, tmp_path):
    _, data, ckpt = auto_run
    export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "model")])
    config = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert config["sigma_max"] == staircase_distance(data)


@pytest.mark.parametrize("pixels, needle", [
    ([0], "too few for a training and a validation split"),  # one image: no training split at all
    ([0, 255], "training split holds 1 image"),  # one held out, one to train on
    ([90, 90, 90, 90], "are identical"),
])
def test_bad_data_for_auto_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, pixels, needle):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, value in enumerate(pixels):
        Image.new("L", (8, 8), value).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    line = assert_refused(lambda: cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, "--model.sigma_max=auto",
                                            "--data.dataset=folder", f"--data.root={folder}",
                                            f"--trainer.default_root_dir={tmp_path / 'run'}"]),
                          capsys, needle, folder=tmp_path)  # Python's warnings may come first
    assert line.startswith("kve: error: ValueError: "), line


def test_module_refuses_auto_and_names_the_data_modules_method():
    with pytest.raises(ValueError, match="max_pairwise_distance"):
        KarrasVeModule(sigma_max="auto")
