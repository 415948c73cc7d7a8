"""Command-line interface: ``perturbax <command>``, a thin shell over the Python API."""

from __future__ import annotations

import importlib

import click

from perturbax import __version__

__all__ = ["main"]

# (command name, module, attribute): imported lazily so `perturbax --help` starts fast.
_COMMANDS = {
    "check-design": ("perturbax.cli.check_design", "check_design"),
    "demo": ("perturbax.cli.demo", "demo"),
    "evaluate": ("perturbax.cli.evaluate", "evaluate"),
    "fit": ("perturbax.cli.fit", "fit"),
    "predict": ("perturbax.cli.predict", "predict"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="perturbax")
def main() -> None:
    """perturbax: predict single-cell perturbation responses with uncertainty."""
