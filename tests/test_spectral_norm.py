"""Power-iteration spectral norm (`spectral_norm="power_iteration"`) against torch's, layer and model.

The official CGN trains its BigGAN mechanisms in torch's train mode, where
`torch.nn.utils.spectral_norm` does one power iteration per forward and divides
`weight_orig` by the resulting sigma. These tests hold the Flax layers and a small
BigGAN-deep to torch in both modes: outputs, the updated u and v after each forward,
and the gradient with respect to `weight_orig`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ppb = pytest.importorskip("pytorch_pretrained_biggan")

from cgn_jax.checkpoint import restore_variables  # noqa: E402
from cgn_jax.models.biggan import (POWER_ITERATION, SPECTRAL, BigGANConfig, BigGANDeep, SNConv,  # noqa: E402
                                   SNDense, fold_spectral_norm, power_iterate_host,
                                   spectral_layers)
from cgn_jax.models.imagenet_cgn import random_biggan  # noqa: E402
from cgn_jax.port.biggan import SPECTRAL_NORM_DIR, convert, load_biggan, torch_to_flax  # noqa: E402
from cgn_jax.port.common import conv_kernel, dense_kernel  # noqa: E402
from test_biggan import randomise_statistics_and_gains  # noqa: E402

EPS = 1e-4  # BigGANConfig.eps, what the reference passes to spectral_norm
# A 16x16 BigGAN-deep with 4 base channels: every kind of layer (attention included), compiled in seconds.
SMALL = BigGANConfig(output_dim=16, channel_width=4, num_classes=10,
                     layers=((True, 16, 8), (True, 8, 4), (False, 4, 2), (False, 2, 1)), attention_layer_position=2)


def _grad_x(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------- one layer

def _torch_layer(kind):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(5, 6, 3, padding=1) if kind == "conv" else torch.nn.Linear(7, 6)
    return torch.nn.utils.spectral_norm(layer, eps=EPS)


def _flax_layer(kind, update):
    if kind == "conv":
        return SNConv(6, 3, EPS, update=update)
    return SNDense(6, EPS, update=update)


def _to_flax(kind, layer):
    """Flax variables from the torch layer's weight_orig, bias, u, v (v reordered to (kh, kw, in) by hand)."""
    w = layer.weight_orig.detach().numpy()
    v = layer.weight_v.numpy()
    if kind == "conv":
        kernel, v = conv_kernel(w), v.reshape(5, 3, 3).transpose(1, 2, 0)
    else:
        kernel = dense_kernel(w)
    return {"params": {"kernel": kernel, "bias": layer.bias.detach().numpy().copy()},
            SPECTRAL: {"u": layer.weight_u.numpy().copy(), "v": np.ascontiguousarray(v)}}


