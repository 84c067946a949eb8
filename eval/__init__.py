if __name__ != "loreun.eval":
    raise ImportError(f"this folder installs as 'loreun.eval', not {__name__!r}: pip install -e .")
