from __future__ import annotations

import pytest

from dd_assets.cli import build_parser, main

COMMANDS = ["methods", "materialize", "stale", "report", "doctor", "audit", "ui", "easy-hard"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([cmd, "--help"])
    assert exc.value.code == 0
    assert f"dd-assets {cmd}" in capsys.readouterr().out


def test_methods_lists_stages_and_catalog(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("random", "rded", "herding", "kmeans"):
        assert name in out
    assert "score" in out and "label" in out and "fkd" in out


def test_materialize_unknown_selection_names_assets(tiny_env):
    with pytest.raises(SystemExit, match="matches no asset; assets: .*rded_scores"):
        main(["materialize", "--select", "nope_*"])


def test_materialize_unknown_ipc_is_refused(tiny_env):
    with pytest.raises(SystemExit, match=r"--ipc 7: not in params.yaml 'ipcs'"):
        main(["materialize", "--select", "random_selection", "--ipc", "7"])


def test_stale_on_a_fresh_instance_lists_everything_missing(tiny_env, capsys):
    assert main(["stale"]) == 0
    out = capsys.readouterr().out
    assert "missing  manifest[0]" in out and "missing  report" in out


def test_report_and_audit_before_materializing_say_what_to_do(tiny_env, capsys):
    assert main(["report"]) == 1
    assert "run `dd-assets materialize` first" in capsys.readouterr().err
    assert main(["audit", "--method", "rded", "--ipc", "1", "--index", "0"]) == 2
    assert "materialize the asset that writes it first" in capsys.readouterr().err


def test_doctor_reports_each_check(tiny_env, capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    assert "[ok] torch" in out and "data root" in out and "DVC environment" in out


def test_class_with_fewer_images_than_ipc_fails_that_partition_only(tiny_env, capsys):
    """IPC 30 needs 30 train images per class (tiny: 24 images, ~14 train): the IPC-30
    selection fails naming the class and what to do; the IPC-1 selection and the data are kept."""
    import os

    import yaml

    from dd_assets.config import load_params
    from dd_assets.storage import DataRoot, layout
    from dd_assets.storage.tables import read_table

    path = os.environ["DD_ASSETS_PARAMS"]
    doc = yaml.safe_load(open(path))
    doc["profiles"]["tiny"]["ipcs"] = [1, 30]
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    rc = main(["materialize", "--select", "raw_images", "manifest", "random_selection"])
    err = capsys.readouterr()
    assert rc != 0
    text = err.out + err.err
    assert "random at IPC 30: class '0' has" in text and "lower the IPC or add images to the class" in text
    root = DataRoot(load_params().data_root)
    assert len(read_table(root, layout.selection("random", 1))) == 10  # the good partition is kept
    assert not root.exists(layout.selection("random", 30))
