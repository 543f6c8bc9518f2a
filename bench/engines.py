"""Worker engines for benchmarks: trivial scripts, so what is measured is the path, not a script."""


def echo(script: str, context) -> str:
    """Return the script text itself."""
    return script
