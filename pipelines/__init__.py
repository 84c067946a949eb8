if __name__ != "loreun.pipelines":
    raise ImportError(
        f"this folder installs as 'loreun.pipelines', not {__name__!r}: pip install -e ."
    )

from .loading import apply_erased_weights, load_erased_pipeline  # noqa: E402
from .models import load_pipeline  # noqa: E402

__all__ = ["apply_erased_weights", "load_erased_pipeline", "load_pipeline"]
