"""`cgn-jax reproduce`: its plan of pieces, its errors, and (slow) a tiny run stopped and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgn_jax import cli

REPO = Path(__file__).resolve().parents[1]


def _pieces(capsys, *argv):
    assert cli.main(["reproduce", "--dry-run", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line[2:] for line in lines if line.startswith("# ")][:-1]
    commands = [line for line in lines if not line.startswith("# ")]
    return names, commands


def test_the_plan_orders_pieces_and_passes_options(capsys, tmp_path):
    names, commands = _pieces(capsys, "--out", str(tmp_path), "--variants", "colored", "wildlife_MNIST",
                              "--frame-prior", "colored", "--train-steps", "7", "--config.train.batch_size=8")
    assert names == ["data", "train:colored", "train:wildlife", "official:colored   (after data)",
                     "official:wildlife   (after data)", "ours:colored   (after data, train:colored)",
                     "ours:wildlife   (after data, train:wildlife)"]
    train_colored, train_wildlife = commands[1], commands[2]
    assert "--config.loss.mask_frame=1.0" in train_colored and "mask_frame" not in train_wildlife
    assert all("--config.train.num_steps=7" in c and "--config.train.batch_size=8" in c
               for c in (train_colored, train_wildlife))
    assert f"--generator colored={tmp_path}/cgn/colored" in commands[5]
    assert "--methods original+gan original+cgn cgn_official --generator" in commands[5]  # rows with a generator
    assert "--methods original irm2 irm5 original+gan original+cgn cgn_official --out" in commands[3]

    # --frame-prior alone: the variants where masks inverted here (colored, Wildlife), not double-colored
    _, commands = _pieces(capsys, "--out", str(tmp_path), "--variants", "colored", "double_colored", "wildlife",
                          "--frame-prior", "--skip", "official", "ours")
    assert ["--config.loss.mask_frame=1.0" in c for c in commands[1:4]] == [True, False, True]
    _, commands = _pieces(capsys, "--out", str(tmp_path), "--variants", "wildlife", "--skip", "official", "ours")
    assert "mask_frame" not in commands[1]  # the official recipe unless asked

    # existing bundles: no export; skipped stages drop their pieces and dependencies
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "colored.npz").write_bytes(b"")
    names, _ = _pieces(capsys, "--out", str(tmp_path), "--variants", "colored", "--skip", "train", "official")
    assert names == ["ours:colored"]


def test_bad_input_is_named(capsys, tmp_path):
    assert cli.main(["reproduce", "--dry-run", "--variants", "fashion"]) == 2
    assert "unknown MNIST variant 'fashion'" in capsys.readouterr().err
    assert cli.main(["reproduce", "--dry-run", "--methods", "erm"]) == 2
    assert "unknown Table 1 method(s) erm" in capsys.readouterr().err
    assert cli.main(["reproduce", "--dry-run", "--data", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["reproduce", "--dry-run", "--frame-prior", "fashion"]) == 2
    assert "--frame-prior: unknown MNIST variant 'fashion'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_reproduction_stops_on_sigterm_and_resumes(tmp_path, mnist_dir):
    bundles, out = tmp_path / "bundles", tmp_path / "out"
    assert cli.main(["table1", "--export-data", str(bundles), "--variants", "colored", "--methods", "original",
                     "original+cgn", "--mnist-dir", str(mnist_dir), "--tfds-dir", str(tmp_path / "tfds"),
                     "--limit", "500", "--test-limit", "500"]) == 0
    cmd = [sys.executable, "-m", "cgn_jax.cli", "reproduce", "--out", str(out), "--data", str(bundles),
           "--variants", "colored", "--methods", "original", "original+cgn", "--seeds", "0", "--epochs", "1",
           "--steps-per-epoch", "2", "--train-steps", "3", "--parallel", "2",
           "--config.dataset.limit=64", "--config.train.batch_size=8", "--config.train.sample_every=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "logs" / "official_colored.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 128 + 15, log
    assert "Re-run the same command to continue" in log

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    table = json.loads((out / "table1.json").read_text())["runs"]
    assert set(table) == {"colored/original", "colored/original+cgn", "colored/original+cgn@cgn-jax"}
    assert table["colored/original+cgn@cgn-jax"]["generator"] == str(out / "cgn" / "colored")
    assert "Original + CGN" in (out / "table1.md").read_text()
