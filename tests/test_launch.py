"""The launch scripts print the right commands with --dry-run (no gcloud, sbatch or GPU needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_vm.sh", "slurm_gpu.sbatch", "local_multi_gpu.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    p = _run(script, "--help")
    assert p.returncode == 0, p.stderr
    assert "Usage:" in p.stdout and "--dry-run" in p.stdout and "--config" in p.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument(script):
    p = _run(script, "--no-such-flag", "--dry-run")
    assert p.returncode == 2 and "unknown argument --no-such-flag" in p.stderr


def test_tpu_vm_dry_run():
    p = _run("tpu_vm.sh", "--name", "cgn-v4", "--zone", "us-central2-b", "--project", "my-proj",
             "--accelerator-type", "v4-32", "--spot", "--bucket", "gs://my-bucket/cgn/", "--data", "gs://my-bucket/shared",
             "--config", "configs/mnist.py:wildlife", "--delete", "--dry-run", "--", "--config.train.batch_size=64")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    create = [l for l in lines if "tpu-vm create" in l]
    assert create == ["gcloud compute tpus tpu-vm create cgn-v4 --zone=us-central2-b --project=my-proj "
                      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]
    ssh = [l for l in lines if "tpu-vm ssh" in l]
    assert ssh and all("--worker=all" in l and "--zone=us-central2-b" in l for l in ssh)
    assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines)
    install = next(l for l in ssh if "pip install" in l)
    assert '"jax[tpu]"' in install and "$HOME/cgn-jax" in install
    data = next(l for l in ssh if "gs://my-bucket/shared" in l)
    assert "gcloud storage rsync --recursive gs://my-bucket/shared $HOME/shared" in data
    train = next(l for l in ssh if "cgn_jax.distributed train" in l)
    assert "--config=configs/mnist.py:wildlife" in train and "--workdir=$HOME/runs/wildlife" in train
    assert "--config.train.batch_size=64" in train and "export CGN_JAX_SHARED=$HOME/shared" in train
    assert "gcloud storage rsync --recursive $HOME/runs/wildlife gs://my-bucket/cgn/runs/wildlife" in train
    restore = next(l for l in ssh if "no previous run" in l)
    assert "gs://my-bucket/cgn/runs/wildlife $HOME/runs/wildlife" in restore
    assert lines[-1] == "gcloud compute tpus tpu-vm delete cgn-v4 --zone=us-central2-b --project=my-proj --quiet"


def test_tpu_vm_pip_and_skip_create():
    p = _run("tpu_vm.sh", "--name", "n", "--zone", "z", "--bucket", "/mnt/nfs/cgn", "--skip-create",
             "--pip", "git+https://example.org/cgn-jax.git", "--jax-version", "0.4.35", "--run", "r1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "tpu-vm create" not in p.stdout and "tpu-vm scp" not in p.stdout
    assert '"jax[tpu]==0.4.35" git+https://example.org/cgn-jax.git' in p.stdout
    assert "rsync -a $HOME/runs/r1/ /mnt/nfs/cgn/runs/r1/" in p.stdout  # a mounted path: plain rsync
    assert "--workdir=$HOME/runs/r1" in p.stdout


def test_tpu_vm_required_arguments():
    p = _run("tpu_vm.sh", "--name", "n", "--zone", "z", "--dry-run")
    assert p.returncode == 2 and "--bucket is required" in p.stderr
    p = _run("tpu_vm.sh", "--name", "n", "--zone", "z", "--bucket", "gs://b", "--run", "a b", "--dry-run")
    assert p.returncode == 2 and "--run" in p.stderr


def test_slurm_dry_run_per_gpu():
    p = _run("slurm_gpu.sbatch", "--dry-run", "--workdir", "/scratch/runs/colored", "--shared", "/scratch/shared",
             "--venv", "/scratch/venv", "--src", "/scratch/cgn-jax", "--", "--config.train.batch_size=128")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "/scratch/venv/bin/python -m pip install -U 'jax[cuda12]' /scratch/cgn-jax" in out
    srun = next(l for l in out.splitlines() if l.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and "--kill-on-bad-exit=1" in srun
    assert "CGN_JAX_SHARED=/scratch/shared" in srun and "JAX_LOCAL_DEVICE_IDS" not in srun
    assert "/scratch/venv/bin/python -m cgn_jax.distributed train" in srun
    assert "--config=configs/mnist.py:colored --workdir=/scratch/runs/colored" in srun
    assert srun.endswith("--config.train.batch_size=128")


def test_slurm_dry_run_per_node_uses_allocation():
    env = {"SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "3"}
    p = _run("slurm_gpu.sbatch", "--dry-run", "--per-node", "--no-install", "--workdir", "/w", env=env)
    assert p.returncode == 0, p.stderr
    assert "pip install" not in p.stdout
    srun = next(l for l in p.stdout.splitlines() if l.startswith("srun "))
    assert "--nodes=3 --ntasks-per-node=1" in srun and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in srun


def test_slurm_outside_slurm_without_dry_run():
    p = _run("slurm_gpu.sbatch", "--workdir", "/w")
    assert p.returncode == 2 and "sbatch launch/slurm_gpu.sbatch" in p.stderr
    p = _run("slurm_gpu.sbatch", "--dry-run")
    assert p.returncode == 2 and "--workdir is required" in p.stderr


def test_local_multi_gpu_dry_run():
    p = _run("local_multi_gpu.sh", "--dry-run", "--install", "--gpus", "0,1,2,3", "--shared", "/data/shared",
             "--config", "configs/mnist.py:double_colored", "--", "--config.train.batch_size=64")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == f"python3 -m pip install -U 'jax[cuda12]' {REPO}"
    assert lines[1] == ("env CUDA_VISIBLE_DEVICES=0,1,2,3 CGN_JAX_SHARED=/data/shared python3 -m cgn_jax.distributed train "
                        "--config=configs/mnist.py:double_colored --workdir=runs/double_colored "
                        "--config.train.batch_size=64")
    p = _run("local_multi_gpu.sh", "--dry-run", "--bench", "--", "--batch", "64", "--dtype", "bfloat16", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ("env python3 -m cgn_jax.distributed bench --config=configs/mnist.py:colored "
                                "--batch 64 --dtype bfloat16 --json")
    p = _run("local_multi_gpu.sh", "--dry-run", "--gpus", "all")
    assert p.returncode == 2 and "--gpus" in p.stderr
