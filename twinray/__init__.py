"""twinray: fast self-supervised pretraining on chest X-rays.

One installed name, four packages. The code lives in the repository's top-level folders, one per step of the data
flow, and is imported under this package only:

    twinray.prep       <- prep/        raw files to the packed format
    twinray.pipelines  <- pipelines/   packed data to augmented views on the device
    twinray.train      <- train/       pretraining and downstream tools
    twinray.bench      <- bench/       measured speed

An install (``pip install -e .`` or a wheel) maps the folders through pyproject's ``package-dir``. Run from a
checkout without installing (``PYTHONPATH=.``), this file points the package's search path at the repository root
instead, so the same imports work. docs/architecture.md explains the choice.
"""

from pathlib import Path

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
if not (_here / "prep").is_dir() and (_here.parent / "prep" / "__init__.py").is_file():
    # A source checkout: twinray/ sits beside prep/, pipelines/, train/ and bench/.
    __path__.append(str(_here.parent))  # noqa: F821 (a package's own __path__)
