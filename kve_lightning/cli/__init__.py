"""The ``kve`` command line: one program, one vocabulary.

``kve fit | validate | test | predict`` are LightningCLI's (``fit.py``); ``kve sample | export | inpaint |
likelihood | tune | phema`` are one file each here, built by the same jsonargparse machinery (``common.py``): the
same ``--ckpt_path``, ``--model.<sampler setting>``, ``--data.*``, ``--seeds``, ``--out``, ``--config`` and
``--print_config``, and the same one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "sample": "a checkpoint or an exported folder -> one PNG per seed",
    "export": "a checkpoint -> a diffusers folder",
    "inpaint": "fill in the masked part of images",
    "likelihood": "bits/dim of held-out images through the probability-flow ODE",
    "tune": "search the solver and its settings at a fixed NFE",
    "phema": "post-hoc EMA: reconstruct the EMA of any relative std from a run's snapshots",
}


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``kve`` and ``python -m kve_lightning``; ``args`` replaces ``sys.argv[1:]``.

    Bad input (a ``ValueError`` or ``OSError`` naming the value) ends in one line on stderr and exit code 2; a
    diverged training run (``max_bad_steps`` non-finite steps in a row) in one line and exit code 3, its earlier
    checkpoints kept. ``KVE_TRACEBACK=1`` shows the whole traceback instead.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        from kve_lightning.cli.common import run_command

        return run_command(argv[0], argv[1:])
    from kve_lightning.cli.fit import KveCLI
    from kve_lightning.lit.data import ImageDataModule
    from kve_lightning.lit.module import KarrasVeModule

    try:
        KveCLI(KarrasVeModule, ImageDataModule, save_config_kwargs={"overwrite": True}, args=args)
    except (ValueError, OSError, FloatingPointError, argparse.ArgumentError) as err:
        if os.environ.get("KVE_TRACEBACK") == "1":
            raise
        from kve_lightning.cli.common import error_line

        kind = "" if isinstance(err, argparse.ArgumentError) else f"{type(err).__name__}: "
        print(f"kve: error: {kind}{error_line(err, argv)}", file=sys.stderr)
        sys.exit(3 if isinstance(err, FloatingPointError) else 2)