def _torch_uv(kind, layer):
    v = layer.weight_v.numpy()
    return layer.weight_u.numpy(), (v.reshape(5, 3, 3).transpose(1, 2, 0) if kind == "conv" else v)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_layer_matches_torch_spectral_norm_train_and_eval(kind):
    ref = _torch_layer(kind)
    x_t = _grad_x(1, (2, 5, 4, 4) if kind == "conv" else (2, 7))
    x = x_t.transpose(0, 2, 3, 1) if kind == "conv" else x_t
    to_nhwc = (lambda a: a.transpose(0, 2, 3, 1)) if kind == "conv" else (lambda a: a)
    cot = _grad_x(2, x.shape[:-1] + (6,))  # loss = sum(out * cot)
    cot_t = np.ascontiguousarray(cot.transpose(0, 3, 1, 2)) if kind == "conv" else cot
    ref.train()
    with torch.no_grad():  # one iteration first: torch's fresh u, v are random, sigma a random number near 0
        ref(torch.from_numpy(x_t))
    variables = _to_flax(kind, ref)
    ref.eval()  # eval mode uses the stored v, so this also checks its (kh, kw, in) order
    with torch.no_grad():
        out_t = ref(torch.from_numpy(x_t)).numpy()
    out = _flax_layer(kind, update=False).apply(variables, x)
    np.testing.assert_allclose(out, to_nhwc(out_t), atol=2e-6)
    train = _flax_layer(kind, update=True)

    @jax.jit
    def step(params, spectral):
        def loss(p):
            out, mut = train.apply({"params": p, SPECTRAL: spectral}, x, mutable=[SPECTRAL])
            return jnp.sum(out * cot), (out, mut[SPECTRAL])
        return jax.grad(loss, has_aux=True)(params)

    u0 = ref.weight_u.numpy().copy()
    ref.train()
    spectral = variables[SPECTRAL]
    for it in range(3):  # u, v move on every forward; the same again on each side
        ref.zero_grad()
        out_t = ref(torch.from_numpy(x_t))
        (out_t * torch.from_numpy(cot_t)).sum().backward()
        grads, (out, spectral) = step(variables["params"], spectral)
        np.testing.assert_allclose(out, to_nhwc(out_t.detach().numpy()), atol=2e-6, err_msg=f"forward {it}")
        u_t, v_t = _torch_uv(kind, ref)
        np.testing.assert_allclose(spectral["u"], u_t, atol=1e-6, err_msg=f"u after forward {it}")
        np.testing.assert_allclose(spectral["v"], v_t, atol=1e-6, err_msg=f"v after forward {it}")
        g_t = ref.weight_orig.grad.numpy()
        g_t = conv_kernel(g_t) if kind == "conv" else dense_kernel(g_t)
        # the gradient goes through sigma too (u, v constant): a stop_gradient on sigma fails here
        np.testing.assert_allclose(grads["kernel"], g_t, atol=1e-5 * np.abs(g_t).max(), err_msg=f"grad {it}")
        np.testing.assert_allclose(grads["bias"], ref.bias.grad.numpy(), atol=1e-5)
    assert np.abs(ref.weight_u.numpy() - u0).max() > 1e-2  # the iterations did move u

    ref.eval()  # stored u, v, no iteration
    u_before = ref.weight_u.numpy().copy()
    with torch.no_grad():
        out_t = ref(torch.from_numpy(x_t)).numpy()
    assert np.array_equal(ref.weight_u.numpy(), u_before)
    out = _flax_layer(kind, update=False).apply({"params": variables["params"], SPECTRAL: spectral}, x)
    np.testing.assert_allclose(out, to_nhwc(out_t), atol=2e-6)


def test_update_needs_a_mutable_collection():
    variables = _to_flax("dense", _torch_layer("dense"))
    with pytest.raises(Exception, match="spectral"):
        SNDense(6, EPS, update=True).apply(variables, np.ones((1, 7), np.float32))


# ---------------------------------------------------------------------------- a small BigGAN-deep

def _torch_biggan(seed=0):
    torch.manual_seed(seed)
    model = ppb.BigGAN(ppb.BigGANConfig.from_dict(SMALL.to_dict()))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        randomise_statistics_and_gains(model, g)
        # torch's fresh u, v are random, so sigma = u . (W v) is a random number near 0; two
        # train-mode forwards move them towards the singular vectors (as trained ones are)
        model.train()
        for _ in range(2):
            model(torch.randn(2, 128, generator=g), torch.softmax(torch.randn(2, 10, generator=g), -1), 0.5)
    model.eval()
    return model


def _state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(batch=2):
    rs = np.random.RandomState(0)
    z = (0.5 * rs.randn(batch, 128)).astype(np.float32)
    y = np.zeros((batch, 10), np.float32)
    y[np.arange(batch), rs.randint(0, 10, batch)] = 1.0
    y[-1] = np.abs(rs.randn(10)) / 5  # a soft class vector too
    return z, y


def _torch_out(model, z, y, t, grad_cot=None):
    out = model(torch.from_numpy(z), torch.from_numpy(y), t)
    if grad_cot is not None:
        (out * torch.from_numpy(grad_cot.transpose(0, 3, 1, 2))).sum().backward()
    return out.detach().numpy().transpose(0, 2, 3, 1)


def _varied(images):
    """Finite, not saturated, and not flat over the pixels: a comparison of these means something."""
    images = np.asarray(images)
    spread = images.std(axis=(1, 2)).mean(-1)  # per image, over pixels
    return bool(np.isfinite(images).all() and np.abs(images).max() < 0.999 and spread.min() > 0.05)


