"""BigGAN-deep port: the Flax model against pytorch-pretrained-BigGAN (random init), the converter's checks."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ppb = pytest.importorskip("pytorch_pretrained_biggan")

from cgn_jax.checkpoint import flatten_with_names  # noqa: E402
from cgn_jax.models.biggan import (BigGANConfig, BigGANDeep, TruncationStats, truncated_noise,  # noqa: E402
                                   truncation_stats)
from cgn_jax.port.biggan import convert, infer_variant, load_biggan, torch_to_flax  # noqa: E402
from cgn_jax.port.common import PortError  # noqa: E402

from conftest import SHARED  # noqa: E402  (../shared or $CGN_JAX_SHARED)

MANIFEST = str(SHARED / "reference" / "biggan_deep_256_manifest.json")
FP32_TOL = 1e-4
# Measured on the small config (channel_width 16, 128 px): bf16 vs fp32 max abs 0.021, mean abs 0.003.
BF16_MAX_TOL = 0.05
BF16_MEAN_TOL = 0.006
# 0.4 and 1.0 sit exactly on stored steps, 0.55 and 0.731 between them, and 0.56 a hair above
# step 28 in float64 (0.56 / 0.02 = 28.000000000000004), so the reference uses step 29's statistics.
TRUNCATIONS = (0.4, 0.55, 0.56, 0.731, 1.0)


def randomise_statistics_and_gains(model, g) -> None:
    """Give a fresh reference model BN statistics, attention gains and a final BN that all matter
    (torch initialises gamma to 0 and leaves the final BN's affine parameters uninitialised)."""
    for name, b in model.named_buffers():
        if name.endswith("running_means"):
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_vars"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.fill_(0.7)
        elif name == "generator.bn.weight":
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name == "generator.bn.bias":
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _reference(output_dim, channel_width, seed=0):
    """A randomly initialised reference model whose BN statistics, SN u/v and gains all matter."""
    torch.manual_seed(seed)
    cfg = ppb.BigGANConfig.from_dict(BigGANConfig.variant(output_dim, channel_width=channel_width).to_dict())
    model = ppb.BigGAN(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        randomise_statistics_and_gains(model, g)
        # One training-mode forward = one power iteration: u, v move off their random start
        # but stay unconverged, so sigma from (u, v) is not the true spectral norm.
        model.train()
        model(torch.randn(2, cfg.z_dim, generator=g), torch.softmax(torch.randn(2, 1000, generator=g), -1), 0.5)
    model.eval()
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return model, cfg, state_dict


def _inputs(batch, z_dim=128, seed=0):
    rs = np.random.RandomState(seed)
    z = (0.5 * rs.randn(batch, z_dim)).astype(np.float32)
    y = np.zeros((batch, 1000), np.float32)
    y[np.arange(batch), rs.randint(0, 1000, batch)] = 1.0
    y[-1] = np.abs(rs.randn(1000)) / 50  # a soft class vector too
    return z, y


def _random_variables(model, seed=0):
    """Random variables of the right shapes, filled in numpy (compiling `init` takes far longer on CPU)."""
    rng = np.random.default_rng(seed)
    return {col: jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape) + (col == "batch_stats")).astype(
        np.float32), tree) for col, tree in model.init_shapes().items()}


def _ref_out(model, z, y, t):
    with torch.no_grad():
        return model(torch.from_numpy(z), torch.from_numpy(y), t).numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def small():
    ref, tcfg, sd = _reference(128, 16)
    cfg = BigGANConfig.from_dict(tcfg.to_dict())
    model = BigGANDeep(cfg)
    traces = []

    def fwd(variables, z, y, ts):
        traces.append(1)
        return model.apply(variables, z, y, ts)

    return dict(ref=ref, cfg=cfg, sd=sd, model=model, variables=torch_to_flax(sd, cfg),
                fwd=jax.jit(fwd), traces=traces)


