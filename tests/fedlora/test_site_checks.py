"""Pre-flight at a deployed site: a bad data file or model directory is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from tiny_configs import tiny_config

from fedlora.client.site import SiteConfig
from fedlora.client.site_checks import DONE, SiteCheckError, check_site

CFG = tiny_config("classification", {"data.num_classes": 2})


def ctx() -> Context:
    return Context(
        run_id=1, node_id=42, node_config={}, state=RecordDict(), run_config={}
    )


def test_a_file_without_the_label_column_names_site_file_and_columns(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "site.csv"
    bad.write_text("text,score\nnice film,1\nbad film,0\n")
    site = SiteConfig(data_path=str(bad), name="hospital-a")
    with pytest.raises(SiteCheckError) as err:
        check_site(CFG, site, ctx(), "")
    text = str(err.value)
    assert text.startswith("site hospital-a: node-config data-path=")
    assert "label" in text and "score" in text


def test_missing_file_and_model_dir_and_unnamed_site(tmp_path: Path) -> None:
    with pytest.raises(
        SiteCheckError, match=r"site node 42: node-config data-path=.*no such file"
    ):
        check_site(CFG, SiteConfig(data_path=str(tmp_path / "no.csv")), ctx(), "")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"")
    with pytest.raises(
        SiteCheckError, match=r"no config.json \(found \['weights.bin'\]\)"
    ):
        check_site(CFG, SiteConfig(model_path=str(tmp_path / "model")), ctx(), "")


def test_files_are_checked_on_the_first_message_of_a_run_only(tmp_path: Path) -> None:
    good = tmp_path / "site.csv"
    good.write_text("text,label\nnice film,1\nbad film,0\n")
    context = ctx()
    check_site(CFG, SiteConfig(data_path=str(good)), context, "")
    assert DONE in context.state.config_records
    good.unlink()  # checked already in this run: not read again
    check_site(CFG, SiteConfig(data_path=str(good)), context, "")
    with pytest.raises(SiteCheckError):
        check_site(CFG, SiteConfig(data_path=str(good)), ctx(), "")
