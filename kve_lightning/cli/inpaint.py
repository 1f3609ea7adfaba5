"""``kve inpaint``: the masked part of images, filled in by the model's conditional."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from kve_lightning.cli.common import DataSource, Model, at_least, check_outputs, load_model, parse_device
from kve_lightning.guidance import guided, guided_nfe
from kve_lightning.lit.data import MAX_SEEDS, ImageDataModule, parse_labels, parse_seeds
from kve_lightning.masks import MASK_SPECS, complete, inpainting_grid, parse_mask
from kve_lightning.sampling import GUIDANCE, MAX_GUIDANCE, RESAMPLE, bounded_repr
from kve_lightning.storage import existing_pngs, open_sample_folder, prepare_output_dir, read_png, save_png, to_unit

DOC = f"""Fill in the masked part of images with the model's conditional (inpaint_karras_ve: Algorithm 2 with the
known pixels replaced at every noise level, RePaint resampling and reconstruction guidance).

    kve inpaint --ckpt_path runs/digits/checkpoints/last.ckpt --n 16 --mask bottom --out inpaint/digits
    kve inpaint --pipeline exported/faces --images photos/ --mask hole.png --out inpaint/faces --seeds 0-7
    kve inpaint --ckpt_path runs/digits_cond/checkpoints/last.ckpt --n 16 --mask bottom --labels 3 \
        --model.guidance_scale 2 --out inpaint/threes        # a conditional completion: each image as a 3