def _max_diff_trees(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def small():
    ref = _torch_biggan()
    sd = _state_dict(ref)
    model = BigGANDeep(SMALL, spectral_norm=POWER_ITERATION)
    return dict(ref=ref, sd=sd, model=model, variables=torch_to_flax(sd, SMALL, spectral_norm=POWER_ITERATION),
                folded=torch_to_flax(sd, SMALL))


def test_biggan_power_iteration_eval_matches_torch_and_folded(small):
    z, y = _inputs()
    t = 0.55
    model, variables = small["model"], small["variables"]
    with torch.no_grad():
        ref = _torch_out(small["ref"], z, y, t)
    assert _varied(ref)
    out = np.asarray(jax.jit(lambda v: model.apply(v, z, y, model.stats(t)))(variables))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    folded = np.asarray(jax.jit(lambda v: BigGANDeep(SMALL).apply(v, z, y, model.stats(t)))(small["folded"]))
    np.testing.assert_allclose(out, folded, atol=1e-5)
    # the shapes power-iteration mode adds: conv_to_rgb keeps all channel_width outputs, the bias 3
    assert variables["params"]["conv_to_rgb"]["kernel"].shape == (3, 3, 4, 4)
    assert variables["params"]["conv_to_rgb"]["bias"].shape == (3,)
    assert variables[SPECTRAL]["layers_1"]["conv_1"]["v"].shape == (3, 3, 8)
    np.testing.assert_allclose(variables["params"]["gen_z"]["kernel"],
                               dense_kernel(small["sd"]["generator.gen_z.weight_orig"]), rtol=1e-6, atol=1e-7)


def test_biggan_train_mode_matches_torch_outputs_uv_and_gradients():
    ref = _torch_biggan()
    sd = _state_dict(ref)
    model = BigGANDeep(SMALL, spectral_norm=POWER_ITERATION)
    variables = torch_to_flax(sd, SMALL, spectral_norm=POWER_ITERATION)
    z, y = _inputs()
    t = 0.7
    ts = model.stats(t)
    cot = _grad_x(3, (2, 16, 16, 3))

    @jax.jit
    def step(params, spectral):
        def loss(p):
            out, mut = model.apply({**variables, "params": p, SPECTRAL: spectral}, z, y, ts, train=True,
                                   mutable=[SPECTRAL])
            return jnp.sum(out * cot), (out, mut[SPECTRAL])
        return jax.grad(loss, has_aux=True)(params)

    ref.train()
    spectral = variables[SPECTRAL]
    eval_out = np.asarray(jax.jit(lambda v: model.apply(v, z, y, ts))(variables))
    for it in range(2):
        ref.zero_grad()
        out_t = _torch_out(ref, z, y, t, grad_cot=cot)
        grads, (out, spectral) = step(variables["params"], spectral)
        assert _varied(out_t)
        np.testing.assert_allclose(out, out_t, atol=1e-5, err_msg=f"forward {it}")
        if it == 0:  # the iteration matters: train-mode output is not the eval-mode one
            assert np.abs(np.asarray(out) - eval_out).max() > 1e-3
        # torch's updated u, v of every layer, through the converter's (independently tested) reordering
        expected = torch_to_flax(_state_dict(ref), SMALL, spectral_norm=POWER_ITERATION)[SPECTRAL]
        assert set(spectral_layers(expected)) == set(spectral_layers(spectral))
        assert _max_diff_trees(spectral, expected) < 1e-5, it
        for name, path, torch_name, kind in (
                ("gen_z", ("gen_z",), "generator.gen_z", "dense"),
                ("bn scale", ("layers_0", "bn_1", "scale"), "generator.layers.0.bn_1.scale", "dense"),
                ("conv 3x3", ("layers_1", "conv_1"), "generator.layers.1.conv_1", "conv"),
                ("attention", ("layers_2", "snconv1x1_phi"), "generator.layers.2.snconv1x1_phi", "conv"),
                # outputs 3.. of conv_to_rgb are unused: their gradient comes only through sigma
                ("conv_to_rgb", ("conv_to_rgb",), "generator.conv_to_rgb", "conv")):
            g = grads
            for k in path:
                g = g[k]
            g_t = dict(ref.named_parameters())[f"{torch_name}.weight_orig"].grad.numpy()
            g_t = conv_kernel(g_t) if kind == "conv" else dense_kernel(g_t)
            np.testing.assert_allclose(g["kernel"], g_t, atol=2e-4 * np.abs(g_t).max(), err_msg=f"{name} grad {it}")
        assert np.abs(grads["conv_to_rgb"]["kernel"][..., 3:]).max() > 0


def test_random_power_iteration_biggan_eval_equals_its_fold():
    """(b): the same random weights, power-iteration eval mode vs folded (W / sigma on the host)."""
    model = BigGANDeep(SMALL, spectral_norm=POWER_ITERATION)
    variables = random_biggan(SMALL, 3, POWER_ITERATION)
    folded = fold_spectral_norm(variables)
    assert folded["params"]["conv_to_rgb"]["kernel"].shape == (3, 3, 4, 3) and SPECTRAL not in folded
    z, y = _inputs(3)
    ts = model.stats(1.0)
    out = np.asarray(jax.jit(lambda v: model.apply(v, z, y, ts))(variables))
    ref = np.asarray(jax.jit(lambda v: BigGANDeep(SMALL).apply(v, z, y, ts))(folded))
    assert _varied(out)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # u, v matter: after one more power iteration sigma differs, and so does the output
    moved = np.asarray(jax.jit(lambda v: model.apply(v, z, y, ts))(power_iterate_host(variables, EPS)))
    assert np.isfinite(moved).all() and np.abs(moved - out).max() > 1e-3


def test_bf16_keeps_the_power_iteration_in_float32():
    variables = random_biggan(SMALL, 4, POWER_ITERATION)
    z, y = _inputs()
    ts = BigGANDeep(SMALL).stats(0.5)
    res = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = BigGANDeep(SMALL, dtype=dtype, spectral_norm=POWER_ITERATION)
        res[dtype] = jax.jit(lambda v: model.apply(v, z, y, ts, train=True, mutable=[SPECTRAL]))(variables)
    (out32, s32), (out16, s16) = res[jnp.float32], res[jnp.bfloat16]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16))
    assert _max_diff_trees(s16, s32) < 1e-6  # the iteration does not see the compute dtype
    assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.05


