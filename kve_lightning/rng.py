"""The global random number generators' states, as plain tensors and numbers a weights-only ``torch.load`` reads.

``KarrasVeModule`` stores them in every checkpoint and restores them when fitting resumes, so the resumed run draws
the same training noise, flips and data order (a ``RandomSampler`` seeds itself from the torch generator at each
epoch) as an uninterrupted run.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def get_rng_states() -> dict[str, Any]:
    """torch (CPU, and the current CUDA device once CUDA is in use), numpy and Python ``random`` states."""
    version, key, gauss = random.getstate()
    _, np_key, pos, has_gauss, np_gauss = np.random.get_state(legacy=True)
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(np_gauss)},
        "python": {"version": version, "key": list(key), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``get_rng_states`` returned (the CUDA state, if any, to the current CUDA device)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["key"]), p["gauss"]))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch.cuda"])
