"""Griffe extension for the API reference: viax's docstrings head their doctests
``Example:``, which Google style reads as an admonition (so ``>>>`` lines would render
as quotes and their output as Markdown); this reads them as ``Examples:`` sections,
rendered as code.  Sphinx roles (``:class:`X```) become code spans."""

from __future__ import annotations

import re

from griffe import Extension, Object

SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.M)
ROLE = re.compile(r":(?:class|func|mod|meth|attr|obj|data|exc):`~?([^`]+)`")


class ViaxDocstrings(Extension):
    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = SINGULAR.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = ROLE.sub(r"`\1`", text)
