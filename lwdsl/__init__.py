"""lwdsl: plan, solve, apply and gate the lightweighting of large language models.

The facade (`parse`, `validate`, `solve`, `apply`, `check`, `load`) is filled in by the stages as
they land; each import is lazy so that `import lwdsl` stays light (no torch, no solver).
"""
from __future__ import annotations

__version__ = "0.1.0"
