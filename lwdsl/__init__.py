"""lwdsl: plan, solve, apply and gate the lightweighting of large language models.

The facade (`parse`, `validate`, `solve`, `apply`, `check`, `load`) is filled in by the stages as
they land; each import is lazy so that `import lwdsl` stays light (no torch, no solver).
"""
from __future__ import annotations

__version__ = "0.1.0"


def validate(text_or_path) -> list:
    """Every problem of a plan (text, or a path to a `.lwp` file) as `Diagnostic`s; `[]` when it is valid.

    Relative model paths in plan text resolve against the current folder."""
    from lwdsl.plans import validate_plan

    return validate_plan(text_or_path)


def check(plan_path, artifact=None, **options):
    """Measure the applied plan on this machine against every `require` line: a `CheckReport`
    (`.passed`, `.requirements`, `.baseline`). Options: see `lwdsl.verify.gate.CheckOptions`."""
    from lwdsl.verify.gate import CheckOptions
    from lwdsl.verify.gate import check as run_check

    return run_check(plan_path, artifact, CheckOptions(**options))


def profile(plan_path, force: bool = False):
    """The measured quality profile of a plan's allowed options (`QualityProfile`), stored for `solve`."""
    from lwdsl.plans import load_plan
    from lwdsl.profile import profile as run_profile

    return run_profile(load_plan(plan_path), force=force).profile


def load(directory):
    """The runnable model of an artifact folder written by `lwdsl apply` (its manifest in
    `model.lwdsl_manifest`; the tokenizer: `lwdsl.artifact.load_tokenizer(directory)`)."""
    from lwdsl.artifact import load as load_artifact

    return load_artifact(directory)


def __getattr__(name: str):
    if name == "apply":  # the package `lwdsl.apply` is callable: `lwdsl.apply(plan, output, solution=None)`
        import importlib

        return importlib.import_module("lwdsl.apply")
    if name == "solve":  # the package `lwdsl.solve` is callable: `lwdsl.solve(plan_path) -> Solution`
        import importlib

        return importlib.import_module("lwdsl.solve")
    if name == "export":  # the package `lwdsl.export` is callable: `lwdsl.export(dir, "gguf", "out.gguf")`
        import importlib

        return importlib.import_module("lwdsl.export")
    if name == "parse":  # the module `lwdsl.parse` is callable: `lwdsl.parse(text_or_path) -> ast.Plan`
        import importlib

        return importlib.import_module("lwdsl.parse")
    raise AttributeError(f"module 'lwdsl' has no attribute {name!r}")
