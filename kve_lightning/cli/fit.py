"""``kve fit | validate | test | predict``: LightningCLI over ``KarrasVeModule`` and ``ImageDataModule``.

Besides the module's, the data's and the Trainer's options it has the callbacks' groups (``--writer.*`` for
predict's PNGs, ``--sample_grid.*``, ``--inpaint_grid.*``, ``--fid.*``, ``--bpd.*`` for what validation logs), and the
names ``kve sample`` gives the same settings: ``--seeds``, ``--out``, ``--grid`` and ``--skip_existing``. The rules on
top of LightningCLI's:

- **A run lives under ``--trainer.default_root_dir``.** A configured ``ModelCheckpoint`` without a ``dirpath``
  writes to ``ROOT/checkpoints``, TensorBoard logs and the saved config go to ``ROOT/lightning_logs``, and
  ``--ckpt_path last`` means the newest ``last*.ckpt`` of the configured checkpoint folders (without a configured
  ``ModelCheckpoint``: of Lightning's own, ``ROOT/lightning_logs/version_*/checkpoints``).
- **With ``--ckpt_path``, the checkpoint's hyper-parameters are the defaults**, and what the config files and flags
  give overrides them: ``--model.num_steps 18`` samples with 18 steps. Architecture settings (UNet, image size,
  channels) and the training noise range that contradict the checkpoint are an error naming them, and so is a data
  split that would hold out images the model was trained on (its own split is the default). ``kve test`` needs a
  checkpoint, and ``kve fit`` refuses to resume one that holds weights only.
- **``sigma_max: auto``** (``--model.sigma_max auto``) becomes a number before the model is built: the training
  split's largest pairwise distance (Song & Ermon 2020, technique 1), or with ``--ckpt_path`` the checkpoint's own;
  so does ``sigma_data: auto``: the training split's pixel standard deviation (EDM's sigma_data).
  Hyper-parameters, checkpoints, the saved config and exports hold that number.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from kve_lightning.cli.common import PARSER_MODE, ConfigFile
from kve_lightning.denoiser import SIGMA_DATA, unet_config
from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.lit.callbacks import FID, BitsPerDim, InpaintingGrid, SampleGrid
from kve_lightning.lit.data import MAX_DISTANCE_IMAGES, SPLIT, ImageDataModule, split_conflicts
from kve_lightning.lit.module import checkpoint_hparams
from kve_lightning.lit.writer import PNGWriter

# the callbacks every run has, each an option group: `kve predict` writes {seed:06d}.png and grid.png (writer);
# validation logs the sample grid, the inpainting grid, FID and bits/dim (the last two off by default)
CALLBACKS = {"writer": PNGWriter, "sample_grid": SampleGrid, "inpaint_grid": InpaintingGrid, "fid": FID,
             "bpd": BitsPerDim}
# a checkpoint's, never overridden
FIXED = ("image_size", "channels", "unet", "train_sigma_min", "train_sigma_max", "num_classes")


class KveCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        modes = {"parser_mode": PARSER_MODE, "exit_on_error": False}  # cli_main prints errors in one line
        super().__init__(*args, parser_kwargs=modes | {s: modes for s in self.subcommands()}, **kwargs)

    def init_parser(self, **kwargs):
        """LightningCLI's parser, with ``--config`` naming its file in every error (``ConfigFile``)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ConfigFile, help="a YAML config file of these options")
        return parser

    def _add_subcommands(self, parser, **kwargs) -> None:
        """LightningCLI's subcommands, and the others of ``kve`` listed beside them in ``kve --help`` (``cli_main``
        runs those before this parser is built)."""
        from kve_lightning.cli import COMMANDS

        super()._add_subcommands(parser, **kwargs)
        for name, description in COMMANDS.items():
            parser._subcommands_action.add_subcommand(name, ArgumentParser(description=description), help=description)

    def add_arguments_to_parser(self, parser) -> None:
        # the user sets the image size and channel count once, on the data
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.channels", "model.channels")
        for name, callback in CALLBACKS.items():
            parser.add_lightning_class_args(callback, name)
        # the names kve sample gives the same settings of its sample folder
        parser.add_argument("--seeds", default="0-63", help='the seeds `kve predict` samples, one image each: "0-63", '
                                                             '"0-9,20"')
        parser.add_argument("--labels", default=None, help='the class `kve predict` samples for each seed of a '
                            'conditional model: one label for every seed ("3") or one per seed ("0-9", "3,1,4")')
        parser.add_argument("--out", default="samples", help="the folder `kve predict` writes its PNGs to")
        parser.add_argument("--grid", type=bool, default=True, help="`kve predict` also writes grid.png")
        parser.add_argument("--skip_existing", type=bool, default=True,
                            help="`kve predict` leaves out the seeds whose PNG is already in --out")
        for name, target in (("seeds", "data.predict_seeds"), ("labels", "data.predict_labels"),
                             ("out", "writer.output_dir"), ("grid", "writer.grid"),
                             ("skip_existing", "writer.skip_existing")):
            parser.link_arguments(name, target)

    def parse_arguments(self, parser, args) -> None:
        """Parse; with ``--ckpt_path``, read the checkpoint (weights-only, ``read_checkpoint``), make its
        hyper-parameters the parser's defaults and parse again, so the config and flags override them. Then
        ``sigma_max: auto`` and ``sigma_data: auto`` become numbers (``resolve_auto``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        place_run(config)
        hparams = None
        if subcommand == "test" and not config.get("ckpt_path"):
            raise ValueError("kve test evaluates a trained model: give --ckpt_path (a checkpoint file, or last)")
        if config.get("ckpt_path"):
            if config.get("weights_only") is False:
                raise ValueError("--weights_only false is refused: kve reads checkpoints weights-only (no unpickling "
                                 "of arbitrary objects); convert an old checkpoint with torch.load yourself if you "
                                 "trust it")
            path = resolve_ckpt_path(config)
            checkpoint = read_checkpoint(path)
            if subcommand == "fit" and "optimizer_states" not in checkpoint:
                raise ValueError(f"{str(path)!r} holds weights only (no optimizer or loop state, e.g. a kve phema "
                                 f"output): kve fit cannot resume it; use it with kve sample, export or test "
                                 f"--ckpt_path")
            hparams = checkpoint_hparams(checkpoint["hyper_parameters"])
            split = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k in SPLIT}
            set_checkpoint_defaults(self._parser(subcommand), hparams, split, path)
            super().parse_arguments(parser, args)
            config = self.config[subcommand] if subcommand else self.config
            place_run(config)
            if config.model.get("num_steps") != hparams.get("num_steps") and (
                    config.model.get("nfe_budget") == hparams.get("nfe_budget") is not None):
                config.model.nfe_budget = None  # a step count given replaces the checkpoint's NFE budget
            check_architecture(config.model, hparams, path)
            if subcommand != "predict":
                check_split(config.data, split, path)
            config.ckpt_path, config.weights_only = str(path), True
        resolve_auto(config, hparams)

    def before_instantiate_classes(self) -> None:
        """``kve predict`` writes its sample folder only (its manifest.json records the settings): no config.yaml,
        no empty TensorBoard folder."""
        if self.config.get("subcommand") == "predict":
            self.save_config_callback = None
            self.config.predict.trainer.logger = False

    def _parse_ckpt_path(self) -> None:
        """Done in ``parse_arguments``: LightningCLI's own would let the checkpoint override the flags."""

    def predict(self, **kwargs) -> None:
        """Predictions go to disk batch by batch; none are kept in memory unless asked for. Labels and guidance the
        model cannot take are refused first, before anything is written."""
        self.model.sampling_denoiser(self.model.sampler, self.datamodule.labels)
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


