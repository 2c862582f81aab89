"""Test-only packages the harnesses use (the package's `test` extra:
Hypothesis, openai, selenium). A harness imports them through `need` when it
runs, never when its module is merely imported by another harness, so that
`mlx_kvq.reliability` and the benchmarks start without the extra and a missing
package is reported by name with the command that installs it."""

import importlib

INSTALL = "pip install 'mlx-kvq[test]'"


class MissingExtra(ImportError):
    """A harness needs a package of the `test` extra that is not installed."""


def need(module: str, what: str):
    """Import `module` (a test-only package or one of its modules) for `what`
    (a harness, for the message); MissingExtra naming the package and how to
    install it if it is missing."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.partition(".")[0] != package:
            raise  # something the package itself needs: its own message says what
        raise MissingExtra(
            f"{what} needs the package {package!r}, which is not installed; install the "
            f"test extra: {INSTALL}", name=package) from e
