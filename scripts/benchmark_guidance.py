"""Requested-class accuracy and per-class FID-digits of a conditional digits model against the guidance weight w.

    python scripts/benchmark_guidance.py --ckpt_path runs/digits_cond/checkpoints/last.ckpt --scales 1,1.5,2,3 \
        --per_class 100 [--guide_ckpt_path EARLY.ckpt] [--guidance_sigma_max 5] [--set s_noise=0.72 ...] \
        [--uncond_ckpt_path runs/digits/checkpoints/last.ckpt] --out-md guidance.md [--plot g.png --mark 2]

For every w of ``--scales`` it samples ``--per_class`` images of each class (seeds 0 .. per_class - 1 for every
class and every w: common random numbers), classifier-free guided (or autoguided with ``--guide_ckpt_path``) at the
checkpoint's sampler settings. A plain "W" guides on the checkpoint's guidance interval (or
``--guidance_sigma_*``'s), "W@LO:HI" for sigma in (LO, HI] ("W@0:inf": everywhere). The **requested-class accuracy**
is the fraction a classifier of the real digits assigns to the requested class: scikit-learn's logistic regression
on the 80 % training part of the fixed stratified split of ``metrics.digits_split`` (its accuracy on the other 20 %
is printed beside, the ceiling), fitted on pixels in [-1, 1]. **Per-class FID-digits** is FID-digits of a class's
samples against all of that class's 1,797-digit images (about 180): small counts, so compare rows with each other.
Beside it, as every FID-digits figure here, FD-pixels (``metrics.PixelFD``): per class, of a class's samples against
that class's digits (one set of at most half the class's size; both per-class figures are
``search.per_class_scores``, kve tune's judge), and pooled, FID-digits and FD-pixels (``metrics.Quality``) of all
the samples against all 1,797 digits, comparable with the unconditional tables of ``scripts/benchmark_quality.py``
at the same sample count. Every row's accuracy has its 95 % normal-approximation interval (binomial standard error),
and its mean per-class FID-digits and FD-pixels the paired 95 % percentile bootstrap intervals of their differences
to the first row (``--bootstrap`` resamples of the seeds within each class, the same for every row, the real images
fixed). No interval is given for a value alone: resampling with replacement repeats samples, which raises a Frechet
distance, so such an interval need not hold the value; in a paired difference the bias cancels. ``--set
FIELD=VALUE`` overrides the checkpoint's sampler settings (``SamplerSettings`` fields), as
``benchmark_quality.py``'s rows do. With ``--uncond_ckpt_path`` the table gets a reference row: an unconditional
model's samples (seeds 0 .. K * per_class - 1, the same settings), each assigned to the class the classifier gives
it, per-class FID-digits and FD-pixels against that class's digits. The table also gives the NFE per image
(``guidance.guided_nfe``: two network evaluations per step inside the guidance interval). Writes a markdown table
(``--out-md``, the rows as JSON beside it) and, with ``--plot``, accuracy, FID-digits and FD-pixels against w
(``--mark W``: the shipped w; ``--also LABEL=JSON``: other runs' rows beside, e.g. other guidance intervals).
``--from-json`` redraws the table and plot from an earlier run's rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kve_lightning.guidance import guided_nfe
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.metrics import Quality, digits_feature_net, digits_images, digits_split, digits_with_labels
from kve_lightning.sampling import SamplerSettings
from kve_lightning.search import PerClass, per_class_scores

BOOTSTRAP_SEED = 0


def digits_classifier():
    """Logistic regression of the real digits' pixels, and its held-out accuracy (``metrics.digits_split``)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = digits_split()
    classifier = LogisticRegression(max_iter=2000).fit(x_train.flatten(1).numpy(), y_train.numpy())
    return classifier, float(classifier.score(x_test.flatten(1).numpy(), y_test.numpy()))


