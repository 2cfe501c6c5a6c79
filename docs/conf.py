"""Sphinx configuration of the fedrnd documentation site.

Build (from the repository root; warnings are errors)::

    python3 -m pip install -e ".[docs]"
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST Markdown; the notebooks under ``notebooks/`` are executed during the build
(myst-nb, results cached under ``docs/_build/.jupyter_cache``) and shown with their outputs.
The config reference is generated from the code by ``docs/_ext/fedrnd_reference.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

import fedrnd  # noqa: E402

project = "fedrnd"
author = "the fedrnd authors"
copyright = "the fedrnd authors; Apache License 2.0"
version = release = fedrnd.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "fedrnd_reference",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "results/*.py", "**/.ipynb_checkpoints"]
templates_path: list[str] = []

# --- MyST ---------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# --- notebooks ----------------------------------------------------------------------------
# The notebooks live in notebooks/ (outside this folder); they are copied into
# docs/notebooks/ (ignored by git) before the build reads its sources. "cache" executes a
# notebook only when its code changed since the last build.
nb_execution_mode = os.environ.get("FEDRND_DOCS_EXECUTE", "cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_in_temp = True  # run directories the notebooks make stay out of the repository
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_merge_streams = True

NOTEBOOKS_SRC = ROOT / "notebooks"
NOTEBOOKS_DST = DOCS / "notebooks"


def _copy_notebooks() -> None:
    NOTEBOOKS_DST.mkdir(exist_ok=True)
    for nb in sorted(NOTEBOOKS_SRC.glob("*.ipynb")):
        dst = NOTEBOOKS_DST / nb.name
        if not dst.exists() or dst.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, dst)


_copy_notebooks()


def _kernel_for_this_python() -> None:
    """Run the notebooks with this interpreter: a ``python3`` kernelspec for
    ``sys.executable`` first on ``JUPYTER_PATH``, so a user-level ``python3`` kernel pointing at
    another Python cannot shadow it (tests/test_notebooks.py does the same)."""
    spec = DOCS / "_build" / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fedrnd docs)", "language": "python"}))
    paths = [str(DOCS / "_build" / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in paths if p)
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


_kernel_for_this_python()

# --- API reference ------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # signatures carry them; descriptions stay readable
autodoc_class_signature = "separated"
autodoc_inherit_docstrings = False
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# --- HTML ---------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"fedrnd {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# Links from these pages into the repository (results files, configs, source) point at the
# files themselves; in the HTML site they become links to the repository's copy when
# FEDRND_DOCS_REPO_URL is set (e.g. https://github.com/OWNER/fedrnd/blob/main), else
# downloadable copies of the files.
fedrnd_repo_url = os.environ.get("FEDRND_DOCS_REPO_URL", "")
