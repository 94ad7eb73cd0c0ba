"""The ``lightning-eos`` command: LightningCLI, and ``report`` (:mod:`lightning_eos.report`).

``fit``, ``validate`` and ``test`` run any LightningModule and DataModule from a config.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` default to ``sys.argv``."""
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    """Run ``lightning-eos fit|validate|test --config CONFIG`` or ``lightning-eos report RUNS``.

    Models and data modules are chosen in the config with ``class_path``; see
    ``configs/quickstart.yaml``. ``report`` draws the curves of logged runs; see
    ``lightning-eos report --help``.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["report"]:
        from lightning_eos.report import main as report_main

        sys.exit(report_main(args[1:]))
    build_cli(argv)  # None: LightningCLI reads sys.argv itself (and does not warn)


if __name__ == "__main__":
    main()