def parse_settings(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` strings -> ``SamplerSettings`` overrides, typed by the field's default."""
    defaults = dataclasses.asdict(SamplerSettings())  # every field (to_dict leaves unused ones out)
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults:
            raise SystemExit(f"--set {pair!r}: {key!r} is not a SamplerSettings field")
        kind = type(defaults[key])
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return overrides


def parse_scale(text: str) -> tuple[float, dict]:
    """"W" (on the checkpoint's guidance interval, or ``--guidance_sigma_*``'s) or "W@LO:HI" (guidance for sigma
    in (LO, HI]; "inf" for no top)."""
    w, _, interval = text.partition("@")
    if not interval:
        return float(w), {}
    low, _, high = interval.partition(":")
    return float(w), {"guidance_sigma_min": float(low), "guidance_sigma_max": float(high)}


@torch.no_grad()
def class_scores(assigned: torch.Tensor, bootstrap: int) -> tuple[PerClass, PerClass]:
    """The per-class FID-digits and FD-pixels scores (``search.per_class_scores``) of samples of classes
    ``assigned`` against the digits of those classes."""
    real, real_labels = digits_with_labels()
    return per_class_scores(real, real_labels, digits_feature_net()(real).double(), assigned, bootstrap,
                            BOOTSTRAP_SEED)


@torch.no_grad()
def class_quality(samples: torch.Tensor, scores: tuple[PerClass, PerClass]) -> dict:
    """Per-class FID-digits and FD-pixels of ``samples`` (``scores``: ``class_scores`` of their classes), their
    means over the classes and the means' bootstrap resamples (``_resampled`` keys: kept out of the JSON)."""
    row = {}
    for key, score, inputs in (("fid", scores[0], digits_feature_net()(samples).double()),
                               ("fd_pixels", scores[1], samples)):
        each = score.each(inputs)
        row[f"{key}_per_class"] = {str(c): value for c, (value, _) in enumerate(each)}
        row[f"{key}_mean"], row[f"{key}_resampled"] = PerClass.mean(each)
    return row


Q95 = torch.tensor([0.025, 0.975], dtype=torch.float64)


def paired_to_first(rows: list[dict]) -> None:
    """Each row's mean per-class FID-digits and FD-pixels differences to the first row, with the 95 % intervals of
    the differences over the shared resamples; drops the resamples."""
    for row in rows:
        for key in ("fid", "fd_pixels"):
            diff = row[f"{key}_resampled"] - rows[0][f"{key}_resampled"]
            row[f"{key}_mean_diff"] = row[f"{key}_mean"] - rows[0][f"{key}_mean"]
            row[f"{key}_mean_diff_interval"] = torch.quantile(diff, Q95).tolist()
    for row in rows:
        for key in ("fid", "fd_pixels"):
            row.pop(f"{key}_resampled")


def requested_labels(classes: int, per_class: int) -> list[int]:
    """The class of each sample of a row: ``per_class`` of class 0, then of class 1, ..."""
    return [c for c in range(classes) for _ in range(per_class)]


def measure(module: KarrasVeModule, scale: float, per_class: int, classifier, batch_size: int, quality: Quality,
            scores: tuple[PerClass, PerClass], **settings) -> dict:
    """One row: the samples of every class at guidance weight ``scale``, their accuracy (and its interval),
    per-class FID-digits and FD-pixels (``class_quality`` with ``scores``, the same for every row), and the pooled
    FID-digits and FD-pixels."""
    classes = module.hparams.num_classes
    seeds = [s for _ in range(classes) for s in range(per_class)]
    labels = requested_labels(classes, per_class)
    batches = [module.sample(seeds[i:i + batch_size], labels=labels[i:i + batch_size], guidance_scale=scale,
                             **settings).clamp(-1, 1)
               for i in tqdm(range(0, len(seeds), batch_size), desc=f"w={scale:g}", unit="batch")]
    samples = torch.cat(batches)
    predicted = torch.from_numpy(classifier.predict(samples.flatten(1).numpy()))
    requested = torch.tensor(labels)
    # FD-pixels takes consecutive sets of rows: interleave the classes (seed 0 of classes 0..K-1, then seed 1, ...),
    # so that a set holds every class alike; in class order a set of 898 of 1,000 would leave the last class out
    fid_all, fd_all = quality(samples.unflatten(0, (classes, per_class)).transpose(0, 1).flatten(0, 1))
    accuracy = (predicted == requested).double().mean().item()
    half = 1.96 * (accuracy * (1 - accuracy) / len(samples)) ** 0.5
    run = module.sampler.replace(guidance_scale=scale, **settings)
    guided_for = f"({run.guidance_sigma_min:g}, {run.guidance_sigma_max:g}]" if scale != 1 else "–"
    return {"w": scale, "interval": guided_for,
            "accuracy": accuracy, "accuracy_interval": [accuracy - half, accuracy + half], "nfe": guided_nfe(run),
            **class_quality(samples, scores), "fid_pooled": fid_all, "fd_pixels_pooled": fd_all}


def unconditional_reference(ckpt: str, n: int, classes: int, classifier, batch_size: int, quality: Quality,
                            bootstrap: int, **settings) -> dict:
    """The reference row: an unconditional model's ``n`` samples, each assigned to the classifier's class."""
    module = KarrasVeModule.from_checkpoint(ckpt)
    seeds = list(range(n))
    samples = torch.cat([module.sample(seeds[i:i + batch_size], **settings).clamp(-1, 1)
                         for i in tqdm(range(0, n, batch_size), desc="unconditional", unit="batch")])
    assigned = torch.from_numpy(classifier.predict(samples.flatten(1).numpy()))
    row = class_quality(samples, class_scores(assigned, bootstrap))
    del row["fid_resampled"], row["fd_pixels_resampled"]  # other seeds than the rows': no paired difference
    fid_all, fd_all = quality(samples)
    return {"w": None, "ckpt": ckpt, "nfe": module.sampler.replace(**settings).nfe,
            "class_counts": {str(c): int((assigned == c).sum()) for c in range(classes)}, **row,
            "fid_pooled": fid_all, "fd_pixels_pooled": fd_all}


def table(rows: list[dict], reference: dict | None, header: str) -> str:
    """The markdown table of ``rows`` (and the unconditional ``reference`` row), with the intervals where the rows
    have them (rows of earlier runs have none)."""
    def interval(row: dict, key: str, digits: int) -> str:
        low_high = row.get(key)
        return f" [{low_high[0]:.{digits}f}, {low_high[1]:.{digits}f}]" if low_high else ""

    def diff(row: dict, key: str, digits: int) -> str:
        if f"{key}_mean_diff" not in row:
            return "–"
        low, high = row[f"{key}_mean_diff_interval"]
        return f"{row[f'{key}_mean_diff']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"

    lines = [header, "",
             "| w | guided for σ in | NFE | requested-class accuracy [95 %] | mean per-class FID-digits | "
             "diff to first row [95 %] | mean per-class FD-pixels | diff to first row [95 %] | "
             "worst class, FID-digits (FD-pixels) | pooled FID-digits (FD-pixels) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ([reference] if reference else []) + rows:
        worst = max(row["fid_per_class"], key=row["fid_per_class"].get)
        w = "unconditional" if row["w"] is None else f"{row['w']:g}"
        accuracy = "–" if row["w"] is None else f"{row['accuracy']:.3f}{interval(row, 'accuracy_interval', 3)}"
        lines.append(f"| {w} | {row.get('interval', '–')} | {row['nfe']} | {accuracy} | "
                     f"{row['fid_mean']:.2f} | {diff(row, 'fid', 2)} | {row['fd_pixels_mean']:.2f}x | "
                     f"{diff(row, 'fd_pixels', 3)} | "
                     f"{worst}: {row['fid_per_class'][worst]:.2f} ({row['fd_pixels_per_class'][worst]:.2f}x) | "
                     f"{row['fid_pooled']:.2f} ({row['fd_pixels_pooled']:.2f}x) |")
    return "\n".join(lines)


def plot(series: list[tuple[str, list[dict]]], reference: dict | None, path: str, mark: float | None,
         note: str = "") -> None:
    """Accuracy, FID-digits and FD-pixels against w, three panels, one colour per (label, rows) series (solid: mean
    per class; dashed: pooled); ``mark``: the shipped w; dotted: the unconditional ``reference``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for k, (label, rows) in enumerate(series):
        scales, color = [r["w"] for r in rows], f"C{k}"
        axes[0].plot(scales, [r["accuracy"] for r in rows], "o-", color=color, label=label)
        for ax, key in ((axes[1], "fid"), (axes[2], "fd_pixels")):
            ax.plot(scales, [r[f"{key}_mean"] for r in rows], "s-", color=color)
            ax.plot(scales, [r[f"{key}_pooled"] for r in rows], "^--", color=color)
    for ax, key, name in ((axes[1], "fid", "FID-digits"), (axes[2], "fd_pixels", "FD-pixels (x real)")):
        if reference:
            ax.axhline(reference[f"{key}_mean"], color="gray", ls=":")
            ax.axhline(reference[f"{key}_pooled"], color="gray", ls="-.")
        ax.set_ylabel(name)
    axes[0].set_ylabel("requested-class accuracy")
    axes[0].axhline(0.97, color="gray", lw=0.6, ls=":")
    axes[0].legend(fontsize=7)
    handles = [plt.Line2D([], [], color="k", marker="s", ls="-", label="mean per class"),
               plt.Line2D([], [], color="k", marker="^", ls="--", label="pooled, all 1,797 digits")]
    if reference:
        handles += [plt.Line2D([], [], color="gray", ls=":", label="unconditional, per class"),
                    plt.Line2D([], [], color="gray", ls="-.", label="unconditional, pooled")]
    axes[1].legend(handles=handles, fontsize=7)
    for ax in axes:
        ax.set_xlabel("guidance weight w")
        if mark is not None:
            ax.axvline(mark, color="k", lw=0.8, alpha=0.5)
            ax.annotate(f"shipped w = {mark:g}{note}", (mark, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        ha="left", va="top", xytext=(3, -3), textcoords="offset points")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", default=None, help="a conditional digits checkpoint (num_classes 10)")
    p.add_argument("--guide_ckpt_path", default=None, help="a weaker model that guides (autoguidance)")
    p.add_argument("--scales", default="1,1.5,2,3",
                   help='guidance weights w, comma-separated; "W@LO:HI": w W for sigma in (LO, HI] only')
    p.add_argument("--per_class", type=int, default=100, help="samples per class and w")
    p.add_argument("--guidance_sigma_min", type=float, default=None, help="the guidance interval's bottom")
    p.add_argument("--guidance_sigma_max", type=float, default=None, help="the guidance interval's top")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a SamplerSettings override for every row (repeatable)")
    p.add_argument("--uncond_ckpt_path", default=None, help="an unconditional model for the reference row")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the intervals")
    p.add_argument("--out-md", default=None, help="write the table here (and the rows as .json beside it)")
    p.add_argument("--plot", default=None, help="write accuracy, FID-digits and FD-pixels against w here (PNG)")
    p.add_argument("--mark", type=float, default=None, help="the shipped w, marked on the plot")
    p.add_argument("--mark-note", default="", help="text after the shipped w on the plot, e.g. its interval")
    p.add_argument("--from-json", default=None, help="redraw the table and plot from an earlier run's .json")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=JSON",
                   help="another run's rows (its .json) drawn beside on the plot (repeatable)")
    p.add_argument("--label", default="guidance everywhere", help="this run's series on the plot")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, reference, header = saved["rows"], saved["reference"], saved["header"]
    else:
        if args.ckpt_path is None:
            p.error("--ckpt_path is required (or --from-json)")
        guide = {} if args.guide_ckpt_path is None else {"guide_ckpt_path": args.guide_ckpt_path}
        module = KarrasVeModule.from_checkpoint(args.ckpt_path, **guide)
        if not module.hparams.num_classes:
            raise SystemExit(f"--ckpt_path {args.ckpt_path!r} is an unconditional model (num_classes 0)")
        settings = parse_settings(args.set)
        settings.update({k: v for k, v in (("guidance_sigma_min", args.guidance_sigma_min),
                                           ("guidance_sigma_max", args.guidance_sigma_max)) if v is not None})
        classifier, ceiling = digits_classifier()
        classes = module.hparams.num_classes
        quality = Quality(digits_images(8, 1), classes * args.per_class)
        scores = class_scores(torch.tensor(requested_labels(classes, args.per_class)), args.bootstrap)
        rows = [measure(module, w, args.per_class, classifier, args.batch_size, quality, scores,
                        **settings | interval) for w, interval in map(parse_scale, args.scales.split(","))]
        paired_to_first(rows)
        reference = None if args.uncond_ckpt_path is None else unconditional_reference(
            args.uncond_ckpt_path, classes * args.per_class, classes, classifier, args.batch_size, quality,
            args.bootstrap, **{k: v for k, v in settings.items() if not k.startswith("guidance_")})
        header = (f"classifier: logistic regression of the real digits, held-out accuracy {ceiling:.3f}; "
                  f"{args.per_class} samples per class (seeds 0-{args.per_class - 1} in every class and row); "
                  f"{'autoguidance' if guide else 'classifier-free guidance'}; settings: the checkpoint's"
                  f"{f' with {settings}' if settings else ''}. FD-pixels per class: a class's samples against "
                  f"its digits; pooled: all samples against all 1,797 digits (FID-digits and FD-pixels, "
                  f"metrics.Quality).")
    text = table(rows, reference, header)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n")
        Path(args.out_md).with_suffix(".json").write_text(
            json.dumps(dict(header=header, reference=reference, rows=rows), indent=2) + "\n")
    if args.plot:
        also = [(spec.rpartition("=")[0], json.loads(Path(spec.rpartition("=")[2]).read_text())["rows"])
                for spec in args.also]
        plot([(args.label, rows)] + also, reference, args.plot, args.mark, args.mark_note)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
