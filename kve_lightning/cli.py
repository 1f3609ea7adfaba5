"""The ``kve`` command: LightningCLI over ``KarrasVeModule`` and ``ImageDataModule`` (fit, validate, predict).

Two rules on top of LightningCLI's:

- **A run lives under ``--trainer.default_root_dir``.** A configured ``ModelCheckpoint`` without a ``dirpath``
  writes to ``ROOT/checkpoints``, TensorBoard logs and the saved config go to ``ROOT/lightning_logs``, and
  ``--ckpt_path last`` means the newest ``last*.ckpt`` of the configured checkpoint folders (without a configured
  ``ModelCheckpoint``: of Lightning's own, ``ROOT/lightning_logs/version_*/checkpoints``).
- **With ``--ckpt_path``, the checkpoint's hyper-parameters are the defaults**, and what the config files and flags
  give overrides them: ``--model.num_steps 18`` samples with 18 steps. Architecture settings (UNet, image size,
  channels) that contradict the checkpoint are an error naming them.
- **``sigma_max: auto``** (``--model.sigma_max auto``) becomes a number before the model is built: the training
  split's largest pairwise distance (Song & Ermon 2020, technique 1), or with ``--ckpt_path`` the checkpoint's own.
  Hyper-parameters, checkpoints, the saved config and exports hold that number.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from kve_lightning.checkpoint import read_checkpoint
from kve_lightning.data import MAX_DISTANCE_IMAGES, ImageDataModule
from kve_lightning.images import PNGWriter
from kve_lightning.module import KarrasVeModule, unet_config


class KveCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the user sets the image size and channel count once, on the data
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.channels", "model.channels")
        # `kve predict` writes {seed:06d}.png and grid.png into --writer.output_dir
        parser.add_lightning_class_args(PNGWriter, "writer")

    def parse_arguments(self, parser, args) -> None:
        """Parse; with ``--ckpt_path``, read the checkpoint (weights-only, ``read_checkpoint``), make its
        hyper-parameters the parser's defaults and parse again, so the config and flags override them. Then
        ``sigma_max: auto`` becomes a number (``resolve_sigma_max``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        place_run(config)
        hparams = None
        if config.get("ckpt_path"):
            if config.get("weights_only") is False:
                raise ValueError("--weights_only false is refused: kve reads checkpoints weights-only (no unpickling "
                                 "of arbitrary objects); convert an old checkpoint with torch.load yourself if you "
                                 "trust it")
            path = resolve_ckpt_path(config)
            hparams = read_checkpoint(path)["hyper_parameters"]
            set_checkpoint_defaults(self._parser(subcommand), hparams, path)
            super().parse_arguments(parser, args)
            config = self.config[subcommand] if subcommand else self.config
            place_run(config)
            check_architecture(config.model, hparams, path)
            config.ckpt_path, config.weights_only = str(path), True
        resolve_sigma_max(config, hparams)

    def before_instantiate_classes(self) -> None:
        """``kve predict`` writes its sample folder only (its manifest.json records the settings): no config.yaml,
        no empty TensorBoard folder."""
        if self.config.get("subcommand") == "predict":
            self.save_config_callback = None
            self.config.predict.trainer.logger = False

    def _parse_ckpt_path(self) -> None:
        """Done in ``parse_arguments``: LightningCLI's own would let the checkpoint override the flags."""

    def predict(self, **kwargs) -> None:
        """Predictions go to disk batch by batch; none are kept in memory unless asked for."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def run_root(config) -> Path:
    return Path(config.trainer.get("default_root_dir") or os.getcwd())


def checkpoint_callbacks(config) -> list:
    callbacks = config.trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return [c for c in callbacks if str(c.get("class_path", "")).endswith("ModelCheckpoint")]


def place_run(config) -> None:
    """Give every configured ``ModelCheckpoint`` without a ``dirpath`` the folder ``ROOT/checkpoints``."""
    for callback in checkpoint_callbacks(config):
        if callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(run_root(config) / "checkpoints")


def resolve_ckpt_path(config) -> Path:
    """The file ``--ckpt_path`` means: a local path as given; ``last``: the newest ``last*.ckpt`` in the run's
    checkpoint folders; ``best``: the best checkpoint that one records; ``hpc``: the newest ``hpc_ckpt_N.ckpt`` in
    the run's root. URLs are refused (download the file and check where it comes from first)."""
    ckpt_path = str(config.ckpt_path)
    if "://" in ckpt_path:
        raise ValueError(f"--ckpt_path {ckpt_path!r}: kve reads local checkpoint files only (a checkpoint is a "
                         f"pickle: download it, check its origin, then pass its path)")
    root = run_root(config)
    # the configured ModelCheckpoints' folders; without one, Lightning's own writes under each logger version
    folders = [Path(c.init_args.dirpath) for c in checkpoint_callbacks(config)] or sorted(
        root.glob("lightning_logs/version_*/checkpoints"))
    if ckpt_path in ("last", "best"):
        found = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
        if not found:
            where = [str(f) for f in folders] or str(root)
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no last.ckpt in {where}: no run "
                                    f"there to resume or sample (set --trainer.default_root_dir to the run's folder, "
                                    f"or give a checkpoint file)")
        last = max(found, key=lambda p: p.stat().st_mtime)
        if ckpt_path == "last":
            return last
        states = read_checkpoint(last).get("callbacks", {}).values()
        best = [s["best_model_path"] for s in states
                if isinstance(s, dict) and s.get("monitor") and s.get("best_model_path")]
        if not best:
            raise FileNotFoundError(f"--ckpt_path best: {str(last)!r} records no best checkpoint (no "
                                    f"ModelCheckpoint monitors a metric); give a checkpoint file")
        return Path(best[0])
    if ckpt_path == "hpc":
        found = {int(p.stem[len("hpc_ckpt_"):]): p for p in root.glob("hpc_ckpt_*.ckpt")
                 if p.stem[len("hpc_ckpt_"):].isdigit()}
        if not found:
            raise FileNotFoundError(f"--ckpt_path hpc: no hpc_ckpt_N.ckpt in {str(root)!r}")
        return found[max(found)]
    return Path(ckpt_path)


