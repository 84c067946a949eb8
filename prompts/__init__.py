if __name__ != "loreun.prompts":
    raise ImportError(
        f"this folder installs as 'loreun.prompts', not {__name__!r}: pip install -e ."
    )

from .reader import BUNDLED, PromptRow, load_prompts  # noqa: E402

__all__ = ["BUNDLED", "PromptRow", "load_prompts"]
