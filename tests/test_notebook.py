"""The counterfactuals notebook runs top to bottom (tiny settings) and draws its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "counterfactuals.ipynb"


def test_counterfactuals_notebook_executes(monkeypatch, cgn_weights):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    assert (cgn_weights / "colored_MNIST.pth").is_file()
    # the kernel inherits the environment: CPU, two noise samples, no widgets, the default (ported) generator
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("CGN_NOTEBOOK_N_NOISE", "2")
    monkeypatch.setenv("CGN_NOTEBOOK_WIDGETS", "0")
    monkeypatch.delenv("CGN_NOTEBOOK_GENERATOR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "GENERATOR_DIR" in params[0].source
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) >= 5  # two grids, masks, mask statistics, the single example
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "generator from" in text and "% of mask pixels" in text
    assert "masks the right way round for all 10 classes" in text  # the official colored CGN
