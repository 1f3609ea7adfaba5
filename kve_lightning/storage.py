"""Writing samples as PNG files: one per seed, ``{seed:06d}.png``, plus a grid; the same bytes from every entry point.

A sample folder also holds ``manifest.json``: the weights' SHA-256, the image size and channel count, the sampler
settings, and for a conditional model the class label of each seed it was given (and a guide's SHA-256). Every writer
(``kve predict``, ``kve sample --ckpt_path`` or ``--pipeline``) refuses a folder whose manifest differs from its own,
so one folder never mixes images of different models or settings, and it can skip the seeds whose PNG is already
there: an interrupted run resumes where it stopped, whichever entry point wrote the folder. Labels are the one part
that grows: a run may add seeds of any class to a folder, as long as every seed it shares with the folder keeps its
class; the manifest then records the union.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from kve_lightning.sampling import SamplerSettings

MANIFEST = "manifest.json"
# what a sample folder holds: sample PNGs ({seed:06d}.png, or {image:05d}_{seed:06d}.png of kve inpaint), the grid,
# kve inpaint's mask.png, the manifest, and save_atomic's temporary files
SAMPLE_PNG = re.compile(r"(?:\d{5,}_)?\d{6,}\.png")
# a temporary file names its writer (host and process id) so that a cleanup deletes only those of dead writers
TEMP_FILE = re.compile(r"\.(?:(?:\d{5,}_)?\d{6,}\.png|grid\.png|mask\.png|manifest\.json)"
                       r"\.(?:([\w-]+)-(\d+)\.)?\w+\.tmp")


def writer_id() -> str:
    """This process as a writer: ``HOST-PID``, the host name reduced to letters, digits, ``_`` and ``-``."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}-{os.getpid()}"


def is_stale_temporary(name: str, pattern: re.Pattern = TEMP_FILE) -> bool:
    """A temporary file (``pattern``: a sample folder's ``TEMP_FILE`` by default) whose writer is gone: a process of
    this host that no longer runs, or a name without a writer. Another host's temporaries are never stale (their
    processes cannot be seen from here)."""
    m = pattern.fullmatch(name)
    if m is None:
        return False
    if m[1] is None:
        return True
    if f"{m[1]}-{m[2]}" == writer_id() or m[1] != writer_id().rsplit("-", 1)[0]:
        return False
    try:
        os.kill(int(m[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporary files that dead writers of ``path`` (``save_atomic``: ``.NAME.HOST-PID.*.tmp`` beside it)
    left behind, e.g. after a SIGKILL mid-write."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:([\w-]+)-(\d+)\.)?\w+\.tmp")
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if is_stale_temporary(p.name, pattern):
            p.unlink(missing_ok=True)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return (x / 2 + 0.5).clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] (C = 1 or 3) -> 8-bit PIL image ("L" or "RGB"), rounding to the nearest level."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    gray = array.shape[-1] == 1
    return Image.fromarray(array[..., 0] if gray else array, mode="L" if gray else "RGB")


def umask_mode(mode: int) -> int:
    """``mode`` less the process's umask: what ``open()`` (0o666) or ``mkdir()`` (0o777) would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def save_atomic(path: str | Path, write: Callable[[Any], None]) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then rename it to ``path``: a reader (or a
    killed writer) never sees a partial file, and the file gets the mode a plain ``open()`` would give it. A kill
    can leave the temporary ``.NAME.*.tmp`` behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_id()}.", suffix=".tmp", dir=path.parent)
    os.chmod(fd, umask_mode(0o666))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> None:
    """Write atomically (``save_atomic``): a kill never leaves a truncated PNG behind."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    save_atomic(path, lambda f: pil.save(f, format="PNG"))


def seed_path(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"{seed:06d}.png"


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents); a clear error if it is a file or not writable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {str(out)!r} is not writable")
    return out


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and bytes, sorted by name): the same for a UNet
    read from a checkpoint or from its exported safetensors."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_manifest(denoiser: torch.nn.Module, settings: SamplerSettings, labels: dict[int, int] | None = None,
                    guide: torch.nn.Module | None = None) -> dict[str, Any]:
    """The identity of a sample folder's images: the denoiser's UNet weights, image size and channels, its
    preconditioning (``precond`` and ``sigma_data``, for "edm" only: a VE folder's manifest is that of earlier
    versions), and the sampler settings that change images with the NFE spent per image
    (``SamplerSettings.manifest``: Algorithm 2 with none of the later solvers' settings, and without guidance the
    guidance settings, as in earlier versions). ``labels`` (seed -> class) are recorded as a map of seeds (strings)
    to classes; ``guide``'s UNet weights when it guides."""
    unet = denoiser.unet
    precond = {"precond": denoiser.precond, "sigma_data": denoiser.sigma_data} if denoiser.precond != "ve" else {}
    guiding = settings.guidance_scale != 1
    classes = {} if labels is None else {"labels": {str(seed): int(label) for seed, label in sorted(labels.items())}}
    guided_by = {"guide_weights_sha256": weights_sha256(guide.unet)} if guiding and guide is not None else {}
    return {"kve_lightning_samples": 1, "weights_sha256": weights_sha256(unet),
            "image_size": int(unet.config.sample_size), "channels": int(unet.config.in_channels), **precond,
            **classes, **guided_by, "sampler": dict(sorted(settings.manifest().items()))}


