"""Access to the repository's PyTorch exporter, ``tools/laplace_export.py``.

The exporter (``export(model, example_input, out_dir, output_key=None)`` →
``model.json`` + ``weights.safetensors``) is not part of the wheel for now: it
is imported from the laplace-rs repository's ``tools/`` directory, found as

1. ``$LAPLACE_RS_TOOLS`` (the ``tools/`` directory, or the path of
   ``laplace_export.py`` itself), if set;
2. ``<package>/../../tools`` (an editable install or ``PYTHONPATH=python``:
   the package lives in the repository);
3. the source directory that ``pip install ./python`` recorded in the
   distribution's ``direct_url.json`` (``file:///.../python`` → its parent's
   ``tools/``).

A wheel installed elsewhere needs ``LAPLACE_RS_TOOLS``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

_MODULE = None


def _candidates():
    env = os.environ.get("LAPLACE_RS_TOOLS")
    if env:
        yield env[:-len("laplace_export.py")] if env.endswith("laplace_export.py") else env
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, "..", "..", "tools")
    try:
        from importlib.metadata import distribution

        text = distribution("laplace-rs").read_text("direct_url.json")
        if text:
            url = json.loads(text).get("url", "")
            if url.startswith("file://"):
                from urllib.parse import unquote, urlparse

                src = unquote(urlparse(url).path)
                yield os.path.join(src, "..", "tools")
                yield os.path.join(src, "tools")
    except Exception:  # noqa: BLE001 - not installed by pip, or no metadata
        pass


def tools_dir() -> str:
    """The directory holding ``laplace_export.py`` (ImportError if none is found)."""
    tried = []
    for c in _candidates():
        c = os.path.abspath(c)
        tried.append(c)
        if os.path.isfile(os.path.join(c, "laplace_export.py")):
            return c
    raise ImportError(
        "laplace_rs.exporter: tools/laplace_export.py of the laplace-rs repository not found "
        f"(tried {tried}); set LAPLACE_RS_TOOLS to the repository's tools/ directory")


def module():
    """The ``laplace_export`` module (imported once)."""
    global _MODULE
    if _MODULE is None:
        d = tools_dir()
        if "laplace_export" in sys.modules:
            _MODULE = sys.modules["laplace_export"]
        else:
            spec = importlib.util.spec_from_file_location("laplace_export", os.path.join(d, "laplace_export.py"))
            mod = importlib.util.module_from_spec(spec)
            sys.modules["laplace_export"] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules["laplace_export"]
                raise
            _MODULE = mod
    return _MODULE


def export(model, example_input, out_dir, output_key=None, **kwargs):
    """``tools/laplace_export.py``'s ``export``: write ``model.json`` and ``weights.safetensors``."""
    return module().export(model, example_input, out_dir, output_key=output_key, **kwargs)
