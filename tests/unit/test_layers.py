"""Dependencies point one way (docs/ARCHITECTURE.md): every import of the package — at module
level or inside a function — goes to its own layer or one below."""

import ast
import os

from support import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "bam_megatron")
BOTTOM = {"parallel", "patches", "errors", "progress"}
MIDDLE = {"checkpoint", "model", "data"}
UPPER = {"training", "hf", "upcycle", "sample_data"}
# what each layer may not import
FORBIDDEN = {
    **{name: MIDDLE | UPPER | {"inference", "evaluation", "cli"} for name in BOTTOM},
    **{name: UPPER | {"inference", "evaluation", "cli"} for name in MIDDLE},
    **{name: {"inference", "evaluation", "cli"} for name in UPPER},
    "inference": {"evaluation", "cli"},
    "evaluation": {"cli"},
}


def _layer(rel: str) -> str:
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def _imports(path: str):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            layer = _layer(os.path.relpath(path, PACKAGE))
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] == "bam_megatron" and len(parts) > 1 and parts[1] in FORBIDDEN.get(layer, set()):
                    upward.append(f"{os.path.relpath(path, REPO_ROOT)} imports {module}")
    assert not upward, upward
