"""Loggers that never block on the network."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_api_key_available() -> bool:
    """Whether a W&B API key is configured (``WANDB_API_KEY`` or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when no API key is set.

    Offline runs are written under ``save_dir/wandb`` and uploaded later with
    ``wandb sync``. ``WANDB_MODE=offline`` or ``disabled`` in the environment is honoured.

    Args:
        name: run name.
        save_dir: folder of the local run files.
        project: W&B project.
        offline: ``None`` (default) decides from the API key; ``True``/``False`` force it.
        log_model: passed to Lightning's logger.
        **kwargs: passed to Lightning's logger and ``wandb.init``.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str | None = "lightning-eos",
        offline: bool | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            offline = mode in ("offline", "dryrun") or (
                mode != "online" and not wandb_api_key_available()
            )
        self.offline_mode = offline
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=offline,
            log_model=log_model,
            **kwargs,
        )