def resolve_auto(config, hparams: dict[str, Any] | None) -> None:
    """Replace ``model.sigma_max: auto`` and ``model.sigma_data: auto`` with numbers, each printed once: the
    checkpoint's (``hparams``), else the configured data's ``ImageDataModule.max_pairwise_distance()`` and
    ``ImageDataModule.data_std()``."""
    data = None
    for name in ("sigma_max", "sigma_data"):
        if config.model.get(name) != "auto":
            continue
        if hparams is not None:
            config.model[name], source = hparams.get(name, SIGMA_DATA), "the checkpoint's"
        else:
            data = data or ImageDataModule(**config.data.as_dict())
            if name == "sigma_max":
                config.model[name] = data.max_pairwise_distance()
                n = len(data.train_set)
                subsample = f" (a seeded subsample of {MAX_DISTANCE_IMAGES:,})" if n > MAX_DISTANCE_IMAGES else ""
                source = f"the largest pairwise distance of the {n:,} training images{subsample}, in [-1, 1] units"
            else:
                config.model[name] = data.data_std()
                source = f"the pixel standard deviation of the {len(data.train_set):,} training images, in [-1, 1] " \
                         f"units"
        rank_zero_only(print)(f"kve: {name} auto = {config.model[name]:.6g}: {source}", file=sys.stderr)


