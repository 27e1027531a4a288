"""The library stands without Flower: every module of fedlora imports with Flower made unimportable,
and none of them reaches into the Flower side (strategies/, clients/)."""

import subprocess
import sys

from conftest import ROOT

NO_FLOWER = """
import importlib, importlib.abc, pkgutil, sys

class NoFlower(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"{name} is not installed (made unimportable by the test)")
        return None

sys.meta_path.insert(0, NoFlower())
import fedlora
names = [m.name for m in pkgutil.walk_packages(fedlora.__path__, "fedlora.")]
for name in names:
    importlib.import_module(name)
flower_side = sorted(m for m in sys.modules if m.split(".")[0] in ("flwr", "strategies", "clients"))
print(len(names), flower_side)
"""


def test_the_library_imports_without_flower():
    out = subprocess.run([sys.executable, "-c", NO_FLOWER], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, flower_side = out.stdout.split(" ", 1)
    assert int(count) >= 30 and flower_side.strip() == "[]"
