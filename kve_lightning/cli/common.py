"""What every ``kve`` subcommand shares: the jsonargparse parser of a command function, its YAML loader, the one-line
errors, and reading a trained model from ``--ckpt_path`` or ``--pipeline``.

A command is a module of ``kve_lightning.cli`` with ``DOC`` (the description) and ``run(...)``, whose parameters and
``Args:`` entries become its options, as ``kve fit``'s come from the classes' signatures. ``run`` raises a
``ValueError`` or ``OSError`` naming the bad value before it writes anything.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import asdict, dataclass, fields, is_dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_loader
from jsonargparse._loaders_dumpers import get_yaml_default_loader

from kve_lightning.denoiser import VEDenoiser
from kve_lightning.lit.data import DatasetName, ImageDataModule, split_conflicts
from kve_lightning.sampling import SamplerSettings, bounded_repr

PARSER_MODE = "kve"  # jsonargparse's YAML, refusing duplicate keys
# the sections of a `kve fit` config that the other subcommands do not take: they read its sampler settings only
FIT_SECTIONS = frozenset({"seed_everything", "trainer", "data", "optimizer", "lr_scheduler", "writer", "sample_grid",
                          "inpaint_grid", "fid", "bpd"})
# `kve predict`'s keys in a `kve fit` config: `kve sample`'s too, meaning the same; the others' own differ
PREDICT_KEYS = frozenset({"seeds", "labels", "out", "grid", "skip_existing"})


class ConfigError(yaml.YAMLError):
    pass


def _loader_class() -> type:
    """jsonargparse's YAML loader (safe: plain data only; YAML 1.2 floats such as 1e-2), refusing a key given twice
    in a mapping and aliases (``*name``: a few lines of them can name 10**9 values)."""
    class Loader(get_yaml_default_loader()):
        def construct_object(self, node, deep=False):
            if node in self.constructed_objects and not isinstance(node, yaml.ScalarNode):  # reached again: an alias
                raise ConfigError(f"YAML aliases (*name) of collections are not accepted (line "
                                  f"{node.start_mark.line + 1}): write the values out")
            return super().construct_object(node, deep)

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=True) for key, _ in node.value]
            repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
            if repeated:
                raise ConfigError(f"the key {bounded_repr(repeated[0])} is given twice in one mapping "
                                  f"(line {node.start_mark.line + 1})")
            return super().construct_mapping(node, deep)
    return Loader


class ConfigFile(ActionConfigFile):
    """``--config FILE``: jsonargparse's, with the file named in every error (a binary file, bad YAML, a bad key)."""

    @staticmethod
    def apply_config(parser, cfg, dest, value) -> None:
        try:
            ActionConfigFile.apply_config(parser, cfg, dest, value)
        except (TypeError, ValueError, KeyError, yaml.YAMLError, argparse.ArgumentError) as err:
            raise ValueError(f"--config {bounded_repr(str(value))}: {error_line(err)}") from None


LOADER = _loader_class()


def load_yaml(text: str, path: str = "") -> Any:
    """A config file's or a flag's value; a ``ConfigError`` naming ``path`` (jsonargparse passes a file's)."""
    try:
        return yaml.load(text, Loader=LOADER)
    except yaml.YAMLError as err:
        raise ConfigError(f"{str(path)!r}: {error_line(err)}" if path else error_line(err)) from None


set_loader(PARSER_MODE, load_yaml, exceptions=(yaml.YAMLError,))


def error_line(err: BaseException, argv: list[str] | None = None) -> str:
    """The error's message on one line, each value in it already bounded (``bounded_repr``). A parsing error that
    names no file while ``argv`` gives ``--config`` files says where to look."""
    line = " ".join(str(err).split())[:2000]
    configs = config_files(argv or [])
    if isinstance(err, argparse.ArgumentError) and configs and not any(c in line for c in configs):
        line += f" (given by a flag or by --config {', '.join(map(repr, configs))})"
    return line


