"""The ``kve`` command: LightningCLI over ``KarrasVeModule`` and ``ImageDataModule`` (fit, validate, predict)."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from kve_lightning.data import ImageDataModule
from kve_lightning.export import read_checkpoint
from kve_lightning.images import PNGWriter
from kve_lightning.module import KarrasVeModule


class KveCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the user sets the image size and channel count once, on the data
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.channels", "model.channels")
        # `kve predict` writes {seed:06d}.png and grid.png into --writer.output_dir
        parser.add_lightning_class_args(PNGWriter, "writer")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check a ``--ckpt_path`` file (``read_checkpoint``: a clear error for a truncated or foreign
        file) before LightningCLI reads its hyper-parameters, which then replace the configured model's.
        Lightning resolves ``last``, ``best``, ``hpc`` and remote paths itself."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and "://" not in str(ckpt_path):
            read_checkpoint(ckpt_path)

    def predict(self, **kwargs) -> None:
        """Predictions go to disk batch by batch; none are kept in memory unless asked for."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``kve`` and ``python -m kve_lightning``; ``args`` replaces ``sys.argv[1:]``.

    Bad input (a ``ValueError`` or ``OSError`` naming the value) ends in one line on stderr and exit code 2;
    ``KVE_TRACEBACK=1`` shows the whole traceback instead.
    """
    try:
        KveCLI(KarrasVeModule, ImageDataModule, save_config_kwargs={"overwrite": True}, args=args)
    except (ValueError, OSError) as err:
        if os.environ.get("KVE_TRACEBACK") == "1":
            raise
        print(f"kve: error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
