"""``kve sample``: a checkpoint or an exported folder -> one PNG per seed."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from kve_lightning.cli.common import at_least, check_outputs, load_model, parse_device
from kve_lightning.guidance import guided, guided_nfe
from kve_lightning.lit.data import parse_labels, parse_seeds
from kve_lightning.storage import existing_seeds, open_sample_folder, prepare_output_dir, save_grid, save_png, seed_path

DOC = """Checkpoint or exported folder -> PNGs: the EMA weights, the stochastic Karras VE sampler.

    kve sample --ckpt_path runs/digits/checkpoints/last.ckpt --out samples/digits --seeds 0-63
    kve sample --pipeline exported/digits --out samples/digits --model.num_steps 18 --model.s_churn 0
    kve sample --ckpt_path runs/digits_cond/checkpoints/last.ckpt --out samples/threes --labels 3 \
        --model.guidance_scale 2 [--guide_ckpt_path runs/digits_cond/checkpoints/early.ckpt]

Writes {seed:06d}.png per seed and grid.png, the same bytes as `kve predict` for the same seeds
and sampler settings. --model.* flags override the model's sampler settings, and so does --config (a `kve fit`
config or `kve tune`'s output), the flags overriding it.

Each PNG is written atomically, and the folder's manifest.json records the weights' SHA-256, the image size and the
sampler settings, and a conditional model's labels (the same manifest as `kve predict`'s). Rerun an interrupted
command and it samples only the seeds whose PNG is missing; a folder whose manifest differs is refused (exit 2).
"""


def run(out: str, ckpt_path: str | None = None, pipeline: str | None = None, seeds: str = "0-63",
        labels: int | str | list[int] | None = None, guide_ckpt_path: str | None = None, batch_size: int = 64,
        grid: bool = True, skip_existing: bool = True, device: str | None = None,
        model: dict[str, Any] | None = None) -> None:
    """Sample one image per seed into ``out``.

    Args:
        out: the output folder (created if missing).
        ckpt_path: a checkpoint written by `kve fit` (read weights-only).
        pipeline: a folder written by `kve export` (safetensors and JSON), instead of ``ckpt_path``.
        seeds: the seeds, one image each: "0-63", "0-9,20".
        labels: the class of each seed for a conditional model: one label for every seed ("3") or one per seed
            ("0-9", "3,1,4"; default: none, the null class).
        guide_ckpt_path: a checkpoint of a weaker model of the same data that guides when --model.guidance_scale
            != 1 (autoguidance); without one a conditional model guides with its null class (classifier-free).
        batch_size: images sampled at once.
        grid: also write grid.png of the first 256 seeds.
        skip_existing: leave out the seeds whose PNG is already in ``out`` (false: sample them again).
        device: the torch device (default: cuda if available, else cpu).
    """
    seed_list = parse_seeds(seeds)
    label_list = parse_labels(labels, len(seed_list))
    at_least("--batch_size", batch_size, 1)
    trained = load_model(ckpt_path, pipeline, parse_device(device), guide_ckpt_path)
    check_outputs({"--out": out}, {"--ckpt_path": ckpt_path, "--pipeline": pipeline,
                                   "--guide_ckpt_path": guide_ckpt_path})
    settings = trained.settings_with(model or {})
    guided(trained.denoiser, settings, label_list, trained.guide)  # bad labels or guidance: refused now
    label_of = None if label_list is None else dict(zip(seed_list, label_list))
    manifest = trained.manifest(settings, label_of)
    folder = prepare_output_dir(out)
    if grid and (folder / "grid.png").is_dir():
        raise IsADirectoryError(f"{str(folder / 'grid.png')!r} is a directory: cannot write the grid there")
    open_sample_folder(folder, manifest)
    done = existing_seeds(folder, seed_list, manifest) if skip_existing else set()
    todo = [s for s in seed_list if s not in done]
    with tqdm(total=len(seed_list), initial=len(done), unit="img", desc="sampling") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            batch_labels = None if label_of is None else [label_of[s] for s in batch]
            for seed, image in zip(batch, trained.sample(batch, settings, batch_labels)):
                save_png(image, seed_path(folder, seed))
            bar.update(len(batch))
    if grid:
        save_grid(folder, seed_list)
    print(f"wrote {len(todo)} images to {folder} ({len(done)} were there; {guided_nfe(settings)} network evaluations "
          f"per image)", file=sys.stderr)
