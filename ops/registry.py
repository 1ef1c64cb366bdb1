"""The common shape of a registered method (an attack, a purifier): a name, its module, a summary and its published
defaults, with lazy loading and the merge of user-given parameters. Stdlib-only, so CLI modules may list methods
without importing torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)

    ranges: dict[str, Any] = field(default_factory=dict)  # per-method overrides of the kind's range table

    selector: ClassVar[str] = "--method"  # the flag that picks the method, for error messages
    range_table: ClassVar[dict[str, Any]] = {}  # valid ranges of parameters by name (ops.validate)

    def load(self):
        """Import the method's module (a sibling of the package that defines the spec class)."""
        return importlib.import_module(f"{type(self).__module__}.{self.module}")

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Merge user-given parameters (``None`` = not given) over the defaults; reject ones that do not apply or
        lie outside their valid range (:mod:`ops.validate`)."""
        from .errors import UsageError
        from .validate import check_params

        params = dict(self.defaults)
        for key, value in given.items():
            if value is None:
                continue
            if key not in self.defaults:
                applies = ", ".join("--" + k.replace("_", "-") for k in sorted(self.defaults)) or "none"
                raise UsageError(f"--{key.replace('_', '-')} does not apply to {self.selector} {self.name} "
                                 f"(its parameters: {applies})")
            params[key] = value
        check_params(params, self.range_table, self.ranges)
        return params
