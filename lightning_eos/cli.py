"""The ``lightning-eos`` command: LightningCLI over any LightningModule and DataModule."""

from __future__ import annotations

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


def main() -> None:
    """Run ``lightning-eos fit|validate|test --config CONFIG``.

    Models and data modules are chosen in the config with ``class_path``; see
    ``configs/quickstart.yaml``.
    """
    build_cli()


if __name__ == "__main__":
    main()