def set_checkpoint_defaults(parser, hparams: dict[str, Any], split: dict[str, Any], path: Path) -> None:
    """Make a checkpoint's hyper-parameters the defaults of ``--model.*`` (and of the data's image size and channel
    count, which the model's follow), and its data module's split (``SPLIT``) those of ``--data.*``."""
    linked = ("image_size", "channels")
    defaults = {f"model.{k}": v for k, v in hparams.items() if k not in linked}
    defaults |= {f"data.{k}": hparams[k] for k in linked if k in hparams}
    defaults |= {f"data.{k}": v for k, v in split.items()}
    known = {action.dest for action in parser._actions}
    unknown = [k for k in defaults if k not in known]
    if unknown:
        raise ValueError(f"checkpoint {str(path)!r} holds hyper-parameters this version does not know: {unknown}")
    parser.set_defaults(defaults)


def check_split(data, split: dict[str, Any], path: Path) -> None:
    """A ``ValueError`` naming each setting of the data split that would hold out images the checkpoint's model was
    trained on (``split_conflicts``)."""
    conflicts = split_conflicts(dict(data), split)
    if conflicts:
        raise ValueError(f"the configured data split does not fit checkpoint {str(path)!r}: {', '.join(conflicts)}: "
                         f"its held-out images would include images the model was trained on (leave them out to take "
                         f"the checkpoint's)")


def check_architecture(model, hparams: dict[str, Any], path: Path) -> None:
    """A ``ValueError`` naming each setting of ``model`` (the parsed ``--model`` group) that is the checkpoint's
    own (``FIXED``: the architecture and the training noise range) and differs from it."""
    def normalized(settings) -> dict[str, Any]:
        unet = unet_config(settings.get("image_size"), settings.get("channels"), settings.get("unet"))
        return json.loads(json.dumps({k: settings.get(k) for k in FIXED if k != "unet"} | unet))

    here, there = normalized(dict(model)), normalized(hparams)
    renamed = {"sample_size", "in_channels", "out_channels"}  # the same as image_size and channels
    diff = [f"{k}={here.get(k)!r} here but {there.get(k)!r} in the checkpoint"
            for k in sorted(here.keys() | there.keys()) if k not in renamed and here.get(k) != there.get(k)]
    if diff:
        raise ValueError(f"the configured model does not fit checkpoint {str(path)!r}: {'; '.join(diff)} (leave "
                         f"--model.unet, --model.train_sigma_*, --data.image_size and --data.channels out to take the "
                         f"checkpoint's; --model.sigma_min/sigma_max set the sampler's range only)")
