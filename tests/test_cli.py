from __future__ import annotations

import re

import pytest

from dd_assets.cli import build_parser, main

COMMANDS = ["methods", "materialize", "stale", "report", "doctor", "audit", "ui", "easy-hard", "results", "init-data", "dvc-yaml", "mlflow-ui"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([cmd, "--help"])
    assert exc.value.code == 0
    assert f"dd-assets {cmd}" in capsys.readouterr().out


def test_methods_lists_the_registry_with_kinds_and_defaults(capsys):
    from dd_assets.methods import registry

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        assert f"  {name} " in out
    assert "kind=synthesize" in out and "candidates=rded_scores" in out and "'num_crop': 5" in out


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


def test_report_says_when_its_stored_table_is_stale(tiny_env, capsys):
    from dd_assets.config import load_params
    from dd_assets.storage import DataRoot, layout

    DataRoot(load_params().data_root).write_bytes(layout.REPORT_MD, b"# an old table\n")   # nothing materialized
    assert main(["report"]) == 0
    captured = capsys.readouterr()
    assert "# an old table" in captured.out
    assert re.search(r"report: this table is STALE against params.yaml: \d+ upstream partitions are stale or missing "
                     r"\(cam_maps\[0\]", captured.err), captured.err


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
    assert "random_selection[30]: class '0' has" in text and "lower the IPC or add images to the class" in text
    root = DataRoot(load_params().data_root)
    assert len(read_table(root, layout.selection("random", 1))) == 10  # the good partition is kept
    assert not root.exists(layout.selection("random", 30))


# -- issue 21 item 4: doctor, help descriptions, --profile after the subcommand, pipes, errors ----

@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_a_description(cmd, capsys):
    from dd_assets.cli import COMMANDS as DESCRIBED

    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(DESCRIBED[cmd][1].split()[:6]) in out   # the long description, not only the usage line


def test_profile_is_accepted_before_and_after_the_subcommand():
    parse = build_parser().parse_args
    assert parse(["report", "--profile", "tiny"]).profile == "tiny"
    assert parse(["--profile", "cifar10", "report"]).profile == "cifar10"
    assert parse(["--profile", "cifar10", "stale", "--profile", "tiny"]).profile == "tiny"
    assert parse(["report"]).profile is None
    assert parse(["materialize", "--select", "teacher", "--profile", "tiny"]).profile == "tiny"


def test_profile_after_the_subcommand_reaches_the_params(tiny_env, monkeypatch, capsys):
    monkeypatch.setenv("DD_ASSETS_PROFILE", "tiny")   # restored after the test (the CLI sets it)
    assert main(["report", "--profile", "tiny"]) == 1
    assert "run `dd-assets materialize` first" in capsys.readouterr().err
    assert main(["report", "--profile", "nope"]) == 2   # the profile after `report` is the one read
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err


@pytest.mark.parametrize("argv", [["report", "--profile", "nope"], ["stale"], ["audit", "--method", "rded", "--ipc", "1",
                                                                               "--index", "0"]])
def test_a_params_error_in_any_command_is_one_line_and_exit_2(argv, tmp_path, monkeypatch, capsys):
    from tests.conftest import write_params

    monkeypatch.setenv("DD_ASSETS_PARAMS", str(write_params(tmp_path, "tiny", {"student.epoch": 3})))
    monkeypatch.setenv("DD_ASSETS_PROFILE", "tiny")
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"{argv[0]}: ") and "params.yaml" in err
    assert "unknown profile 'nope'" in err if "nope" in argv else "student.epoch; did you mean 'epochs'" in err


def test_doctor_without_the_dvc_environment_warns_and_exits_0(tiny_env, monkeypatch, capsys):
    """After the README's commands (`make demo`, no `make dvc-env`): DVC is optional."""
    import os
    import sys

    import dd_assets.config

    monkeypatch.setattr(dd_assets.config, "PROJECT_ROOT", tiny_env)   # no .venv-dvc there
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))       # and no dvc on PATH
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[--] DVC environment" in out and "(optional)" in out and "[!!]" not in out
    assert "all required parts ok; 1 optional part(s) missing" in out


