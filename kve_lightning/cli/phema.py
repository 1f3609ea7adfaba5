"""``kve phema``: the EMA of any relative std, reconstructed from a run's post-hoc EMA snapshots."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning
import numpy as np
import torch
from safetensors import safe_open

from kve_lightning.cli.common import check_outputs, writable_file
from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.interop.export import check_output_dir, export_module
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.phema import STD_MAX, Snapshot, combine, list_snapshots, reconstruction, std_to_gamma
from kve_lightning.sampling import bounded_repr
from kve_lightning.storage import remove_stale_temporaries, save_atomic

DOC = """Post-hoc EMA: the EMA of any relative std, reconstructed from a run's power-function EMA snapshots.

    kve phema --snapshots runs/digits --list true
    kve phema --snapshots runs/digits --ckpt_path runs/digits/checkpoints/last.ckpt --std 0.07 --out digits-0.07.ckpt
    kve phema --snapshots runs/digits --ckpt_path runs/digits/checkpoints/last.ckpt --std 0.04,0.12 --export out/d-{std}

The snapshots come from training with `--model.phema_stds [0.05,0.1]` (kve_lightning.lit.ema.PostHocEMA). The EMA
of each --std at the newest snapshot's step is the combination of all snapshots whose profile best matches its
power-function profile in least squares (Karras et al. 2024, App. C.3). Its profile error e, half the L1 distance
between the combined and the exact weights of the training steps, bounds the result: every weight lies within e
times its range over training of the exact EMA. A std with e above --max_error is refused (--list shows the stds
that pass). --ckpt_path gives the model (hyper-parameters, architecture, buffers) the weights go into. --out writes a
checkpoint for `kve predict`, `kve sample` and `kve export` (--ckpt_path); --export a folder as `kve export`
writes one. With several stds, --out and --export must contain {std}.
"""



def run(snapshots: str, ckpt_path: str | None = None, std: str | None = None, out: str | None = None,
        export: str | None = None, list: bool = False, overwrite: bool = False, max_error: float = 0.05) -> None:
    """Reconstruct the EMA of each ``std`` into ``out`` and/or ``export``, or ``list`` the snapshots.

    Args:
        snapshots: a folder of snapshots, or a run folder holding phema/.
        ckpt_path: the run's checkpoint (e.g. its last.ckpt) whose model the weights go into.
        std: the relative std(s) to reconstruct, e.g. "0.07" or "0.04,0.07,0.12".
        out: the checkpoint to write ({std} is replaced by the std).
        export: the diffusers folder to write, as `kve export` does ({std} is replaced).
        list: list the snapshots and the stds they can reconstruct.
        overwrite: replace an existing ``out`` file or earlier ``export``.
        max_error: the largest profile error accepted (see above).
    """
    if not 0 < max_error <= 1:
        raise ValueError(f"--max_error must be a number in (0, 1], got {bounded_repr(max_error)}")
    if list and any(v is not None for v in (std, out, export, ckpt_path)):
        raise ValueError("--list true only lists the snapshots: leave out --std, --out, --export and --ckpt_path")
    folder = Path(snapshots)
    folder = folder / "phema" if (folder / "phema").is_dir() else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"--snapshots {snapshots!r} is not a folder")
    found = list_snapshots(folder)
    if not found:
        raise FileNotFoundError(f"{str(folder)!r} holds no post-hoc EMA snapshots (phema-*.safetensors): train "
                                f"with --model.phema_stds to write them")
    if list:
        reconstructible = [s for s in np.arange(1, 61) / 200 if s < STD_MAX
                           and reconstruction(found, s)[1] <= max_error]
        for s in found:
            print(f"step {s.step:>9}  std {s.std:.4f}  gamma {std_to_gamma(s.std):8.3f}  {s.path.name}")
        print(f"reconstructible at step {found[-1].step} with profile error <= {max_error:g}: " + (
            f"std {min(reconstructible):g} to {max(reconstructible):g}" if reconstructible else "none"))
        return
    if std is None or ckpt_path is None or not (out or export):
        raise ValueError("give --std, --ckpt_path and --out and/or --export (or --list true)")
    stds = [*dict.fromkeys(parse_stds(std))]
    plans = [reconstruction(found, s) for s in stds]
    for s, (_, error, step) in zip(stds, plans):
        if error > max_error:
            raise ValueError(f"--std {s:g}: its profile error at step {step} is {error:.3f} > --max_error "
                             f"{max_error:g}: these snapshots cannot reconstruct it (see --list true; snapshot "
                             f"more often)")
    module = KarrasVeModule.from_checkpoint(ckpt_path)
    for snapshot in found:
        check_snapshot_tensors(snapshot, module, ckpt_path)
    check_same_run(found, ckpt_path)
    outputs = [(phema_path(out, s, len(stds)), phema_path(export, s, len(stds))) for s in stds]
    # the run's own files are never an output: its snapshots, checkpoints and logs
    run_folder = folder.parent
    check_outputs({f"{flag} (std {s!r})": path for s, paths in zip(stds, outputs)
                   for flag, path in zip(("--out", "--export"), paths)},
                  {"--ckpt_path": ckpt_path, "--snapshots": folder, "the run's checkpoints": run_folder / "checkpoints",
                   "the run's logs": run_folder / "lightning_logs"})
    for file, folder_out in outputs:
        if file:
            writable_file(file, "--out", overwrite)
            remove_stale_temporaries(file)
        if folder_out:
            check_output_dir(folder_out, overwrite, ckpt_path)
    for s, (x, error, step), weights, (file, folder_out) in zip(stds, plans, combine(found, [p[0] for p in plans]),
                                                               outputs):
        module.load_state_dict(weights, strict=False)
        info = {"std": s, "step": step, "profile_error": error, "coefficients": x.tolist(),
                "snapshots": [f.path.name for f in found]}
        if file:
            checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                          "pytorch-lightning_version": lightning.__version__, "phema": info}
            save_atomic(file, lambda f: torch.save(checkpoint, f))
        if folder_out:
            export_module(module, folder_out, ckpt_path, overwrite=overwrite)
        print(f"std {s:g} at step {step} from {len(found)} snapshots, profile error {error:.4f}: "
              f"{', '.join(str(o) for o in (file, folder_out) if o)}", file=sys.stderr)


def parse_stds(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--std {text!r} is not a number or a comma list of numbers") from None


def phema_path(template: str | None, std: float, count: int) -> Path | None:
    """``template`` with {std} replaced; a ``ValueError`` when several stds would share one path."""
    if template is None:
        return None
    if count > 1 and "{std}" not in template:
        raise ValueError(f"{template!r}: with several --std values the output must contain {{std}}")
    return Path(template.replace("{std}", f"{std:g}"))


def check_same_run(snapshots: list[Snapshot], ckpt: str) -> None:
    """A ``ValueError`` unless the snapshots were written by the run of checkpoint ``ckpt`` (its ``PostHocEMA``
    state names the run; older snapshots and checkpoints without one are taken as they are)."""
    states = read_checkpoint(ckpt).get("callbacks", {}).values()
    runs = {s["run"] for s in states if isinstance(s, dict) and "averages" in s and s.get("run")}
    theirs = {s.run for s in snapshots if s.run}
    if theirs and not runs:
        raise ValueError(f"checkpoint {ckpt!r} tracked no post-hoc EMA, so it is not the run of these snapshots (run "
                         f"{sorted(theirs)}): give the checkpoint of the run that wrote them")
    if theirs and not theirs <= runs:
        raise ValueError(f"the snapshots are of run {sorted(theirs)}, checkpoint {ckpt!r} of run {sorted(runs)}: give "
                         f"the checkpoint of the run that wrote them")


def check_snapshot_tensors(snapshot: Snapshot, module: KarrasVeModule, ckpt: str) -> None:
    """The snapshot holds exactly the module's parameters, of the same shapes; a ``ValueError`` naming the first
    that differs otherwise."""
    with safe_open(snapshot.path, framework="pt") as f:
        theirs = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    ours = {name: tuple(p.shape) for name, p in module.named_parameters()}
    diff = [f"{n}: {theirs.get(n, 'missing')} in the snapshots, {ours.get(n, 'missing')} in the checkpoint"
            for n in sorted(theirs.keys() | ours.keys()) if theirs.get(n) != ours.get(n)]
    if diff:
        raise ValueError(f"the snapshots do not fit checkpoint {ckpt!r} ({len(diff)} tensors differ; {diff[0]}): "
                         f"give the checkpoint of the run that wrote them")
