if __name__ != "loreun.pipelines":
    raise ImportError(
        f"this folder installs as 'loreun.pipelines', not {__name__!r}: pip install -e ."
    )

__all__ = ["apply_erased_weights", "load_erased_pipeline", "load_pipeline"]


def __getattr__(name):
    # loading imports torch; load it only when asked, so torch-free modules of this package
    # (files, generate_settings) serve the CLI's --help without it.
    if name in ("apply_erased_weights", "load_erased_pipeline"):
        from . import loading

        return getattr(loading, name)
    if name == "load_pipeline":
        from .models import load_pipeline

        return load_pipeline
    raise AttributeError(name)
