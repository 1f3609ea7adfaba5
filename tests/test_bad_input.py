"""Bad input to `kve fit`, `kve predict`, `kve sample` and `kve inpaint`: exit code 2, one error line that names the
offending key, value or file, no traceback, and every file that was there before left as it was (nothing new either):
conftest's ``assert_refused``."""

import warnings

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_MODEL_ARGS, assert_refused, sample_script
from kve_lightning import ImageDataModule
from kve_lightning.cli import cli_main

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"


@pytest.fixture
def inputs(tmp_path, trained_run):
    """A folder of bad inputs; returns ``fill(arg)``, which puts its paths (and the good checkpoint) into an
    argument: {tmp}, {ckpt}."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "images" / f"good{i}.png")
    good = (tmp_path / "images" / "good0.png").read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "typo.yaml").write_text("model:\n  num_stepz: 3\n")
    _, ckpt = trained_run
    (tmp_path / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:2000])
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.ckpt")
    (tmp_path / "big").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "big" / "a.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask16.png")
    return lambda arg: arg.format(tmp=tmp_path, ckpt=ckpt)


FIT_CASES = [
    (["--model.sigma_min=0"], ["sigma_min=0"]),
    (["--model.sigma_min=200"], ["sigma_min=200"]),
    (["--model.num_steps=1"], ["num_steps=1"]),
    (["--model.s_churn=-1"], ["s_churn=-1"]),
    (["--model.s_noise=-0.5"], ["s_noise=-0.5"]),
    (["--model.s_min=2"], ["s_min=2"]),
    (["--model.schedule=cosine"], ["cosine"]),
    (["--model.solver=rk4"], ["rk4"]),
    (["--data.image_size=9"], ["image_size=9"]),
    (["--data.channels=2"], ["channels=2"]),
    (["--data.dataset=imagenet"], ["imagenet"]),
    (["--data.dataset=folder", "--data.root={tmp}/empty"], ["empty", "no images"]),
    (["--data.dataset=folder", "--data.root={tmp}/missing"], ["missing", "does not exist"]),
    (["--data.dataset=folder", "--data.root={tmp}/images"], ["truncated.png", "garbage.jpg", "skip_bad_images"]),
    (["--data.batch_size=0"], ["batch_size=0"]),
    (["--seeds=5-2"], ["5-2"]),
    (["--seeds=a"], ["'a'"]),
    (["--seeds=-1"], ["-1"]),
    (["--config={tmp}/typo.yaml"], ["num_stepz"]),
    (["--model.s_churn=nan"], ["s_churn", "nan"]),  # named by SamplerSettings or, in newer jsonargparse, the parser
    (["--model.sigma_max=inf"], ["sigma_max", "inf"]),
    (["--model.schedule=cosine"], ["cosine"]),
    (["--ckpt_path=last"], ["--ckpt_path last", "no last.ckpt"]),
    (["--model.grid_size=4"], ["--model.grid_size"]),  # retired: the callbacks' --sample_grid.size now
    (["--sample_grid.size=-1"], ["size=-1"]),
    (["--inpaint_grid.mask=diagonal"], ["'diagonal'", "bottom"]),
    (["--fid.num_samples=1"], ["num_samples=1"]),
    (["--model.train_sigma_min=0"], ["train_sigma_min=0"]),
    (["--model.sigma_max=200", "--model.train_sigma_max=100"], ["[0.02, 200]", "leaves the model's trained range"]),
]


@pytest.mark.parametrize("args, needles", FIT_CASES, ids=[" ".join(a) for a, _ in FIT_CASES])
def test_kve_fit(inputs, tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    args = ["fit", CONFIG, *TINY_MODEL_ARGS, *map(inputs, args), "--trainer.fast_dev_run=1"]
    assert_refused(lambda: cli_main(args), capsys, *needles, folder=tmp_path)


PREDICT_CASES = [
    (["--ckpt_path={tmp}/missing.ckpt"], ["missing.ckpt", "does not exist"]),
    (["--ckpt_path={tmp}/truncated.ckpt"], ["truncated.ckpt", "not a readable checkpoint"]),
    (["--ckpt_path={tmp}/foreign.ckpt"], ["foreign.ckpt", "not a kve-lightning checkpoint"]),
    (["--ckpt_path={ckpt}", "--out={tmp}/file"], ["file", "not a directory"]),
    (["--ckpt_path={ckpt}", "--out={tmp}/file/out"], ["file/out"]),
    (["--ckpt_path={ckpt}", "--model.unet={{}}"], ["block_out_channels=[32, 64] here but [16, 32]",
                                                   "down_block_types"]),
    (["--ckpt_path={ckpt}", "--data.image_size=16"], ["image_size=16 here but 8"]),
    (["--ckpt_path={ckpt}", "--data.channels=3"], ["channels=3 here but 1"]),
    (["--ckpt_path={ckpt}", "--model.num_steps=1"], ["num_steps=1"]),
    (["--ckpt_path={ckpt}", "--model.s_noise=inf"], ["s_noise", "inf"]),
    (["--ckpt_path={ckpt}", "--weights_only=false"], ["--weights_only false is refused"]),
    (["--ckpt_path=last"], ["--ckpt_path last", "no last.ckpt"]),
    (["--ckpt_path=http://127.0.0.1:9/model.ckpt"], ["http://127.0.0.1:9/model.ckpt", "local checkpoint files only"]),
    (["--ckpt_path={tmp}"], ["is a directory"]),
]


@pytest.mark.parametrize("args, needles", PREDICT_CASES, ids=[" ".join(a) for a, _ in PREDICT_CASES])
def test_kve_predict(inputs, tmp_path, capsys, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    args = ["predict", CONFIG, *TINY_MODEL_ARGS, f"--out={tmp_path}/out", "--seeds=0-1", "--trainer.logger=false",
            *map(inputs, args)]
    assert_refused(lambda: cli_main(args), capsys, *needles, folder=tmp_path)


SAMPLE_CASES = [
    (["--seeds", "5-2"], ["5-2"]),
    (["--seeds", "a"], ["'a'"]),
    (["--seeds", "-1"], ["-1"]),
    (["--batch_size", "0"], ["--batch_size must be >= 1, got 0"]),
    (["--model.num_steps", "1"], ["num_steps=1"]),
    (["--model.s_churn", "-1"], ["s_churn=-1"]),
    (["--model.s_noise", "-1"], ["s_noise=-1"]),
    (["--model.s_min", "2"], ["s_min=2"]),
    (["--model.schedule", "cosine"], ["cosine"]),
    (["--model.s_churn", "nan"], ["s_churn", "nan"]),
    (["--model.sigma_max", "1e30"], ["sigma_max=1e+30"]),
    (["--model.sigma_max", "200"], ["200]", "leaves the model's trained range", "--model.extrapolate true"]),
    (["--model.rho", "0"], ["rho=0"]),
    (["--model.num_stepz", "3"], ["num_stepz"]),
    (["--steps", "3"], ["--steps"]),  # the flags before `kve sample` are gone, not silently ignored
    (["--ckpt_path", "{tmp}"], ["is a directory"]),
    (["--ckpt_path", "{tmp}/missing.ckpt"], ["missing.ckpt", "does not exist"]),
    (["--ckpt_path", "{tmp}/truncated.ckpt"], ["truncated.ckpt", "not a readable checkpoint"]),
    (["--ckpt_path", "{tmp}/foreign.ckpt"], ["foreign.ckpt", "not a kve-lightning checkpoint"]),
    (["--pipeline", "{tmp}/missing"], ["--ckpt_path", "--pipeline"]),  # both given
    (["--out", "{tmp}/file"], ["file", "not a directory"]),
    (["--out", "{tmp}/file/out"], ["file/out"]),
]


@pytest.mark.parametrize("args, needles", SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_sample_script(inputs, tmp_path, capsys, args, needles):
    args = ["--ckpt_path", "{ckpt}", "--out", "{tmp}/out", *args]  # later flags win
    line = assert_refused(lambda: sample_script(list(map(inputs, args))), capsys, *needles, folder=tmp_path)
    assert line.startswith("kve sample: error:"), line


def test_skip_bad_images_trains_without_them(inputs, tmp_path):
    data = ImageDataModule(dataset="folder", root=str(tmp_path / "images"), val_fraction=0.25,
                           skip_bad_images=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    message = " ".join(str(w.message) for w in caught)
    assert "truncated.png" in message and "garbage.jpg" in message and "good0.png" not in message
    assert len(data.train_set) + len(data.val_set) == 4



INPAINT_CASES = [
    (["--mask", "diagonal"], ["'diagonal'", "bottom"]),
    (["--mask", "random:2"], ["random:2", "[0, 1]"]),
    (["--mask", "random:x"], ["random:x"]),
    (["--mask", "{tmp}/mask16.png"], ["mask16.png", "16x16", "8x8"]),
    (["--mask", "{tmp}/missing.png"], ["missing.png", "no such file"]),
    (["--mask", "{tmp}/file"], ["file", "bottom"]),
    (["--images", "{tmp}/big"], ["a.png", "16x16", "8x8"]),
    (["--images", "{tmp}/missing"], ["missing", "does not exist"]),
    (["--resample", "0"], ["--resample must be >= 1, got 0"]),
    (["--guidance", "-1"], ["--guidance must be a number in [0, 100], got -1.0"]),
    (["--n", "0"], ["--n must be >= 1, got 0"]),
    (["--seeds", "5-2"], ["5-2"]),
    (["--grid_images", "-1"], ["--grid_images", "-1"]),
    (["--model.s_churn", "-1"], ["s_churn=-1"]),
    (["--model.sigma_max", "200"], ["leaves the model's trained range"]),
    (["--ckpt_path", "{tmp}/foreign.ckpt"], ["foreign.ckpt", "not a kve-lightning checkpoint"]),
    (["--out", "{tmp}/file"], ["file", "not a directory"]),
    (["--split", "val"], ["--split"]),  # gone: without --images the held-out split is completed
    (["--data.dataset", "imagenet"], ["imagenet"]),
]


@pytest.mark.parametrize("args, needles", INPAINT_CASES, ids=[" ".join(a) for a, _ in INPAINT_CASES])
def test_inpaint_script(inputs, tmp_path, capsys, args, needles):
    """kve inpaint: exit 2, one error line naming the value, nothing written."""
    argv = ["inpaint", "--ckpt_path", "{ckpt}", "--n", "2", "--mask", "bottom", "--seeds", "0", "--out", "{tmp}/out",
            *args]
    line = assert_refused(lambda: cli_main(list(map(inputs, argv))), capsys, *needles, folder=tmp_path)
    assert line.startswith("kve inpaint: error:"), line
