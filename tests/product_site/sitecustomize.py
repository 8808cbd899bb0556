"""What the pacs-edge processes the tests start may import: what a box has.

numpy and Pillow are test extras (tests/dicomgen.py draws phantoms with numpy,
the viewer test reads screenshots with Pillow), not dependencies of pacs-edge.
Installed in the same venv, pydicom finds numpy and loads it, with its pixel
handlers, at every start of a pacs-edge process: ~0.3 s of CPU each, which a
box never pays, thousands of times a suite. The tests put this folder on
PYTHONPATH for their subprocesses (conftest.product_imports), so those import
as on a box: an import of numpy or PIL by the product fails here as it would
there.
"""

import sys

for _name in ("numpy", "PIL"):
    sys.modules[_name] = None  # type: ignore[assignment]
