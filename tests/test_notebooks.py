"""The notebooks run top to bottom on CPU (DETJAX_BACKEND=interpret), and are committed stripped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["quickstart.ipynb", "where_nondeterminism_comes_from.ipynb"]
TIMEOUT_S = 600  # per cell; a notebook takes ~30-90 s on two shared CPU cores


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel is started from this interpreter (ipykernel's native 'python3' spec resolves to
    sys.executable) and inherits this environment: the checkout on PYTHONPATH, the interpreter
    backend, the non-interactive matplotlib backend."""
    monkeypatch.setenv("DETJAX_BACKEND", "interpret")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _kernel_manager():
    from jupyter_client.manager import KernelManager
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec
    km = KernelManager(kernel_name="python3")
    # Always this interpreter, whatever other 'python3' kernelspecs the machine has installed.
    km._kernel_spec = KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
    km.kernel_spec.argv[0] = sys.executable
    return km


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: strip the outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     km=_kernel_manager(),
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    t0 = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
    if name == "quickstart.ipynb":
        assert "row 7 alone == row 7 in the batch: True" in text
        assert "row 2 alone == row 2 in the batch: True" in text and "'attention: q" in text
        assert "restored logits bitwise equal: True" in text
        assert "logprobs bitwise equal True" in text
    else:
        assert "first divergence" in text  # plain XLA model
        assert "no divergence" in text     # detjax block
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