def test_matches_reference_at_several_truncations_without_recompiling(small):
    z, y = _inputs(3)
    for t in TRUNCATIONS:
        ref = _ref_out(small["ref"], z, y, t)
        assert np.abs(ref).max() < 0.99 and ref.std() > 0.2  # not saturated: the comparison means something
        out = np.asarray(small["fwd"](small["variables"], z, y, small["model"].stats(t)))
        assert out.shape == (3, 128, 128, 3)
        np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0, err_msg=f"truncation {t}")
    assert len(small["traces"]) == 1


def test_truncation_stats_follow_the_reference():
    ts = truncation_stats(0.4)
    assert ts.index.tolist() == [20, 20] and ts.weight.tolist() == [1.0, 0.0]
    ts = truncation_stats(1.0)
    assert ts.index.tolist() == [50, 50] and ts.weight.tolist() == [1.0, 0.0]
    ts = truncation_stats(0.55)
    assert ts.index.tolist() == [27, 28] and np.allclose(ts.weight, [0.5, 0.5])
    ts = truncation_stats(0.731)  # the fractional part weighs the *lower* step
    assert ts.index.tolist() == [36, 37] and np.allclose(ts.weight, [0.55, 0.45])
    ts = truncation_stats(0.56)  # a hair above step 28: (almost) all weight on step 29
    assert ts.index.tolist() == [28, 29] and ts.weight[1] > 0.999999
    ts = truncation_stats(0.58)  # a hair below step 29: (almost) all weight on step 28
    assert ts.index.tolist() == [28, 29] and ts.weight[0] > 0.999999
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="truncation"):
            truncation_stats(bad)


def test_statistics_and_spectral_norm_vectors_matter(small):
    """Swapping the interpolation weights, or ignoring u/v, would be caught by the 1e-4 comparison."""
    z, y = _inputs(3)
    ts = small["model"].stats(0.731)
    good = np.asarray(small["fwd"](small["variables"], z, y, ts))
    swapped = TruncationStats(ts.index, ts.weight[::-1].copy())
    assert np.abs(np.asarray(small["fwd"](small["variables"], z, y, swapped)) - good).max() > 1e-2
    w = small["sd"]["generator.layers.0.conv_1.weight_orig"]
    w = w.reshape(w.shape[0], -1).astype(np.float64)
    u = small["sd"]["generator.layers.0.conv_1.weight_u"]
    v = small["sd"]["generator.layers.0.conv_1.weight_v"]
    assert abs(u @ w @ v / np.linalg.norm(w, 2) - 1) > 0.01


def test_traced_truncation_is_refused_with_advice(small):
    z, y = _inputs(1)
    f = jax.jit(lambda t: small["model"].apply(small["variables"], z, y, t))
    with pytest.raises(TypeError, match="stats"):
        f(jnp.float32(0.5))


def test_bf16_compute_is_close_to_fp32(small):
    z, y = _inputs(3)
    ts = small["model"].stats(0.55)
    fp32 = np.asarray(small["fwd"](small["variables"], z, y, ts))
    bf16 = np.asarray(jax.jit(BigGANDeep(small["cfg"], dtype=jnp.bfloat16).apply)(small["variables"], z, y, ts))
    assert bf16.dtype == np.float32
    diff = np.abs(bf16 - fp32)
    assert diff.max() < BF16_MAX_TOL and diff.mean() < BF16_MEAN_TOL, (diff.max(), diff.mean())


def test_truncated_noise():
    a = truncated_noise(jax.random.PRNGKey(0), 4, 128, 0.4)
    assert a.shape == (4, 128) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 0.8 + 1e-6 and float(a.std()) > 0.2
    np.testing.assert_array_equal(a, truncated_noise(jax.random.PRNGKey(0), 4, 128, 0.4))
    assert not np.array_equal(a, truncated_noise(jax.random.PRNGKey(1), 4, 128, 0.4))


def test_tiny_config_integer_labels_equal_one_hot():
    cfg = BigGANConfig(output_dim=8, channel_width=4, num_classes=10,
                       layers=((True, 16, 8), (False, 8, 4), (False, 4, 2), (False, 2, 1)), attention_layer_position=2)
    model = BigGANDeep(cfg)
    z = truncated_noise(jax.random.PRNGKey(0), 2, 128, 0.5)
    labels = np.array([3, 9])
    variables = _random_variables(model)
    apply = jax.jit(model.apply)  # eager op-by-op dispatch of the many small ops is far slower
    a = apply(variables, z, labels, model.stats(0.5))
    b = apply(variables, z, np.eye(10, dtype=np.float32)[labels], model.stats(0.5))
    assert a.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="halve"):
        BigGANConfig(output_dim=8, layers=((True, 16, 4), (False, 4, 1)))


