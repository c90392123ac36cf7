"""The PyTorch exporter of laplace-rs, for scripts run from the repository.

The exporter itself ships in the Python package, as ``laplace_rs.export``
(``python/laplace_rs/export.py``), so that an installed ``laplace-rs`` wheel
can export models on its own. This file loads that module by path, without
importing ``laplace_rs`` (whose compiled extension a plain checkout does not
have), so ``import laplace_export`` and ``python tools/laplace_export.py``
keep working from ``tools/``, ``bench/`` and ``tools/reference/``.
"""

import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "laplace_rs", "export.py")
_spec = importlib.util.spec_from_file_location("laplace_rs_export", _PATH)
_module = importlib.util.module_from_spec(_spec)
sys.modules["laplace_rs_export"] = _module
_spec.loader.exec_module(_module)

globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})

if __name__ == "__main__":
    raise SystemExit(_module.main() if hasattr(_module, "main") else 0)