def test_doctor_exits_1_when_a_required_package_is_missing(tiny_env, monkeypatch, capsys):
    import importlib.metadata as md

    real = md.version

    def version(name):
        if name == "zarr":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[!!] zarr" in out and "1 problem(s)" in out


def test_output_into_a_closed_pipe_exits_quietly(tmp_path):
    """`dd-assets methods | head -1`: the reader is gone before the output is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dd_assets.cli", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()   # the reader closes before the CLI has imported anything
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=300)
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert rc == 141


def test_audit_png_has_words_and_a_size_cap_on_an_extreme_aspect_source(tmp_path):
    """A 500 x 5 source once made an 11136 x 128 PNG with no words."""
    import io

    import numpy as np
    from PIL import Image

    from dd_assets.audit import AUDIT_MAX_SIDE, audit_png
    from dd_assets.storage import DataRoot, layout
    from dd_assets.storage.arrays import write_group

    raw, root = tmp_path / "raw", DataRoot(str(tmp_path / "artifacts"))
    (raw / "cat").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (5, 500, 3), dtype=np.uint8)).save(raw / "cat" / "wide.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(raw / "cat" / "square.png")
    write_group(root, layout.distilled("rded", 1),
                {"images": rng.integers(0, 255, (2, 3, 28, 28), dtype=np.uint8), "labels": np.arange(2)})

    def record(n_tiles):
        return {"method": "rded", "ipc": 1, "index": 0, "class_name": "cat", "class_index": 0, "tiles": [
            {"tile": t, "dest_box": [0, 0, 14, 14], "score": 1.2345 if t else None,
             "source": {"path": "cat/wide.png" if t % 2 == 0 else "cat/square.png", "sha256": "x", "source_id": t},
             "crop_box_source_px": [100, 0, 400, 5] if t % 2 == 0 else [0, 0, 20, 20]} for t in range(n_tiles)]}

    for n_tiles in (1, 4, 16):
        im = Image.open(io.BytesIO(audit_png(root, {"root": str(raw)}, record(n_tiles))))
        assert max(im.size) <= AUDIT_MAX_SIDE, (n_tiles, im.size)
        words = im.text["Description"]
        assert "rded IPC 1 image 0: class 'cat'" in words
        assert "tile 0: cat/wide.png  box [100, 0, 400, 5]  score n/a" in words
        if n_tiles > 1:
            assert "tile 1: cat/square.png  box [0, 0, 20, 20]  score 1.234" in words
        px = np.asarray(im.convert("RGB"))
        assert (px[:12] < 128).any(), "the title line is drawn"       # dark text on white
        assert (px[-14:] != 255).any(), "the last caption line is drawn"
    assert im.size[0] == AUDIT_MAX_SIDE   # 16 tiles: scaled down to the cap


def test_materialize_ctrl_c_exits_130_naming_the_canceled_run(tiny_env, capsys, monkeypatch):
    """Ctrl-C inside a run (the real SIGINT path: tests/test_local_backfill.py and
    tests/test_run_guard.py): the CLI says what was kept and how to continue, and exits 130 like
    a shell's interrupted command."""
    import dd_assets.local_backfill as lb
    import dd_assets.orchestrate as orch

    def interrupted(instance, backfill_id, defs, on_run, hold, tracking_uri=None, **kwargs):
        assert hold is not None and tracking_uri   # the guards are wired in
        raise orch.Interrupted(2, 5, "run-xyz")

    monkeypatch.setattr(lb, "run", interrupted)
    assert main(["materialize", "--select", "raw_images"]) == 130
    err = capsys.readouterr().err
    assert "interrupted after 2 of 5 runs; run run-xyz canceled" in err and "--stale" in err
