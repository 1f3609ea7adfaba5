"""Training throughput of KarrasVeModule under Lightning vs a plain PyTorch loop doing the same work, and of the
precision / memory-format / compile options.

    python scripts/benchmark_train.py --steps 300 --repeats 2
    python scripts/benchmark_train.py --variants fp32,bf16,bf16+cl,bf16+cl+compile --config configs/cifar10.yaml \
        --batch-size 128 --steps 60 --warmup 20

Both sides: the digits config's UNet, batch and data, the same DSM loss, AdamW with the warm-up schedule and the
EMA update after every step. Lightning also logs train/loss to TensorBoard, as `kve fit` does. Each measurement
runs in its own process (peak RSS is per process); modes alternate to spread machine noise. Prints a markdown
table with img/s, the ratio Lightning / plain, and peak memory; ``--json PATH`` also writes the measurements and the
table there, rewritten after every run (a killed benchmark keeps what it measured). A run that fails is recorded and
the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from kve_lightning.storage import save_atomic

REPO = Path(__file__).resolve().parents[1]


VARIANTS = {  # name -> (Trainer precision, model options)
    "fp32": ("32-true", {}),
    "bf16": ("bf16-mixed", {}),
    "bf16+cl": ("bf16-mixed", {"channels_last": True}),
    "bf16+cl+compile": ("bf16-mixed", {"channels_last": True, "compile": True}),
}


def build(config: Path, batch_size: int | None = None, **model_options):
    """The config's module and data; the data is the offline digits, resized to the config's size and channels."""
    from kve_lightning import ImageDataModule, KarrasVeModule

    cfg = yaml.safe_load(config.read_text())
    data_cfg = cfg.get("data", {}) | ({"batch_size": batch_size} if batch_size else {})
    data_cfg |= {"dataset": "digits", "num_workers": 0}  # offline: digits resized to the config's image size
    data = ImageDataModule(**data_cfg)
    model_cfg = cfg.get("model", {}) | dict(image_size=data.hparams.image_size, channels=data.hparams.channels)
    if model_cfg.get("sigma_max") == "auto":  # what the kve CLI resolves: the training split's largest distance
        model_cfg["sigma_max"] = data.max_pairwise_distance()
    return KarrasVeModule(**(model_cfg | model_options)), data  # no sample grid: a callback of `kve fit`


def run_plain(config: Path, steps: int, warmup: int, batch_size: int | None, variant: str) -> float:
    from torch.optim.swa_utils import AveragedModel

    from kve_lightning.lit.ema import ema_update

    module, data = build(config, batch_size)
    hp = module.hparams
    data.setup("fit")
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    ema = AveragedModel(module, multi_avg_fn=partial(ema_update, decay=hp.ema_decay, warmup=hp.ema_warmup),
                        use_buffers=True)
    module.train()
    step, start = 0, None
    while step < steps:
        for y, _ in data.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            loss = module.training_loss(y)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(module)
            step += 1
            if step == steps:
                break
    return (steps - warmup) * data.hparams.batch_size / (time.perf_counter() - start)


def run_lightning(config: Path, steps: int, warmup: int, batch_size: int | None, variant: str) -> float:
    import lightning as L

    precision, options = VARIANTS[variant]
    module, data = build(config, batch_size, **options)
    times = {}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                times["start"] = time.perf_counter()

        def on_train_end(self, trainer, *args):
            times["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, precision=precision, num_sanity_val_steps=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                            default_root_dir=tmp, callbacks=[Clock()])
        trainer.fit(module, data)
    return (steps - warmup) * data.hparams.batch_size / (times["end"] - times["start"])


def child(args) -> None:
    torch.manual_seed(0)
    fn = run_plain if args.mode == "plain" else run_lightning
    img_s = fn(Path(args.config), args.steps, args.warmup, args.batch_size, args.variant)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"mode": args.mode, "img_per_s": img_s, "peak_rss_mb": peak_mb}))


def table(summary: dict) -> str:
    """The markdown table of a summary: each run's best img/s, its ratio to the first run's, its peak memory."""
    runs, base = summary["runs"], next(iter(summary["runs"]))
    best = {m: max(x["img_per_s"] for x in v) for m, v in runs.items() if v}
    lines = [f"| run | img/s (best of {summary['repeats']}) | ratio to {base} | {summary['memory']} |",
             "|---|---|---|---|"]
    for m, v in runs.items():
        if not v:
            lines.append(f"| {m} | {'failed' if m in summary['failed'] else 'not run'} | | |")
            continue
        ratio = f"{best[m] / best[base]:.3f}" if base in best else "n/a"
        lines.append(f"| {m} | {best[m]:.1f} | {ratio} | {max(x['peak_rss_mb'] for x in v):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="overrides the config's data.batch_size")
    p.add_argument("--variants", help="compare Lightning runs with these options instead of Lightning vs plain: "
                                      f"a comma list of {', '.join(VARIANTS)} (the first is the baseline)")
    p.add_argument("--json", type=Path, help="also write the measurements and the table to this JSON file")
    p.add_argument("--mode", choices=["plain", "lightning"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)
    runs = [(v, "lightning", v) for v in args.variants.split(",")] if args.variants else [
        ("plain", "plain", "fp32"), ("lightning", "lightning", "fp32")]
    cuda = torch.cuda.is_available()
    summary = {
        "config": args.config, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "batch_size": args.batch_size or yaml.safe_load(Path(args.config).read_text())["data"]["batch_size"],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "memory": "peak GPU memory (MB)" if cuda else "peak RSS (MB)",
        "runs": {name: [] for name, _, _ in runs}, "failed": {},
    }
    for r in range(args.repeats):
        for name, mode, variant in runs:
            if name in summary["failed"]:
                continue
            cmd = [sys.executable, __file__, "--mode", mode, "--variant", variant, "--config", args.config,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                summary["failed"][name] = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
                print(f"repeat {r} {name}: failed ({proc.returncode})\n{proc.stderr[-4000:]}", file=sys.stderr)
            else:
                summary["runs"][name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"repeat {r} {name}: {summary['runs'][name][-1]['img_per_s']:.1f} img/s", file=sys.stderr)
            if args.json:
                summary["table"] = table(summary)
                save_atomic(args.json, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(table(summary))
    if summary["failed"]:
        sys.exit(1)

if __name__ == "__main__":
    main()
