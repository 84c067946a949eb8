if __name__ != "loreun.erase":
    raise ImportError(f"this folder installs as 'loreun.erase', not {__name__!r}: pip install -e .")

from .config import EraseConfig  # noqa: E402  (torch-free)

__all__ = ["EraseConfig", "erase", "TrainingDiverged", "TrainingInterrupted"]


def __getattr__(name):
    # The trainer imports torch; load it only when asked, so the CLI's --help stays fast.
    if name in ("erase", "TrainingDiverged", "TrainingInterrupted"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
