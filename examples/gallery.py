"""Run the CPU configs and put their reports in the README gallery (``docs/gallery/``).

Each config runs with ``lightning-eos fit --config configs/NAME.yaml`` exactly as committed
(its CSVLogger writes ``outputs/NAME/csv/version_*/metrics.csv``); ``lightning-eos report``
then draws ``docs/gallery/NAME.png`` from that CSV, small (72 dpi, palette PNG), and the
README block between ``<!-- gallery:start -->`` and ``<!-- gallery:end -->`` is rewritten
with every image found, its caption (the config's header) and the measured ratio to the
threshold.

    python examples/gallery.py                      # run what has no CSV yet, then draw
    python examples/gallery.py --only quickstart    # one config
    python examples/gallery.py --rerun              # run every config again
    python examples/gallery.py --draw-only          # redraw from the existing CSVs

Configs run cheapest first (their measured runtimes on 2 cores are in the README); a long
one can be left for later with ``--skip``. ``--threads 1`` leaves a core for other work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_eos.report import read_runs, summarize, write_report

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "docs" / "gallery"
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"

#: the CPU configs, cheapest first (minutes on 2 cores, measured or estimated)
CONFIGS = (
    "001_fig3_phb_scalar_relu",
    "quickstart",
    "adam_aeos",
    "ias_digits",
    "003_fig3_sam_mlp_mnist_cpu",
    "002_fig3_frozenadam_fcn_cifar10_cpu",
    "002_fig1_adam_fcn_cifar10_cpu",
    "ias_digits_sgd",
    "002_fig7_preln_wmt_cpu",
    "002_fig7_postln_wmt_cpu",
    "001_fig9_phb_fcn_rank2",
    "002_fig4_adam_cnn_cifar10_cpu",
    "002_fig13_hb_fcn_cifar10_cpu",
    "003_fig8_sam_cnn_cifar1k_cpu",
    "001_fig13_phb_fcn_cifar2cls2k_cpu",
    "001_fig2_phb_fcn_cifar1k_cpu",
    "003_fig13_sam_transformer_shakespeare_cpu",
    "001_fig1_phb_ldn_sparse",
    "004_fig4_ias_6cnn_cifar8k_cpu",
    "sam_digits",
    "002_fig5_adaptive_fcn_cifar10_cpu",
    "001_fig10_phb_resnet20_cifar5k_cpu",
    "002_fig4_adam_wrn_cifar100_cpu",
    "004_fig1_ias_6cnn_cifar8k_cpu",
    "004_fig10_ias_resnet9_cifar8k_cpu",
    "004_fig29_ias_wrn282_cifar8k_cpu",
    "002_fig4_adam_wrn_nobn_cifar10_cpu",
    "002_fig6_adam_resnet50_imagenet_cpu",
)


def caption(name: str) -> str:
    """The config's header comment (what it runs and what the paper found), as one line."""
    lines = []
    for line in (ROOT / "configs" / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.startswith("#   "):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def csv_dir(name: str) -> Path:
    return ROOT / "outputs" / name


def run_config(name: str, threads: int | None) -> float:
    """``lightning-eos fit --config configs/NAME.yaml``; returns the wall-clock minutes."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    log = csv_dir(name) / "fit.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "lightning_eos.cli", "fit", "--config", f"configs/{name}.yaml"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    minutes = (time.time() - start) / 60
    (csv_dir(name) / "fit_minutes.txt").write_text(f"{minutes:.1f}\n")
    return minutes


def draw(name: str) -> Path:
    """``docs/gallery/NAME.png`` from the run's newest CSV, as a small palette PNG."""
    from PIL import Image

    runs = read_runs([csv_dir(name)])
    path = write_report(runs[:1], GALLERY / f"{name}.png", title=name, dpi=72)
    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    return path


def outcome(name: str) -> str:
    """The measured ratio to the threshold over the last half, and the run time."""
    run = read_runs([csv_dir(name)])[0]  # a resumed run stitched from its versions
    summary = summarize(run)
    parts = [
        f"{key.split(' range')[0]} {value[0]:.2f}–{value[1]:.2f} over the last half"
        for key, value in summary.items()
        if " range " in key and value
    ]
    parts += [f"{summary[k]} {k}" for k in ("catapults", "switches") if summary[k]]
    minutes = csv_dir(name) / "fit_minutes.txt"
    if minutes.is_file():
        parts.append(f"{minutes.read_text().strip()} min")
    return "; ".join(parts)


def write_readme_block(names: list[str]) -> None:
    """Rewrite the README gallery block with the images of ``names``."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block.")
    rows = [
        f"**`configs/{name}.yaml`**: {caption(name)} *Measured: {outcome(name)}.*\n\n"
        f"![{name}](docs/gallery/{name}.png)\n"
        for name in names
    ]
    missing = [n for n in CONFIGS if n not in names]
    if missing:
        rows.append(
            "Not in the gallery yet (not run to the end here): "
            + ", ".join(f"`{n}`" for n in missing)
            + ".\n"
        )
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n\n" + "\n".join(rows) + f"\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="these configs only")
    parser.add_argument("--skip", nargs="+", default=[], help="leave these configs out")
    parser.add_argument("--rerun", action="store_true", help="run configs that have a CSV too")
    parser.add_argument("--draw-only", action="store_true", help="run nothing, only draw")
    parser.add_argument("--threads", type=int, help="torch threads per run")
    args = parser.parse_args()
    names = [n for n in (args.only or CONFIGS) if n not in args.skip]
    for name in names:
        has_csv = csv_dir(name).is_dir() and any(csv_dir(name).rglob("metrics.csv"))
        if not args.draw_only and (args.rerun or not has_csv):
            print(f"{name}: running ...", flush=True)
            try:
                print(f"{name}: {run_config(name, args.threads):.1f} min", flush=True)
            except subprocess.CalledProcessError:
                print(f"{name}: FAILED, see {csv_dir(name) / 'fit.log'}", flush=True)
                continue
        if csv_dir(name).is_dir() and any(csv_dir(name).rglob("metrics.csv")):
            try:
                print(f"{name}: {draw(name)}", flush=True)
            except (OSError, ValueError) as err:
                print(f"{name}: no report: {err}", flush=True)
    drawn = [n for n in CONFIGS if (GALLERY / f"{n}.png").is_file()]
    write_readme_block(drawn)
    print(f"README gallery: {len(drawn)} of {len(CONFIGS)} configs.")


if __name__ == "__main__":
    main()