def config_files(argv: list[str]) -> list[str]:
    """The values of ``-c``/``--config`` in ``argv``."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def fail(prog: str, err: BaseException, argv: list[str] | None = None) -> NoReturn:
    """One line on stderr, exit code 2 (``KVE_TRACEBACK=1``: the traceback instead)."""
    if os.environ.get("KVE_TRACEBACK") == "1":
        raise err
    print(f"{prog}: error: {error_line(err, argv)}", file=sys.stderr)
    sys.exit(2)


@dataclass
class DataSource:
    """The images of a data module, as `kve fit` configured them (``--data.*``); ``None``: the checkpoint's own.

    Args:
        dataset: "digits", "mnist", "fashion_mnist", "cifar10" or "folder" (default: the checkpoint's, else digits).
        root: where a torchvision data set or an image folder lives (default: the checkpoint's, else "data").
        val_fraction: the fraction held out for validation (default: the checkpoint's, else 0.1).
        split_seed: the seed of the validation split (default: the checkpoint's, else 0).
    """

    dataset: DatasetName | None = None
    root: str | None = None
    val_fraction: float | None = None
    split_seed: int | None = None

    def data_module(self, model: Model, held_out: bool) -> ImageDataModule:
        """The data module of these settings over the checkpoint's, at the model's image size and channels. For
        ``held_out`` images, a split other than the checkpoint's is refused: its held-out images were trained on."""
        given = {k: v for k, v in vars(self).items() if v is not None}
        stored = {k: model.datamodule[k] for k in vars(self) if k in model.datamodule}
        other = split_conflicts(given, stored) if held_out else []
        if held_out and not model.datamodule:
            print(f"kve: warning: {model.source!r} records no data split (an export): the held-out images are "
                  f"those of --data.* ({given or 'the defaults'}), which may include images it was trained on",
                  file=sys.stderr)
        if other:
            raise ValueError(f"{', '.join(other)}: the held-out images of another split include images "
                             f"{model.source!r} was trained on; leave them out to take the checkpoint's")
        return ImageDataModule(**stored | given, image_size=model.image_size, channels=model.channels)


def sampler_section(config: dict[str, Any], accepted: set[str]) -> dict[str, Any]:
    """A config file as a command that samples reads it: a `kve fit` config (or `kve tune`'s output) keeps its
    ``model:`` sampler settings, its ``data:`` source (``DataSource``, where the command takes one) and
    ``ckpt_path``; ``kve predict``'s keys (``PREDICT_KEYS``) only ``kve sample`` takes from a `kve fit` config, whose
    other sections and training settings are dropped. Anything else stays, for the parser to refuse."""
    from kve_lightning.lit.module import KarrasVeModule

    training = set(inspect.signature(KarrasVeModule).parameters) - {f.name for f in fields(SamplerSettings)}
    sections = {"model": lambda k: k not in training, "data": lambda k: k in DataSource.__dataclass_fields__}
    for section in sections:
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ConfigError(f"{section}: must be a mapping of settings, got {bounded_repr(config[section])}")
    fit_config = any(k in config for k in FIT_SECTIONS - {"data"})
    fit_only = FIT_SECTIONS | (PREDICT_KEYS if fit_config and not PREDICT_KEYS <= accepted else frozenset())
    config = {k: v for k, v in config.items() if k in sections and k in accepted or k not in fit_only}
    for section, keep in sections.items():
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if keep(k)}
    if isinstance(config.get("model"), dict) and config["model"].get("sigma_max") == "auto":
        del config["model"]["sigma_max"]  # auto: the model's own, as with `kve fit --ckpt_path`
    return config


def command_parser(name: str) -> tuple[ArgumentParser, Callable[..., None]]:
    """The parser of ``kve NAME`` and its ``run``: ``--config``, ``--print_config``, one option per parameter of
    ``run`` (its help from the ``Args:`` entry), and, if ``run`` takes ``model``, one ``--model.FIELD`` per
    ``SamplerSettings`` field, defaulting to the model's own setting."""
    command = import_module(f"kve_lightning.cli.{name}")
    accepted = set(inspect.signature(command.run).parameters)
    samples = "model" in accepted
    set_loader(f"{PARSER_MODE}-{name}", lambda text, path="": _filtered(load_yaml(text, path), samples, accepted),
               exceptions=(yaml.YAMLError,))
    parser = ArgumentParser(prog=f"kve {name}", description=command.DOC, parser_mode=f"{PARSER_MODE}-{name}",
                            formatter_class=argparse.RawDescriptionHelpFormatter, exit_on_error=False)
    parser.add_argument("-c", "--config", action=ConfigFile,
                        help="a YAML file of these options" + (
                            "; a `kve fit` config or `kve tune`'s output gives its model: sampler settings"
                            if samples else ""))
    parser.add_function_arguments(command.run, skip={"model"}, as_group=False)
    if samples:
        parser.add_class_arguments(SamplerSettings, "model", instantiate=False, sub_configs=False)
        parser.set_defaults({f"model.{f.name}": None for f in fields(SamplerSettings)})
    return parser, command.run


def _filtered(value: Any, samples: bool, accepted: set[str]) -> Any:
    return sampler_section(value, accepted) if samples and isinstance(value, dict) else value


def run_command(name: str, argv: list[str]) -> None:
    """``kve NAME ARGV``: parse, then ``run``; bad input ends in one line and exit code 2."""
    prog = f"kve {name}"
    try:
        parser, run = command_parser(name)
        config = parser.parse_args(argv).as_dict()
    except (argparse.ArgumentError, ValueError, OSError, yaml.YAMLError) as err:
        fail(prog, err, argv)
    config.pop("config", None)
    if "model" in config:
        config["model"] = {k: v for k, v in (config["model"] or {}).items() if v is not None}
    for key, parameter in inspect.signature(run).parameters.items():  # option groups of a dataclass: DataSource
        if is_dataclass(parameter.default):
            config[key] = type(parameter.default)(**config[key])
    try:
        run(**config)
    except (ValueError, OSError) as err:
        fail(prog, err)
    except KeyboardInterrupt:  # what is written is written atomically: nothing half-written stays
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------ trained models


@dataclass
class Model:
    """A trained model as the commands use it: ``sample(seeds, settings, labels)`` -> images [B, C, H, W] in [0, 1]
    (the same from a checkpoint and its export; ``labels``: one class per seed, or ``None``), its stored sampler
    settings, its denoiser (frozen, EMA weights), the noise range it was trained on, where it came from, and the
    guide of autoguidance (``guide_ckpt_path``), if any."""

    sample: Callable[[list[int], SamplerSettings, list[int] | None], torch.Tensor]
    settings: SamplerSettings
    denoiser: VEDenoiser
    trained: tuple[float, float]
    source: str
    datamodule: dict[str, Any]
    guide: VEDenoiser | None = None

    def manifest(self, settings: SamplerSettings, labels: dict[int, int] | None = None) -> dict[str, Any]:
        """The sample folder manifest of these weights, ``settings`` and seed -> label ``labels``
        (``sample_manifest``)."""
        from kve_lightning.storage import sample_manifest

        return sample_manifest(self.denoiser, settings, labels, self.guide)

    def settings_with(self, overrides: dict[str, Any]) -> SamplerSettings:
        """The stored settings with ``overrides``, refused outside the trained noise range."""
        settings = self.settings.replace(**overrides)
        settings.check_trained_range(*self.trained)
        return settings

    @property
    def image_size(self) -> int:
        return int(self.denoiser.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.denoiser.unet.config.in_channels)


def load_model(ckpt_path: str | None, pipeline: str | None, device: torch.device,
               guide_ckpt_path: str | None = None) -> Model:
    """The model of exactly one of ``ckpt_path`` (a `kve fit` checkpoint, read weights-only) and ``pipeline`` (a
    folder written by `kve export`: safetensors and JSON), on ``device``, with the guide ``guide_ckpt_path`` (a
    checkpoint) if given."""
    from kve_lightning.interop.checkpoint import read_checkpoint
    from kve_lightning.lit.module import KarrasVeModule
    from kve_lightning.storage import to_unit

    if (ckpt_path is None) == (pipeline is None):
        raise ValueError("give exactly one of --ckpt_path (a checkpoint of `kve fit`) and --pipeline (a folder of "
                         "`kve export`)")
    if "://" in str(ckpt_path or pipeline):
        raise ValueError(f"{bounded_repr(str(ckpt_path or pipeline))}: kve reads local files only (a checkpoint is a "
                         f"pickle: download it, check its origin, then pass its path)")
    if "://" in str(guide_ckpt_path):
        raise ValueError(f"--guide_ckpt_path {bounded_repr(str(guide_ckpt_path))}: kve reads local files only")
    if ckpt_path is not None:
        guide = {} if guide_ckpt_path is None else {"guide_ckpt_path": guide_ckpt_path}
        module = KarrasVeModule.from_checkpoint(ckpt_path, **guide).to(device)
        datamodule = dict(read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {})
        # every field: to_dict leaves out the guidance settings at w = 1, and the module's own would then apply
        return Model(lambda seeds, s, labels=None: to_unit(module.sample(seeds, labels=labels, **asdict(s))),
                     module.sampler, module.denoiser.requires_grad_(False), module.train_sigmas, str(ckpt_path),
                     datamodule, module.guide)
    pipe = load_pipeline(pipeline, device)
    denoiser = pipe.scheduler.denoiser(pipe.unet).requires_grad_(False)
    guide = None
    if guide_ckpt_path is not None:
        from kve_lightning.guidance import check_guide

        guide = KarrasVeModule.from_checkpoint(guide_ckpt_path).denoiser.requires_grad_(False).to(device)
        check_guide(denoiser, guide, str(guide_ckpt_path))
    return Model(lambda seeds, s, labels=None: pipe(seeds=seeds, output_type="pt", class_labels=labels, guide=guide,
                                                    **asdict(s)).images,
                 pipe.scheduler.settings, denoiser, pipe.scheduler.trained, str(pipeline), {}, guide)


def load_pipeline(folder: str | Path, device: torch.device):
    """The pipeline an exported folder holds, read from safetensors and JSON only (``use_safetensors=True``)."""
    from kve_lightning.interop.pipeline import KarrasVeLightningPipeline

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"--pipeline {str(path)!r} " + (
            "is a file, not a folder written by `kve export`" if path.exists() else "does not exist"))
    try:
        pipe = KarrasVeLightningPipeline.from_pretrained(path, use_safetensors=True)
    except Exception as err:  # missing parts, corrupt JSON or safetensors, another pipeline's folder
        raise ValueError(f"cannot load --pipeline {str(path)!r}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def parse_device(name: str | None) -> torch.device:
    """A torch device that exists here (``None``: cuda if available, else cpu); a ``ValueError`` naming it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {bounded_repr(name)} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    missing_cuda = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    if not available.get(device.type, True) or missing_cuda:
        raise ValueError(f"--device {bounded_repr(name)} is not available on this machine")
    return device


def writable_file(path: str | Path, flag: str, overwrite: bool) -> Path:
    """``path``, the value of ``flag``, if a file can be written there: not a folder, in an existing folder, and not
    an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a directory, not a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {flag} {str(path)!r} does not exist")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{flag} {str(path)!r} exists (pass --overwrite true to replace it)")
    return path


def check_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """A ``ValueError`` naming both if an output (flag -> path) is one of the inputs (a checkpoint, an export, a
    folder of snapshots or images) or lies inside an input folder, or if two outputs are the same path: no
    command writes over what it reads, or over its own other output."""
    outs = {flag: Path(p).resolve() for flag, p in outputs.items() if p is not None}
    ins = {flag: Path(p).resolve() for flag, p in inputs.items() if p is not None}
    for out_flag, out in outs.items():
        for in_flag, given in ins.items():
            if out == given or given.is_dir() and given in out.parents:
                where = "is" if out == given else "lies inside"
                raise ValueError(f"{out_flag} {str(outputs[out_flag])!r} {where} {in_flag} {str(inputs[in_flag])!r}, "
                                 f"which this command reads: choose another {out_flag}")
    seen: dict[Path, str] = {}
    for flag, out in outs.items():
        if out in seen:
            raise ValueError(f"{seen[out]} and {flag} are both {str(outputs[flag])!r}: give them different paths")
        seen[out] = flag


def at_least(flag: str, value: int | float, low: int | float) -> None:
    """A ``ValueError`` naming ``flag`` unless ``value`` >= ``low``."""
    if not value >= low:
        raise ValueError(f"{flag} must be >= {low}, got {bounded_repr(value)}")
