"""``kve export``: a checkpoint -> a diffusers folder."""

from __future__ import annotations

import json
import sys
from typing import Any

from kve_lightning.interop.export import export_checkpoint
from kve_lightning.interop.pipeline import not_for_karras_ve

DOC = """Checkpoint -> diffusers folder: EMA weights as safetensors, sampler settings as the scheduler config.

    kve export --ckpt_path runs/digits/checkpoints/last.ckpt --out exported/digits [--model.num_steps 18]

Load the folder with `KarrasVeLightningPipeline.from_pretrained(DIR)` or sample it with `kve sample --pipeline DIR`;
its `unet/` also loads into diffusers' own `KarrasVePipeline` (3-channel VE-preconditioned models; an EDM one says
there that it would be sampled wrongly). --model.* flags (and --config, a
`kve fit` config or `kve tune`'s output) replace the checkpoint's settings in the exported scheduler config.
Refuses an existing non-empty --out unless --overwrite true.
"""


def run(ckpt_path: str, out: str, overwrite: bool = False, model: dict[str, Any] | None = None) -> None:
    """Export ``ckpt_path`` to ``out``.

    Args:
        ckpt_path: a checkpoint written by `kve fit` (read weights-only).
        out: the folder to write (missing or empty).
        overwrite: replace ``out`` if it holds an earlier export.
    """
    folder = export_checkpoint(ckpt_path, out, overwrite=overwrite, **(model or {}))
    print(f"exported {ckpt_path} to {folder}", file=sys.stderr)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if scheduler["precond"] != "ve":
        print(f"kve export: note: {not_for_karras_ve(scheduler['sigma_data'])}", file=sys.stderr)
