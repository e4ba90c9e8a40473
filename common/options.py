"""Click option types the command lines share."""
from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf: a comparison with nan is never false, so click's
    bounds let `--lr nan` through (and `--epochs inf` then fails deep inside with a traceback)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