The images are the files of --images (recursively, sorted by path; each must be the model's size) or, without it,
the held-out split of the data module (--data.*, by default the checkpoint's: the split `kve fit` validated on).
--mask names the pixels to fill: {', '.join(MASK_SPECS)} (a half, the center square, each pixel with probability P,
or a PNG of the image size whose white pixels are filled). Writes {{image:05d}}_{{seed:06d}}.png for every image and
seed (image = its position in the list), mask.png (white = filled) and grid.png (per image: original | masked |
completions), atomically; manifest.json records the weights, sampler settings, resampling, mask and images, and a
rerun of the same command completes only the missing PNGs (a folder of other settings is refused). A conditional
model completes each image as the class --labels gives it (default: the null class), guided by --model.guidance_*.
"""


def run(mask: str, out: str, ckpt_path: str | None = None, pipeline: str | None = None, images: str | None = None,
        data: DataSource = DataSource(), n: int | None = None, seeds: str = "0-3",
        labels: int | str | list[int] | None = None, guide_ckpt_path: str | None = None, resample: int = RESAMPLE,
        guidance: float = GUIDANCE, batch_size: int = 64, grid_images: int = 32, skip_existing: bool = True,
        device: str | None = None, model: dict[str, Any] | None = None) -> None:
    """Complete every image once per seed into ``out``.

    Args:
        mask: the pixels to fill (see above).
        out: the output folder (created if missing).
        ckpt_path: a checkpoint written by `kve fit` (read weights-only).
        pipeline: a folder written by `kve export`, instead of ``ckpt_path``.
        images: a folder of images of the model's size (default: the data module's held-out split).
        data: the data set whose held-out split is completed when ``images`` is not given.
        n: use the first n images (default: all).
        seeds: completions per image, one per seed.
        labels: the class each image is completed as, for a conditional model: one label for every image ("3") or
            one per image ("0-9", "3,1,4"; default: none, the null class).
        guide_ckpt_path: a checkpoint of a weaker model of the same data that guides when --model.guidance_scale
            != 1 (autoguidance); without one a conditional model guides with its null class (classifier-free).
        resample: RePaint resampling: each step runs R times (NFE x R; see the README).
        guidance: the reconstruction-guidance weight w in [0, 100] (0: replacement only; each evaluation then also
            costs a backward pass; see the README).
        batch_size: completions sampled at once.
        grid_images: images in grid.png (0: none).
        skip_existing: leave out the completions whose PNG is already in ``out`` (false: sample them again).
        device: the torch device (default: cuda if available, else cpu).
    """
    seed_list = parse_seeds(seeds)
    for flag, value, low in (("--batch_size", batch_size, 1), ("--resample", resample, 1),
                             ("--n", 1 if n is None else n, 1), ("--grid_images", grid_images, 0)):
        at_least(flag, value, low)
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"--guidance must be a number in [0, {MAX_GUIDANCE:g}], got {bounded_repr(guidance)}")
    where = parse_device(device)
    trained = load_model(ckpt_path, pipeline, where, guide_ckpt_path)
    check_outputs({"--out": out}, {"--ckpt_path": ckpt_path, "--pipeline": pipeline, "--images": images,
                                   "--guide_ckpt_path": guide_ckpt_path})
    settings = trained.settings_with(model or {})
    known = parse_mask(mask, trained.image_size).to(where)
    originals = load_images(trained, images, data, n)
    label_list = parse_labels(labels, len(originals))
    guided(trained.denoiser, settings, label_list, trained.guide)  # bad labels or guidance: refused now
    if len(originals) * len(seed_list) > MAX_SEEDS:
        raise ValueError(f"{len(originals)} images x {len(seed_list)} seeds is more than {MAX_SEEDS:,} completions: "
                         f"split them over several runs")
    label_of = None if label_list is None else dict(enumerate(label_list))  # image -> label
    manifest = trained.manifest(settings, label_of) | {"inpainting": {
        "resample": resample, "guidance": guidance, "mask": mask,
        "mask_sha256": hashlib.sha256(known.cpu().numpy().tobytes()).hexdigest(),
        "images_sha256": hashlib.sha256(originals.numpy().tobytes()).hexdigest(), "images": len(originals)}}
    folder = prepare_output_dir(out)
    for name in ("grid.png", "mask.png"):
        if (folder / name).is_dir():
            raise IsADirectoryError(f"{str(folder / name)!r} is a directory: cannot write {name} there")
    open_sample_folder(folder, manifest)
    save_png((~known[0]).float(), folder / "mask.png")
    jobs = [(i, s, folder / f"{i:05d}_{s:06d}.png") for i in range(len(originals)) for s in seed_list]
    done = existing_pngs([path for _, _, path in jobs], manifest) if skip_existing else set()
    todo = [job for job in jobs if job[2] not in done]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="img", desc="inpainting") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            rows = [i for i, _, _ in batch]
            denoiser, run_settings = guided(trained.denoiser, settings,
                                            None if label_list is None else [label_list[i] for i in rows],
                                            trained.guide)
            x = complete(denoiser, originals[rows].to(where), known, [s for _, s, _ in batch], run_settings,
                         resample, guidance)
            for (_, _, path), image in zip(batch, to_unit(x)):
                save_png(image, path)
            bar.update(len(batch))
    if grid_images:
        shown = range(min(grid_images, len(originals)))
        completions = torch.stack([torch.stack([read_png(folder / f"{i:05d}_{s:06d}.png") for s in seed_list[:8]])
                                   for i in shown]).float() / 127.5 - 1
        save_png(inpainting_grid(originals[list(shown)], known.cpu(), completions), folder / "grid.png")
    print(f"wrote {len(todo)} completions to {folder} ({len(jobs) - len(todo)} were there; "
          f"{guided_nfe(settings) * resample} network evaluations each)", file=sys.stderr)


def load_images(trained: Model, folder: str | None, data: DataSource, n: int | None) -> torch.Tensor:
    """The first ``n`` images [N, C, H, W] in [-1, 1] of ``folder`` (each of the model's size, else a ``ValueError``
    naming it) or of the held-out split of ``data``."""
    size = trained.image_size
    if folder is not None:
        module = ImageDataModule(dataset="folder", root=folder, image_size=size, channels=trained.channels)
        found = module.full_dataset()
        for path in found.paths[:n]:
            with Image.open(path) as image:
                if image.size != (size, size):
                    raise ValueError(f"image {str(path)!r} is {image.size[0]}x{image.size[1]} pixels, the model's "
                                     f"images are {size}x{size}")
    else:
        module = data.data_module(trained, held_out=True)
        module.setup("fit")
        found = module.val_set
    return torch.stack([found[i][0] for i in range(min(n or len(found), len(found)))])