def _flatten(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in ("sampler", "labels")} | dict(manifest.get("sampler", {}))


def _stored_labels(out: Path, labels: Any) -> Any:
    """A manifest's ``labels`` as a seed -> class map: one label for every seed (as earlier versions wrote it when
    all seeds had the same) stands for the seeds whose PNG is in ``out``."""
    if isinstance(labels, bool) or not isinstance(labels, int):
        return labels
    return {m[1].lstrip("0") or "0": labels for p in out.iterdir() if (m := re.fullmatch(r"(\d{6,})\.png", p.name))}


def _merged_labels(out: Path, old: Any, new: Any) -> dict[str, int] | None:
    """The union of two manifests' seed -> class maps, or a ``ValueError`` naming a seed they give different
    classes; ``None`` when neither has labels."""
    if old is None and new is None:
        return None
    if old is None or new is None or not isinstance(old, dict):
        there, now = ("labels" if x is not None else "no labels (the null class)" for x in (old, new))
        raise ValueError(f"output folder {str(out)!r} holds samples with {there}, this run makes them with {now}; "
                         f"use a new folder")
    clashes = sorted((int(seed) for seed in old.keys() & new.keys() if old[seed] != new[seed]))
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise ValueError(f"output folder {str(out)!r} holds seed {clashes[0]} as class {old[str(clashes[0])]}, this "
                         f"run asks for class {new[str(clashes[0])]}{more}; use a new folder, or other seeds")
    if not new.keys() - old.keys():
        return old
    return dict(sorted((old | new).items(), key=lambda item: int(item[0])))


