"""Build hook: ship the top-level `grammar/lwp.lark` (the one source of the syntax) inside the wheel as
`lwdsl/grammar/lwp.lark`, where `lwdsl.parse.grammar_path()` finds it when installed. Everything else
is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

GRAMMAR = Path(__file__).resolve().parent / "grammar" / "lwp.lark"


class BuildPyWithGrammar(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "lwdsl" / "grammar"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(GRAMMAR, target / GRAMMAR.name)


setup(cmdclass={"build_py": BuildPyWithGrammar})
