"""The MNIST discriminators: shapes, their RNG use, device-split invariance and the official architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.models.discriminators import (ConvDiscriminator, LinearDiscriminator, from_config, init_variables,
                                           make_discriminator)

B = 8
LIN_NDF, CONV_NDF = 32, 8  # small, and shared by the tests so each shape compiles once


@pytest.fixture(scope="module")
def lin():
    d = LinearDiscriminator(ndf=LIN_NDF)
    return d, init_variables(d, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def conv():
    d = ConvDiscriminator(ndf=CONV_NDF)
    return d, init_variables(d, jax.random.PRNGKey(0))


def _batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    return x, y


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_output_shape_and_collections(kind, lin, conv):
    d, variables = lin if kind == "linear" else conv
    ndf = d.ndf
    x, y = _batch()
    out = d.apply(variables, x, y, train=False)
    assert out.shape == (B,) and out.dtype == jnp.float32
    assert ("batch_stats" in variables) == (kind == "conv")
    if kind == "linear":
        assert variables["params"]["fc1"]["kernel"].shape == (32 * 32 * 3 + 10, ndf)
        assert variables["params"]["label_emb"]["embedding"].shape == (10, 10)
        assert variables["params"]["fc4"]["kernel"].shape == (ndf, 1)
    else:
        shapes = {k: v["kernel"].shape for k, v in variables["params"].items() if k.startswith("conv")}
        assert shapes == {"conv1": (3, 3, 4, ndf), "conv2": (3, 3, ndf, 2 * ndf), "conv3": (4, 4, 2 * ndf, 4 * ndf),
                          "conv4": (4, 4, 4 * ndf, 4 * ndf), "conv_out": (1, 1, 4 * ndf, 1)}
        assert all("bias" not in v for k, v in variables["params"].items() if k.startswith("conv"))
        assert variables["params"]["label_emb"]["embedding"].shape == (10, 1)


def test_from_config_uses_the_variant_settings():
    from cgn_jax.configs.mnist import get_config

    assert isinstance(from_config(get_config("colored")), LinearDiscriminator)
    d = from_config(get_config("wildlife"))
    assert isinstance(d, ConvDiscriminator) and d.ndf == 32
    with pytest.raises(ValueError, match="unknown discriminator kind 'mlp'"):
        make_discriminator("mlp", 10, 8)


def test_dropout_draws_from_its_own_rng_stream(lin):
    d, variables = lin
    x, y = _batch()

    def run(seed):
        return d.apply(variables, x, y, train=True, rngs={"dropout": jax.random.PRNGKey(seed)})

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    # evaluation is deterministic and needs no dropout key
    np.testing.assert_array_equal(d.apply(variables, x, y, train=False), d.apply(variables, x, y))
    with pytest.raises(Exception, match="dropout"):
        d.apply(variables, x, y, train=True)
    # without dropout the training output is the evaluation output
    d0 = LinearDiscriminator(ndf=LIN_NDF, dropout=0.0)
    np.testing.assert_allclose(d0.apply(variables, x, y, train=True), d.apply(variables, x, y), rtol=1e-6)


def test_dropout_mask_follows_the_example_not_its_position(lin):
    """A batch split in two (as over two devices) drops the same units as the whole batch."""
    d, variables = lin
    x, y = _batch()
    rngs = {"dropout": jax.random.PRNGKey(3)}
    whole = d.apply(variables, x, y, train=True, rngs=rngs)
    h = B // 2
    first = d.apply(variables, x[:h], y[:h], train=True, rngs=rngs, example_ids=jnp.arange(h))
    second = d.apply(variables, x[h:], y[h:], train=True, rngs=rngs, example_ids=jnp.arange(h, B))
    np.testing.assert_allclose(jnp.concatenate([first, second]), whole, rtol=1e-5, atol=1e-6)


def test_conv_batchnorm_statistics_span_the_device_axis(conv):
    """With `axis_name`, a split batch normalises with the statistics of the whole batch."""
    x, y = _batch()
    d, variables = conv
    whole, upd = d.apply(variables, x, y, train=True, mutable=["batch_stats"])
    d_split = ConvDiscriminator(ndf=CONV_NDF, axis_name="dev")
    split, upd_split = jax.vmap(
        lambda xs, ys: d_split.apply(variables, xs, ys, train=True, mutable=["batch_stats"]),
        axis_name="dev")(x.reshape(2, B // 2, 32, 32, 3), y.reshape(2, B // 2))
    np.testing.assert_allclose(split.reshape(B), whole, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6), upd_split, upd)


def test_initialisation_matches_the_official_modules(lin, conv):
    lin, conv = lin[1]["params"], conv[1]["params"]
    fan_in = 32 * 32 * 3 + 10
    bound = 1 / np.sqrt(fan_in)  # PyTorch's default nn.Linear init
    kernel, bias = np.abs(lin["fc1"]["kernel"]), np.abs(lin["fc1"]["bias"])
    assert bound * 0.99 < kernel.max() <= bound and 0 < bias.max() <= bound
    assert np.std(lin["label_emb"]["embedding"]) == pytest.approx(1.0, abs=0.3)  # nn.Embedding: N(0, 1)
    assert np.std(conv["conv3"]["kernel"]) == pytest.approx(0.02, rel=0.05)  # official init_net: N(0, 0.02)
    scales = np.concatenate([conv[f"bn{i}"]["scale"] for i in (1, 2, 3, 4)])  # BatchNorm weight ~ N(1, 0.02)
    assert np.mean(scales) == pytest.approx(1.0, abs=0.01)
    assert np.std(scales) == pytest.approx(0.02, rel=0.3)


def test_bfloat16_compute_keeps_float32_params(lin, conv):
    for ref, variables in (lin, conv):
        d = ref.clone(dtype=jnp.bfloat16)
        assert jax.tree.structure(jax.eval_shape(lambda: init_variables(d, jax.random.PRNGKey(0)))) == \
            jax.tree.structure(variables)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
        x, y = _batch()
        out = d.apply(variables, x, y, train=False)
        assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref.apply(variables, x, y, train=False), rtol=0.1, atol=0.05)


# ------------------------------------------------------------ against the official PyTorch architectures

def _torch_official(kind, ndf):
    """The official `mnists/models/discriminator.py` modules, written out layer by layer."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class DiscLin(nn.Module):
        def __init__(self):
            super().__init__()
            self.label_embedding = nn.Embedding(10, 10)
            self.model = nn.Sequential(
                nn.Linear(10 + 3 * 32 * 32, ndf), nn.LeakyReLU(0.2),
                nn.Linear(ndf, ndf), nn.Dropout(0.4), nn.LeakyReLU(0.2),
                nn.Linear(ndf, ndf), nn.Dropout(0.4), nn.LeakyReLU(0.2),
                nn.Linear(ndf, 1))

        def forward(self, img, labels):
            return self.model(torch.cat((img.view(img.size(0), -1), self.label_embedding(labels)), -1)).squeeze()

    class DiscConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.label_embedding = nn.Embedding(10, 1)

            def block(cin, cout, ks, st):
                return [nn.Conv2d(cin, cout, ks, stride=st, padding=0, bias=False), nn.BatchNorm2d(cout),
                        nn.LeakyReLU(0.2)]

            self.model = nn.Sequential(*block(4, ndf, 3, 1), *block(ndf, ndf * 2, 3, 1),
                                       *block(ndf * 2, ndf * 4, 4, 2), *block(ndf * 4, ndf * 4, 4, 2),
                                       nn.AvgPool2d(3), nn.Conv2d(ndf * 4, 1, 1, bias=False))

        def forward(self, ims, labels):
            emb = self.label_embedding(labels).reshape(-1, 1, 1, 1).repeat(1, 1, *ims.shape[-2:])
            return self.model(torch.cat([ims, emb], 1)).squeeze()

    return torch, (DiscLin() if kind == "linear" else DiscConv())


