"""Converted checkpoints restore onto a device mesh (replicated), not only onto the host."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from cgn_jax.checkpoint import restore_variables, save_variables


def test_restore_replicated_on_a_mesh(tmp_path):
    tree = {"params": {"a": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.ones(5, np.float32)}}
    save_variables(tmp_path / "ck", tree, {"model": "toy"})
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from cgn_jax.checkpoint import restore_variables
        mesh = Mesh(np.array(jax.devices()), ("data",))
        out = restore_variables({str(tmp_path / "ck")!r}, sharding=NamedSharding(mesh, P()))
        leaf = out["params"]["a"]["kernel"]
        assert len(leaf.sharding.device_set) == 4, leaf.sharding
        assert leaf.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(leaf), np.arange(12, dtype=np.float32).reshape(3, 4))
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    host = restore_variables(tmp_path / "ck")
    np.testing.assert_array_equal(host["params"]["b"], np.ones(5, np.float32))
