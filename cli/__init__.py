"""The ``cloak`` command line: a thin typer layer over :mod:`cloaklab.ops`.

Modules here import only the standard library and typer at module level; torch, diffusers and ops are imported in
command bodies so ``cloak --help`` and shell completion stay fast.
"""