def test_manifest_of_the_real_256_checkpoint_converts_completely():
    with open(MANIFEST) as f:
        manifest = json.load(f)
    assert len(manifest) == 602
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(tuple(shape), dtype=np.float32) for k, shape in manifest.items()}
    for k in sd:
        if k.endswith(".weight_orig"):  # keep every sigma well away from 0
            sd[k] = np.abs(sd[k])
        elif k.endswith((".weight_u", ".weight_v")):
            sd[k] = np.abs(sd[k]) / math.sqrt(sd[k].size)
    assert infer_variant(sd) == 256
    variables = torch_to_flax(sd, BigGANConfig.variant(256))
    expected = {k: v.shape for k, v in flatten_with_names(BigGANDeep(BigGANConfig.variant(256)).init_shapes()).items()}
    got = {k: v.shape for k, v in flatten_with_names(variables).items()}
    assert got == expected
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))


def test_bad_state_dicts_are_named(small):
    sd, cfg = small["sd"], small["cfg"]
    with pytest.raises(PortError, match="generator.layers.99.extra"):
        torch_to_flax({**sd, "generator.layers.99.extra": np.zeros(3, np.float32)}, cfg)
    bad = dict(sd)
    bad["generator.layers.3.conv_1.weight_orig"] = np.zeros((5, 5, 3, 3), np.float32)
    with pytest.raises(PortError, match=r"generator\.layers\.3\.conv_1\.weight_orig"):
        torch_to_flax(bad, cfg)
    missing = {k: v for k, v in sd.items() if k != "generator.bn.running_vars"}
    with pytest.raises(PortError, match="generator.bn.running_vars"):
        torch_to_flax(missing, cfg)
    with pytest.raises(PortError, match=r"generator\.gen_z\.weight_orig"):  # small weights, preset config
        torch_to_flax(sd, BigGANConfig.variant(128))


def test_orbax_round_trip_from_pretrained_layout(small, tmp_path):
    src = tmp_path / "biggan"
    src.mkdir()
    # The published .bin files use torch's legacy (non-zip) serialisation.
    torch.save({k: torch.from_numpy(v) for k, v in small["sd"].items()}, src / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (src / "config.json").write_text(json.dumps(small["cfg"].to_dict()))
    dst = convert(src, tmp_path / "out")
    module, variables = load_biggan(dst)
    assert module.config == small["cfg"]
    jax.tree.map(np.testing.assert_array_equal, variables, small["variables"])
    with pytest.raises(ValueError, match="variant"):
        convert(src, tmp_path / "out2", variant=256)
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nowhere", tmp_path / "out3")


@pytest.mark.slow
def test_matches_reference_full_256():
    ref, tcfg, sd = _reference(256, 128)
    cfg = BigGANConfig.from_dict(tcfg.to_dict())
    assert cfg == BigGANConfig.variant(256)
    assert {k: v.shape for k, v in sd.items()} == {k: tuple(s) for k, s in json.load(open(MANIFEST)).items()}
    model = BigGANDeep(cfg)
    variables = torch_to_flax(sd, cfg)
    fwd = jax.jit(model.apply)
    z, y = _inputs(2)
    for t in (0.55, 1.0):
        out = np.asarray(fwd(variables, z, y, model.stats(t)))
        np.testing.assert_allclose(out, _ref_out(ref, z, y, t), atol=FP32_TOL, rtol=0, err_msg=f"truncation {t}")
    bf16 = np.asarray(jax.jit(BigGANDeep(cfg, dtype=jnp.bfloat16).apply)(variables, z, y, model.stats(1.0)))
    diff = np.abs(bf16 - out)
    assert diff.max() < BF16_MAX_TOL and diff.mean() < BF16_MEAN_TOL, (diff.max(), diff.mean())
