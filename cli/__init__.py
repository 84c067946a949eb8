if __name__ != "loreun.cli":
    raise ImportError(f"this folder installs as 'loreun.cli', not {__name__!r}: pip install -e .")
