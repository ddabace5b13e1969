"""Pre-flight at a deployed site: its data file, its model directory, its base model.

On the first train or evaluate message of a run a site checks what only it can
check, before it trains: the ``data-path`` file (exists, parses, has the columns
and labels the run needs; the launcher's own checks, ``fedlora.data.preflight``),
the ``model-path`` directory, and that its base model is the server's
(fingerprint). A failure raises :class:`SiteCheckError`, whose text names the site
and the problem; Flower returns it to the server as the reply's error, and the
server logs it and lists it under ``dropped`` in ``metrics.jsonl`` while the round
goes on with the other sites.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedlora.client.site import SiteConfig
from fedlora.config import ClientConfig

DONE = "fedlora-site-checked"  # context.state record: checked in this run


class SiteCheckError(RuntimeError):
    """A site cannot take part in the run; the text says why and what to fix."""


def site_label(site: SiteConfig, context: Context) -> str:
    """``site-name`` from the node-config, else Flower's node id."""
    return site.name or f"node {context.node_id}"


def check_site(
    cfg: ClientConfig, site: SiteConfig, context: Context, base_fingerprint: str
) -> None:
    """Check the files once per run (marked in ``context.state``), the model always.

    The fingerprint comparison is cheap after the first (cached per model object),
    so every message makes it.

    Raises
    ------
    SiteCheckError
        ``site <name>: <what is wrong>``.
    """
    from fedlora.client.round import check_base_model
    from fedlora.config.flat import ConfigError
    from fedlora.data.preflight import check_data_file

    label = site_label(site, context)
    first = DONE not in context.state.config_records
    try:
        if first and site.data_path:
            check_data_file("node-config data-path", site.data_path, cfg.data)
        if first and site.model_path:
            check_model_dir(site.model_path)
        check_base_model(cfg, site, base_fingerprint)
    except (ConfigError, ValueError, OSError) as err:
        raise SiteCheckError(f"site {label}: {err}") from err
    context.state[DONE] = ConfigRecord({"run": context.run_id})


def check_model_dir(path: str) -> None:
    """Require a directory with a ``config.json`` (what ``from_pretrained`` reads)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"node-config model-path={path}: not a directory; give the local "
            "directory of the base model (with config.json and the weights)"
        )
    if not (directory / "config.json").is_file():
        present = sorted(p.name for p in directory.iterdir())[:8]
        raise ValueError(
            f"node-config model-path={path}: no config.json (found {present}); "
            "point it at the directory saved by save_pretrained / the hub snapshot"
        )
