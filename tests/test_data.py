"""ImageDataModule and seed parsing."""

import pytest
import torch
from PIL import Image

from kve_lightning import ImageDataModule
from kve_lightning.lit.data import parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0-2, 7,9-10") == [0, 1, 2, 7, 9, 10]
    assert parse_seeds([4, 2]) == [4, 2]
    assert parse_seeds(5) == [5]
    for bad in ("5-2", "a", "-1", "", "1-", "3,3", [1.5], True):
        with pytest.raises(ValueError, match="malformed seeds"):
            parse_seeds(bad)


def test_digits_in_range_with_deterministic_split():
    dm = ImageDataModule(image_size=16, channels=3, batch_size=32)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    x, labels = next(iter(dm.train_dataloader()))
    assert labels.shape == (32,) and labels.dtype == torch.long
    assert x.shape == (32, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    other = ImageDataModule(image_size=16, channels=3)
    other.setup("fit")
    assert dm.val_set.indices == other.val_set.indices
    assert torch.equal(next(iter(dm.val_dataloader()))[0][:8], next(iter(other.val_dataloader()))[0][:8])


def test_folder_dataset_recursive_and_converted(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (20, 12), (40 * i, 0, 255)).save(tmp_path / "a" / ("b" if i % 2 else "") / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    dm = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=8, channels=1, val_fraction=0.2,
                         batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 1
    x, label = dm.train_set[0]
    assert label == 0 and dm.class_names() == ("a",)  # every image lies in a/ (at any depth): one class
    assert x.shape == (1, 8, 8) and -1 <= x.min() and x.max() <= 1


def test_bad_data_settings(tmp_path):
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        ImageDataModule(dataset="imagenet")
    with pytest.raises(ValueError, match="channels"):
        ImageDataModule(channels=2)
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataModule(batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        ImageDataModule(dataset="folder", root=str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule(dataset="folder", root=str(tmp_path / "missing")).setup("fit")
    with pytest.raises(FileNotFoundError, match="download"):
        ImageDataModule(dataset="mnist", root=str(tmp_path)).setup("fit")


def test_predict_loader_yields_seeds_in_order():
    dm = ImageDataModule(predict_seeds="3-9", predict_batch_size=3)
    batches = list(dm.predict_dataloader())
    assert [b.tolist() for b in batches] == [[3, 4, 5], [6, 7, 8], [9]]


def test_training_order_depends_on_the_stored_seed_and_epoch_only():
    """Each epoch's order comes from (shuffle seed, epoch), not from the global generator, and the seed travels in
    the data module's state_dict (checkpoints): a resumed run replays the interrupted run's order."""

    def order(dm, epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.rand(7)  # the global generator's state does not matter
        return torch.cat([images for images, _ in list(loader)[:2]])

    torch.manual_seed(1)
    first = ImageDataModule(batch_size=16)
    first.setup("fit")
    epoch0, epoch1 = order(first, 0), order(first, 1)
    assert not torch.equal(epoch0, epoch1)
    torch.manual_seed(2)
    resumed = ImageDataModule(batch_size=16)
    resumed.setup("fit")
    assert not torch.equal(order(resumed, 1), epoch1)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(order(resumed, 1), epoch1) and torch.equal(order(first, 0), epoch0)
