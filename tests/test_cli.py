from __future__ import annotations

import pytest

from dd_assets.cli import build_parser, main

COMMANDS = ["methods", "materialize", "stale", "report", "doctor", "audit", "ui"]


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
