"""Expected faults. The CLI prints them as one line (``--debug`` adds the traceback) and exits with ``exit_code``."""

from __future__ import annotations


class CloakError(Exception):
    """A fault the user can fix; the message says what was wrong and what to do."""

    exit_code = 1


class UsageError(CloakError):
    """Bad arguments or an impossible call shape (exit 2)."""

    exit_code = 2


class ModelNotFoundError(CloakError):
    """Weights that are not on this machine (and cannot be downloaded)."""

    exit_code = 1


class RejectedInput(CloakError):
    """One input file that cannot be processed; the others go on (exit 3 at the end)."""

    exit_code = 3


class MissingExtraError(ModelNotFoundError):
    """A package of an optional extra (``pip install 'cloaklab[NAME]'``) that is not installed (exit 1)."""