def resolve_sigma_max(config, hparams: dict[str, Any] | None) -> None:
    """Replace ``model.sigma_max: auto`` with a number, printed once: the checkpoint's (``hparams``; the network was
    trained on [sigma_min, sigma_max]), else ``ImageDataModule.max_pairwise_distance()`` of the configured data."""
    if config.model.sigma_max != "auto":
        return
    if hparams is not None:
        config.model.sigma_max, source = hparams["sigma_max"], "the checkpoint's"
    else:
        data = ImageDataModule(**config.data.as_dict())
        config.model.sigma_max = data.max_pairwise_distance()
        n = len(data.train_set)
        subsample = f" (a seeded subsample of {MAX_DISTANCE_IMAGES:,})" if n > MAX_DISTANCE_IMAGES else ""
        source = f"the largest pairwise distance of the {n:,} training images{subsample}, in [-1, 1] units"
    rank_zero_only(print)(f"kve: sigma_max auto = {config.model.sigma_max:.6g}: {source}", file=sys.stderr)


def set_checkpoint_defaults(parser, hparams: dict[str, Any], path: Path) -> None:
    """Make a checkpoint's hyper-parameters the defaults of ``--model.*`` (and of the data's image size and channel
    count, which the model's follow)."""
    linked = ("image_size", "channels")
    defaults = {f"model.{k}": v for k, v in hparams.items() if not k.startswith("_") and k not in linked}
    defaults |= {f"data.{k}": hparams[k] for k in linked if k in hparams}
    known = {action.dest for action in parser._actions}
    unknown = [k for k in defaults if k not in known]
    if unknown:
        raise ValueError(f"checkpoint {str(path)!r} holds hyper-parameters this version does not know: {unknown}")
    parser.set_defaults(defaults)


def check_architecture(model, hparams: dict[str, Any], path: Path) -> None:
    """A ``ValueError`` naming each architecture setting of ``model`` (the parsed ``--model`` group) that differs
    from the checkpoint's."""
    def normalized(image_size, channels, unet) -> dict[str, Any]:
        return json.loads(json.dumps({"image_size": image_size, "channels": channels}
                                     | unet_config(image_size, channels, unet)))

    here = normalized(model.image_size, model.channels, model.unet)
    there = normalized(hparams.get("image_size"), hparams.get("channels"), hparams.get("unet"))
    renamed = {"sample_size", "in_channels", "out_channels"}  # the same as image_size and channels
    diff = [f"{k}={here.get(k)!r} here but {there.get(k)!r} in the checkpoint"
            for k in sorted(here.keys() | there.keys()) if k not in renamed and here.get(k) != there.get(k)]
    if diff:
        raise ValueError(f"the configured model does not fit checkpoint {str(path)!r}: {'; '.join(diff)} (leave "
                         f"--model.unet, --data.image_size and --data.channels out to take the checkpoint's)")


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``kve`` and ``python -m kve_lightning``; ``args`` replaces ``sys.argv[1:]``.

    Bad input (a ``ValueError`` or ``OSError`` naming the value) ends in one line on stderr and exit code 2; a
    diverged training run (``max_bad_steps`` non-finite steps in a row) in one line and exit code 3, its earlier
    checkpoints kept. ``KVE_TRACEBACK=1`` shows the whole traceback instead.
    """
    try:
        KveCLI(KarrasVeModule, ImageDataModule, save_config_kwargs={"overwrite": True}, args=args)
    except (ValueError, OSError, FloatingPointError) as err:
        if os.environ.get("KVE_TRACEBACK") == "1":
            raise
        print(f"kve: error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(3 if isinstance(err, FloatingPointError) else 2)


if __name__ == "__main__":
    cli_main()
