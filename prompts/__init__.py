if __name__ != "loreun.prompts":
    raise ImportError(
        f"this folder installs as 'loreun.prompts', not {__name__!r}: pip install -e ."
    )
