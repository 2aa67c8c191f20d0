"""The Ray runtime of eventray: partition actors, the driver, Ray Jobs, the CLI.

Importing this package does not import Ray: the CLI sets Ray's environment (loopback,
token auth) first, and only then loads the modules that use it.
"""

__all__ = ["main", "run_job"]


def __getattr__(name: str):  # lazy, so `import cluster` never imports ray
    if name == "main":
        from cluster.cli import main

        return main
    if name == "run_job":
        from cluster.job import run_job

        return run_job
    raise AttributeError(name)
