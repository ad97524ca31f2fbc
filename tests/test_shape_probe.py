"""The digit probe that judges a CGN's shape mechanism, on real MNIST and the official weights."""

import json

import jax
import numpy as np
import pytest

from cgn_jax import shape_probe
from cgn_jax.data import idx
from cgn_jax.models import mnist_cgn
from cgn_jax.port import mnist as port_mnist

N_TRAIN = 12_800


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return idx.load_mnist(mnist_dir)


@pytest.fixture(scope="module")
def probe(mnist):
    x = shape_probe.binarised_digits(mnist["train_images"][:N_TRAIN])
    return shape_probe.train_probe(x, mnist["train_labels"][:N_TRAIN], jax.random.PRNGKey(0), epochs=3)


def test_probe_reads_real_digits(mnist, probe):
    x = shape_probe.binarised_digits(mnist["test_images"][:2000])
    assert set(np.unique(x)) == {0, 1} and x.shape == (2000, 32, 32, 1)
    acc = (shape_probe.predict(probe, x) == mnist["test_labels"][:2000]).mean()
    assert acc > 0.93, acc


def test_official_masks_read_as_their_digits_and_random_ones_do_not(cgn_weights, probe):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "colored_MNIST.pth")
    official = shape_probe.mask_report(mnist_cgn.MnistCGN(), variables, probe, jax.random.PRNGKey(1), per_class=100)
    assert set(official) == {"digit_accuracy", "area", "non_binary", "variety", "frame_mean"}
    assert all(v.shape == (10,) for v in official.values())
    assert official["digit_accuracy"].mean() > 0.8, official["digit_accuracy"]
    assert (official["frame_mean"] < 0.2).all() and (official["area"] > 0.03).all() and (official["area"] < 0.4).all()
    assert (official["variety"] > 2).all()  # different noise, different strokes

    model = mnist_cgn.MnistCGN()
    untrained = shape_probe.mask_report(model, mnist_cgn.init_variables(model, jax.random.PRNGKey(2)), probe,
                                        jax.random.PRNGKey(1), per_class=100)
    assert untrained["digit_accuracy"].mean() < 0.4, untrained["digit_accuracy"]

    table = shape_probe.format_report(official).splitlines()
    assert len(table) == 2 + 10 + 1 and table[-1].strip().startswith("mean")
    assert f"{100 * official['digit_accuracy'].mean():.1f}" in table[-1]


@pytest.mark.parametrize("variant", ["colored", "double_colored"])
def test_generate_mask_report_cli(variant, cgn_weights, mnist, monkeypatch, tmp_path):
    from cgn_jax.cli import main

    small = {k: v[:N_TRAIN] if k.startswith("train") else v[:1000] for k, v in mnist.items()}
    monkeypatch.setattr(idx, "load_mnist", lambda *a, **k: small)  # the CLI's probe trains on a subset here
    out = tmp_path / "report"
    extra = ["--colour-jitter", "0.02"] if variant == "double_colored" else []
    rc = main(["generate", f"--config=configs/mnist.py:{variant}", "--checkpoint",
               str(cgn_weights / f"{variant}_MNIST.pth"), "--mask-report", "--out", str(out), *extra])
    assert rc == 0
    report = json.loads((out / "mask_report.json").read_text())
    assert report["probe_test_accuracy"] > 0.9 and len(report["digit_accuracy"]) == 10
    assert np.mean(report["digit_accuracy"]) > 0.8
    assert not (out / f"counterfactuals_{variant}.png").exists()  # --mask-report alone writes no sheet
    # double-colored: the edge where digit and background colours coincide, next to the real test split's
    contrast = report.get("cues_alike_contrast")
    if variant == "colored":
        assert contrast is None
    else:
        assert contrast["colour_jitter"] == 0.02 and 900 < contrast["real_test"]["n"] < 1100
        assert contrast["counterfactuals"]["median"] > contrast["real_test"]["median"]


def test_probe_needs_a_batch_of_images():
    with pytest.raises(ValueError, match="at least 128 images"):
        shape_probe.train_probe(np.zeros((10, 32, 32, 1), np.uint8), np.zeros(10, int), jax.random.PRNGKey(0))
