"""Where model versions registered before 2026-12-02 find the served model: their models-from-code
file (``pyfunc_entry.py``, stored in each version) imports ``pipelines.pyfunc_model``. The model
lives in :mod:`pipelines.serving.pyfunc_model`; this keeps those versions loadable and servable."""

from pipelines.serving.pyfunc_model import AsdPyfuncModel

__all__ = ["AsdPyfuncModel"]