def check_sample_folder(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest ``out_dir`` has once it takes images of ``manifest``: ``manifest`` if it has none and holds no
    seed PNGs (images of unknown origin refused), else its own, with the labels of both where ``manifest``'s add
    seeds (``_merged_labels``). A ``ValueError`` when any other part differs. Changes nothing."""
    out = Path(out_dir)
    path = out / MANIFEST
    if not os.path.lexists(path):  # a dangling link is a manifest that cannot be read, not a missing one
        if any(SAMPLE_PNG.fullmatch(p.name) for p in out.iterdir()):
            raise ValueError(f"output folder {str(out)!r} holds sample PNGs but no {MANIFEST}: refusing to add images "
                             f"of possibly other weights or settings; use a new folder")
        return manifest
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r} ({err}); use a new folder") from None
    if old == manifest:
        return old
    old = old if isinstance(old, dict) else {}
    flat_old, flat_new = _flatten(old), _flatten(manifest)
    diff = [f"{k}: {flat_old.get(k)!r} there, {flat_new.get(k)!r} now"
            for k in sorted(flat_old.keys() | flat_new.keys()) if flat_old.get(k) != flat_new.get(k)]
    if diff:
        raise ValueError(f"output folder {str(out)!r} holds samples of other weights or settings ({'; '.join(diff)}); "
                         f"use a new folder (or the settings of its {MANIFEST})")
    labels = _merged_labels(out, _stored_labels(out, old.get("labels")), manifest.get("labels"))
    return old if labels == old.get("labels") else old | {"labels": labels}


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive ``flock`` on ``folder`` while the block runs (concurrent writers merging labels take turns); no
    lock where the file system has none."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_sample_folder(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """``check_sample_folder``, then create ``manifest.json`` if missing, exclusively (a hard link of a complete
    temporary file, which fails if another writer created it first), or replace it with the merged one where this
    run adds labelled seeds (under ``_locked``: writers of one folder take turns), check the folder again (a
    ``ValueError`` if a concurrent writer of other settings won), and delete the temporary files that dead writers
    left. Call it before any image of this run is written; concurrent writers of the same settings may all call it."""
    out = Path(out_dir)
    with _locked(out):
        merged = check_sample_folder(out, manifest)
        payload = (json.dumps(merged, indent=2) + "\n").encode()
        if os.path.lexists(out / MANIFEST):
            if merged.get("labels") != json.loads((out / MANIFEST).read_text()).get("labels"):
                save_atomic(out / MANIFEST, lambda f: f.write(payload))
        else:
            tmp = out / f".{MANIFEST}.{writer_id()}.{os.urandom(4).hex()}.tmp"
            with open(tmp, "xb") as f:
                f.write(payload)
            try:
                os.link(tmp, out / MANIFEST)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: create it exclusively in place
                with contextlib.suppress(FileExistsError), open(out / MANIFEST, "xb") as f:
                    f.write(payload)
            finally:
                tmp.unlink()
        check_sample_folder(out, manifest)
    for p in out.iterdir():
        if is_stale_temporary(p.name):
            p.unlink(missing_ok=True)


def existing_pngs(paths: Sequence[Path], manifest: dict[str, Any]) -> set[Path]:
    """Those of ``paths`` (files of one folder) that decode to a PNG of the manifest's size and channels; a
    zero-byte, truncated or foreign file does not count (its image is sampled again and the file replaced)."""
    names = set(os.listdir(paths[0].parent)) if paths else set()
    size, mode = (manifest["image_size"],) * 2, "L" if manifest["channels"] == 1 else "RGB"

    def intact(path: Path) -> bool:
        try:
            with Image.open(path) as image:
                image.load()
                return image.format == "PNG" and image.size == size and image.mode == mode
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            return False

    return {p for p in paths if p.name in names and intact(p)}


def existing_seeds(out_dir: str | Path, seeds: Sequence[int], manifest: dict[str, Any]) -> set[int]:
    """The seeds of ``seeds`` whose PNG is in ``out_dir`` intact (``existing_pngs``)."""
    done = existing_pngs([seed_path(out_dir, s) for s in seeds], manifest)
    return {s for s in seeds if seed_path(out_dir, s) in done}


def read_png(path: str | Path) -> torch.Tensor:
    """A PNG written here as [C, H, W] uint8."""
    with Image.open(path) as image:
        array = torch.from_numpy(np.array(image, copy=True))
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)


def save_grid(out_dir: str | Path, seeds: Sequence[int], max_images: int = 256) -> Path:
    """``grid.png`` from the first ``max_images`` seeds' PNGs, read back from ``out_dir`` (memory stays flat)."""
    seeds = list(seeds)[:max_images]
    batch = torch.stack([read_png(seed_path(out_dir, s)) for s in seeds])
    grid = make_grid(batch, nrow=math.ceil(math.sqrt(len(seeds))), padding=1)
    path = Path(out_dir) / "grid.png"
    save_png(Image.fromarray(grid[0].numpy() if batch.shape[1] == 1 else grid.permute(1, 2, 0).numpy()), path)
    return path