def test_converter_writes_what_power_iteration_needs_and_old_conversions_are_refused(small, tmp_path):
    src = tmp_path / "biggan"
    src.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in small["sd"].items()}, src / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (src / "config.json").write_text(json.dumps(SMALL.to_dict()))
    dst = convert(src, tmp_path / "out")
    # variables/ is what it always was: the folded weights, readable by the old loader's check
    old_style = restore_variables(dst, expected=BigGANDeep(SMALL).init_shapes())
    jax.tree.map(np.testing.assert_array_equal, old_style, small["folded"])
    module, folded = load_biggan(dst)
    assert module.spectral_norm == "folded"
    jax.tree.map(np.testing.assert_array_equal, folded, small["folded"])
    module, power = load_biggan(dst, spectral_norm=POWER_ITERATION)
    assert module.spectral_norm == POWER_ITERATION
    jax.tree.map(np.testing.assert_array_equal, power, small["variables"])
    # weight_orig recovered as folded * sigma: float32 rounding away from torch's
    np.testing.assert_allclose(power["params"]["layers_1"]["conv_1"]["kernel"],
                               conv_kernel(small["sd"]["generator.layers.1.conv_1.weight_orig"]), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(power["params"]["conv_to_rgb"]["kernel"],
                                  conv_kernel(small["sd"]["generator.conv_to_rgb.weight_orig"]))
    # the ImageNet CGN's mechanisms start from these variables, unfolded from the frozen (folded) BigGAN
    import ml_collections

    from cgn_jax.models import imagenet_cgn as M

    model_config = ml_collections.ConfigDict({"biggan": str(dst), "spectral_norm": POWER_ITERATION})
    params, spectral = M.initial_mechanisms(model_config, {"biggan": folded}, 0)
    for name in M.MECHANISMS:
        jax.tree.map(np.testing.assert_array_equal, {"params": params[name], SPECTRAL: spectral[name]},
                     {"params": power["params"], SPECTRAL: power[SPECTRAL]})
    # a conversion from before this mode: folded still loads, power iteration names the fix
    import shutil

    shutil.rmtree(dst / SPECTRAL_NORM_DIR)
    load_biggan(dst)
    with pytest.raises(FileNotFoundError, match="cgn-jax port biggan"):
        load_biggan(dst, spectral_norm=POWER_ITERATION)
    with pytest.raises(ValueError, match="power_iteration"):
        load_biggan(dst, spectral_norm="power")
