"""The ported official MNIST CGN reproduces the reference outputs; bad checkpoints fail clearly."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.checkpoint import CheckpointMismatchError, flatten_with_names, read_meta, restore_variables
from cgn_jax.models.mnist_cgn import MnistCGN, init_variables, tanh_unsaturating
from cgn_jax.port import mnist as port_mnist
from cgn_jax.port.common import PortError
from cgn_jax.port.torch_pickle import TorchFileError, load_state_dict


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize("variant", ["colored", "double_colored"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_port_reproduces_golden(variant, mode, cgn_weights, reference):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / f"{variant}_MNIST.pth")
    golden = np.load(reference / f"cgn_{variant}_MNIST_golden.npz")
    model = MnistCGN()
    args = [jnp.asarray(golden[k]) for k in ("u", "y", "y_texture", "y_background")]
    train = mode == "train"
    out = model.apply(variables, *args, train=train, method=MnistCGN.mechanisms,
                      mutable=["batch_stats"] if train else False)
    mask, fg, bg = out[0] if train else out
    np.testing.assert_allclose(mask, _nhwc(golden[f"{mode}_shape_raw"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(fg, _nhwc(golden[f"{mode}_texture_raw"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(bg, _nhwc(golden[f"{mode}_background_raw"]), atol=1e-4, rtol=0)


def test_unsaturating_tanh_pulls_saturated_units_back_only():
    x = jnp.array([-8.0, -1.0, 0.0, 0.5, 8.0])
    np.testing.assert_array_equal(tanh_unsaturating(x, 0.05), jnp.tanh(x))
    for g in (1.0, -1.0):  # floor 0 is exactly tanh's gradient, in both directions
        np.testing.assert_array_equal(jax.grad(lambda v: g * tanh_unsaturating(v, 0.0).sum())(x),
                                      jax.grad(lambda v: g * jnp.tanh(v).sum())(x))
    true = np.asarray(jax.grad(lambda v: jnp.tanh(v).sum())(x))
    assert true[0] < 1e-6 and true[-1] < 1e-6  # saturated: tanh' ~ 4.5e-7
    # loss = y: descent lowers y, which pulls x = 8 (y ~ +1) back but pushes x = -8 further out
    down = np.asarray(jax.grad(lambda v: tanh_unsaturating(v, 0.05).sum())(x))
    assert down[-1] == pytest.approx(0.05) and down[0] == true[0]
    up = np.asarray(jax.grad(lambda v: -tanh_unsaturating(v, 0.05).sum())(x))
    assert up[0] == pytest.approx(-0.05) and up[-1] == -true[-1]
    np.testing.assert_array_equal(down[1:4], true[1:4])  # unsaturated units: tanh' is above the floor


def test_gradient_floor_leaves_the_generator_outputs_unchanged(cgn_weights):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "colored_MNIST.pth")
    u = jax.random.normal(jax.random.PRNGKey(0), (20, 32))
    y = jnp.arange(20) % 10
    plain = MnistCGN().apply(variables, u, y, y, y, method=MnistCGN.mechanisms)
    floored = MnistCGN(tanh_grad_floor=0.05).apply(variables, u, y, y, y, method=MnistCGN.mechanisms)
    for a, b in zip(plain, floored):
        np.testing.assert_array_equal(a, b)

    def bg_mean(model, params):
        return model.apply({**variables, "params": params}, u, y, y, y, method=MnistCGN.mechanisms)[2].mean()

    g_plain = jax.grad(lambda p: bg_mean(MnistCGN(), p))(variables["params"])["f_text2"]["conv3"]["bias"]
    g_floor = jax.grad(lambda p: bg_mean(MnistCGN(tanh_grad_floor=0.5), p))(variables["params"])["f_text2"]["conv3"]["bias"]
    assert not np.allclose(g_plain, g_floor)  # the floor reaches the background head's parameters

    from cgn_jax.models.mnist_cgn import from_config
    from configs.mnist import get_config

    config = get_config("colored")
    assert from_config(config.model).tanh_grad_floor == 0.0  # the official recipe
    config.model.tanh_grad_floor = 0.25
    assert from_config(config.model).tanh_grad_floor == 0.25
    config.model.tanh_grad_floor = -0.1
    with pytest.raises(ValueError, match=r"model.tanh_grad_floor=-0.1 is not in \[0, 1\)"):
        from_config(config.model)


def test_wildlife_ports_and_runs(cgn_weights):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "wildlife_MNIST.pth")
    model = MnistCGN()
    y = jnp.arange(10)
    out = model.apply(variables, y, rngs={"noise": jax.random.PRNGKey(0), "texture": jax.random.PRNGKey(1)})
    assert out["image"].shape == (10, 32, 32, 3)
    assert out["mask"].min() >= np.float32(1e-4) and out["mask"].max() <= np.float32(1 - 1e-4)
    assert np.isfinite(np.asarray(out["image"])).all()


def test_orbax_round_trip_is_exact(cgn_weights, tmp_path):
    src = cgn_weights / "double_colored_MNIST.pth"
    dst = port_mnist.convert(src, tmp_path / "dc")
    model, restored = port_mnist.load_mnist_cgn(dst)
    original = flatten_with_names(port_mnist.load_torch_mnist_cgn(src))
    again = flatten_with_names(restored)
    assert original.keys() == again.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], again[k], err_msg=k)
    meta = read_meta(dst)
    assert meta["model"] == "mnist_cgn" and meta["variant"] == "double_colored"
    assert model.latent_dim == 32 and model.ngf == 32 and model.texture_mode == "tile_crop"


def test_loading_takes_the_texture_layer_from_the_checkpoint(cgn_weights, tmp_path):
    """A generator trained with patch_shuffle must not come back with the default tile_crop."""
    import json

    dst = port_mnist.convert(cgn_weights / "colored_MNIST.pth", tmp_path / "c")
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "texture_mode": "patch_shuffle", "patch_size": 8}))
    model, _ = port_mnist.load_mnist_cgn(dst)
    assert (model.texture_mode, model.patch_size) == ("patch_shuffle", 8)
    model, _ = port_mnist.load_mnist_cgn(dst, texture_mode="tile_crop", patch_size=4)
    assert (model.texture_mode, model.patch_size) == ("tile_crop", 4)

    # `cgn-jax generate` and the classifier pass the config's layer: the recorded one wins
    from types import SimpleNamespace

    from cgn_jax.generate import load_generator

    config = SimpleNamespace(model=SimpleNamespace(texture_mode="tile_crop", patch_size=4))
    model, _ = load_generator(str(dst), config)
    assert (model.texture_mode, model.patch_size) == ("patch_shuffle", 8)
    (dst / "meta.json").write_text(json.dumps(meta))  # a ported checkpoint records none: the config decides
    model, _ = load_generator(str(dst), config)
    assert (model.texture_mode, model.patch_size) == ("tile_crop", 4)


def test_loading_another_variants_generator_warns(cgn_weights, tmp_path, capsys):
    """A Wildlife generator under the colored config would silently write colored-named sheets."""
    from types import SimpleNamespace

    from cgn_jax.generate import load_generator

    def config(variant):
        return SimpleNamespace(variant=variant, model=SimpleNamespace(texture_mode="tile_crop", patch_size=4))

    src = cgn_weights / "colored_MNIST.pth"
    dst = port_mnist.convert(src, tmp_path / "c")
    for checkpoint in (dst, src):
        load_generator(str(checkpoint), config("colored"))
        assert "generator but the config is for" not in capsys.readouterr().err
        load_generator(str(checkpoint), config("wildlife"))
        err = capsys.readouterr().err
        assert "is a colored generator but the config is for wildlife" in err
        assert "--config=configs/mnist.py:colored" in err


def test_counterfactual_labels_drive_their_mechanism_only(cgn_weights):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "colored_MNIST.pth")
    model = MnistCGN()
    u = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
    y = jnp.array([1, 3, 5, 7])
    other = jnp.array([2, 4, 6, 8])
    base = model.apply(variables, u, y, y, y, method=MnistCGN.mechanisms)
    cf = model.apply(variables, u, y, other, y, method=MnistCGN.mechanisms)
    np.testing.assert_array_equal(base[0], cf[0])  # shape unchanged
    np.testing.assert_array_equal(base[2], cf[2])  # background unchanged
    assert float(jnp.abs(base[1] - cf[1]).max()) > 0.1  # texture changed


def test_torch_free_reader_matches_torch(cgn_weights, tmp_path):
    torch = pytest.importorskip("torch")
    src = cgn_weights / "wildlife_MNIST.pth"
    ours = load_state_dict(src)
    theirs = torch.load(src, map_location="cpu")
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
    # the pre-1.6 serialisation, with a non-contiguous tensor
    legacy = dict(theirs)
    legacy["transposed"] = torch.arange(12.0).reshape(3, 4).t()
    torch.save(legacy, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    ours = load_state_dict(tmp_path / "legacy.pth")
    for k, v in legacy.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        port_mnist.load_torch_mnist_cgn(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="no cgn-jax checkpoint"):
        port_mnist.load_mnist_cgn(tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(cgn_weights, tmp_path):
    data = (cgn_weights / "colored_MNIST.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="corrupt or truncated"):
        port_mnist.load_torch_mnist_cgn(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(TorchFileError):
        port_mnist.load_torch_mnist_cgn(garbage)


def test_wrong_checkpoint_names_the_tensor(reference, cgn_weights, tmp_path):
    with pytest.raises(PortError, match="label_emb.weight"):
        port_mnist.load_torch_mnist_cgn(reference / "u2netp_random.pth")
    tensors = load_state_dict(cgn_weights / "colored_MNIST.pth")
    tensors["f_text1.7.weight"] = tensors["f_text1.7.weight"][:, :-1]
    with pytest.raises(PortError, match=r"f_text1\.7\.weight.*shape"):
        port_mnist.torch_to_flax(tensors)
    tensors = load_state_dict(cgn_weights / "colored_MNIST.pth")
    tensors["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(PortError, match="extra.weight"):
        port_mnist.torch_to_flax(tensors)


def test_restore_into_a_differently_sized_model_names_the_tensor(cgn_weights, tmp_path):
    dst = port_mnist.convert(cgn_weights / "colored_MNIST.pth", tmp_path / "c")
    small = MnistCGN(ngf=16)
    expected = jax.eval_shape(lambda: init_variables(small, jax.random.PRNGKey(0)))
    with pytest.raises(CheckpointMismatchError, match=r"f_shape/bn1/mean' has shape \(32,\), the model expects \(16,\)"):
        restore_variables(dst, expected=expected)


def test_corrupt_orbax_checkpoint_is_a_clear_error(cgn_weights, tmp_path):
    dst = port_mnist.convert(cgn_weights / "colored_MNIST.pth", tmp_path / "c")
    for f in (dst / "variables").rglob("*"):
        if f.is_file() and f.name != "meta.json":
            f.write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointMismatchError, match="corrupt"):
        port_mnist.load_mnist_cgn(dst)


def test_cli_port_mnist(cgn_weights, tmp_path):
    from cgn_jax.cli import main

    assert main(["port", "mnist", "--src", str(cgn_weights / "wildlife_MNIST.pth"), "--dst", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "variables").is_dir()
    assert main(["port", "mnist", "--src", str(tmp_path / "missing.pth"), "--dst", str(tmp_path / "x")]) == 2