def _t(x):
    return np.array(x.detach().numpy(), copy=True)  # torch updates BatchNorm statistics in place


@pytest.mark.parametrize("kind,ndf", [("linear", LIN_NDF), ("conv", CONV_NDF)])
def test_matches_official_pytorch_module(kind, ndf):
    torch, tm = _torch_official(kind, ndf)
    torch.manual_seed(0)
    x, y = _batch(1)
    xt, yt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.array(y)).long()
    sd = {k: _t(v) for k, v in tm.state_dict().items()}
    if kind == "linear":
        w1 = sd["model.0.weight"]
        img = w1[:, :3072].reshape(ndf, 3, 32, 32).transpose(2, 3, 1, 0).reshape(3072, ndf)  # CHW -> HWC rows
        params = {"label_emb": {"embedding": sd["label_embedding.weight"]},
                  "fc1": {"kernel": np.concatenate([img, w1[:, 3072:].T]), "bias": sd["model.0.bias"]}}
        for name, idx in (("fc2", 2), ("fc3", 5), ("fc4", 8)):
            params[name] = {"kernel": sd[f"model.{idx}.weight"].T, "bias": sd[f"model.{idx}.bias"]}
        variables = {"params": params}
        d = LinearDiscriminator(ndf=ndf)
    else:
        with torch.no_grad():  # non-trivial BatchNorm parameters and running statistics
            for m in tm.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
        sd = {k: _t(v) for k, v in tm.state_dict().items()}
        params, stats = {"label_emb": {"embedding": sd["label_embedding.weight"]}}, {}
        for i, idx in enumerate((0, 3, 6, 9), start=1):
            params[f"conv{i}"] = {"kernel": sd[f"model.{idx}.weight"].transpose(2, 3, 1, 0)}
            params[f"bn{i}"] = {"scale": sd[f"model.{idx + 1}.weight"], "bias": sd[f"model.{idx + 1}.bias"]}
            stats[f"bn{i}"] = {"mean": sd[f"model.{idx + 1}.running_mean"], "var": sd[f"model.{idx + 1}.running_var"]}
        params["conv_out"] = {"kernel": sd["model.13.weight"].transpose(2, 3, 1, 0)}
        variables = {"params": params, "batch_stats": stats}
        d = ConvDiscriminator(ndf=ndf)
    expected = jax.eval_shape(lambda: init_variables(d, jax.random.PRNGKey(0)))
    assert jax.tree.structure(expected) == jax.tree.structure(variables)
    tm.eval()
    np.testing.assert_allclose(d.apply(variables, x, y, train=False), _t(tm(xt, yt)), rtol=1e-4, atol=1e-5)
    if kind == "conv":  # training mode: batch statistics, and the same running-statistics update
        tm.train()
        out_t = _t(tm(xt, yt))
        out, upd = d.apply(variables, x, y, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out, out_t, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(upd["batch_stats"]["bn2"]["mean"], _t(tm.model[4].running_mean), rtol=1e-4,
                                   atol=1e-6)
        # PyTorch updates the running variance with the unbiased batch variance, flax with the biased one
        n = B * 28 * 28
        np.testing.assert_allclose(upd["batch_stats"]["bn2"]["var"], _t(tm.model[4].running_var), rtol=2 / n + 1e-3)
