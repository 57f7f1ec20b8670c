"""The package's architecture, checked: the core never imports the harness, and functions stay small
(``docs/architecture.md``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "sasoftmax"

ENTRY_POINTS = {"__main__.py"}  # ``python -m sasoftmax`` is the harness's command line

# Public signatures that mirror an outside convention (SDPA, nn.MultiheadAttention, the normalizer calling convention)
# or are keyword-option entry points: allowed more than 8 parameters.
MANY_PARAMETERS = {
    "attention/api.py:sa_attention", "attention/varlen.py:sa_attention_varlen",  # FlashAttention's varlen signature
    "attention/api.py:sa_attention_with_weights", "attention/inputs.py:prepare",
    "attention/materialized.py:materialized_attention", "integrations/nn.py:__init__",
    "normalizers/builtin.py:softmax_attention", "normalizers/builtin.py:fn", "lm/compare.py:run_comparison",
    "lm/evaluate.py:evaluate_checkpoint", "attention/dropout.py:keep_mask", "lm/downstream.py:run_lm_eval",
    "lm/hf/config.py:__init__",  # a transformers config: its fields are keyword arguments
    "integrations/hf.py:sa_attention_forward",  # transformers' attention-function signature + the SA options
    "integrations/torch.py:sa_sdpa",  # F.scaled_dot_product_attention's signature + the SA options
    "integrations/vllm/paged.py:forward",  # vLLM's AttentionImpl.forward signature
    "attention/paged.py:sa_paged_decode",  # the paged cache's four tensors + sa_attention's options
    "attention/backends/triton/__init__.py:launch_plan",  # the shape numbers of one call, for the launch-plan unit test
}
MAX_LINES, MAX_PARAMS = 80, 8


def _core_files() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py"))
            if "lm" not in p.relative_to(SRC).parts and p.relative_to(SRC).as_posix() not in ENTRY_POINTS]


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def test_core_never_imports_the_harness():
    offenders = {p.relative_to(SRC).as_posix(): [m for m in _imported_modules(p) if m.startswith("sasoftmax.lm")]
                 for p in _core_files()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules import sasoftmax.lm: {offenders}"
    assert len(_core_files()) > 10  # the scan saw the package


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_core_module_names_the_harness():
    named = sorted(p.relative_to(SRC).as_posix() for p in _core_files()
                   if any("sasoftmax.lm" in text for text in _code_strings(p)))
    assert named == [], named


def test_importing_the_core_loads_no_harness_module():
    core = ["sasoftmax", "sasoftmax.attention", "sasoftmax.normalizers", "sasoftmax.positional", "sasoftmax.nn",
            "sasoftmax.functional", "sasoftmax.utils", "sasoftmax.integrations.nn"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core)
            + "print(sorted(m for m in sys.modules if m.startswith(('sasoftmax.lm', 'transformers'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def _decorators(node: ast.FunctionDef) -> set[str]:
    names = set()
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute):
            names.add(target.attr)
        elif isinstance(target, ast.Name):
            names.add(target.id)
    return names


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return "jit" in _decorators(node)


# torch.library ops: their Python signature is the op schema (every tensor and scalar crossing the op boundary)
_OP_DECORATORS = {"custom_op", "triton_op", "register_fake", "register_kernel"}


def test_functions_stay_small():
    too_long, too_many = [], []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_triton_kernel(node):
                continue
            lines = node.end_lineno - node.lineno + 1
            a = node.args
            params = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            if lines > MAX_LINES:
                too_long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
            is_op = bool(_decorators(node) & _OP_DECORATORS)
            if len(params) > MAX_PARAMS and f"{rel}:{node.name}" not in MANY_PARAMETERS and not is_op:
                too_many.append(f"{rel}:{node.lineno} {node.name} ({len(params)} parameters)")
    assert not too_long and not too_many, (f"functions over {MAX_LINES} lines: {too_long}; functions with more than "
                                           f"{MAX_PARAMS} parameters: {too_many}")


# ------------------------------------------------------------------------------------------------ structure


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at module level or inside functions), leaving out a module's own
    ancestor packages (importing a submodule imports them anyway)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_modules(path):
            while imported and imported not in modules:  # `from pkg.mod import name` names pkg.mod.name
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycle_among_the_package_modules():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
    assert len(graph) > 30


def test_no_deprecation_shims():
    shims = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "DeprecationWarning" in p.read_text()]
    assert not shims and not (SRC / "_compat.py").exists(), shims


def _environ_reads(path: Path) -> list[str]:
    """The string keys a module reads from ``os.environ`` / ``os.getenv``."""
    keys = []
    for node in ast.walk(ast.parse(path.read_text())):
        target = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            target = node.slice
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv",
                                                                       "os.environ.setdefault"):
            target = node.args[0] if node.args else None
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            keys.append(target.value)
    return keys


def test_sasoftmax_environment_variables_are_read_by_the_one_parser():
    from sasoftmax.env import VARIABLES

    readers = {p.relative_to(SRC).as_posix(): [k for k in _environ_reads(p) if k.startswith("SASOFTMAX_")]
               for p in SRC.rglob("*.py")}
    readers = {k: v for k, v in readers.items() if v and k != "env.py"}
    assert not readers, f"read outside sasoftmax/env.py: {readers}"
    named = {text for p in SRC.rglob("*.py") for text in _code_strings(p)
             if text.startswith("SASOFTMAX_") and text.replace("_", "").isalnum()}
    assert named <= set(VARIABLES), f"not listed in sasoftmax.env.VARIABLES: {sorted(named - set(VARIABLES))}"


def test_every_registered_backend_has_the_backend_shape():
    import torch

    from sasoftmax.attention import prepare
    from sasoftmax.attention.backends import REGISTRY

    inp = prepare(*[torch.zeros(1, 1, 2, 4)] * 3)
    for backend in REGISTRY:
        for fn in ("load_error", "unsupported_reason", "run"):
            assert callable(getattr(backend.module, fn, None)), (backend.name, fn)
        err = backend.load_error()
        assert err is None or isinstance(err, str), backend.name
        if err is None:
            reason = backend.unsupported_reason(inp)
            assert reason is None or isinstance(reason, str), backend.name


def test_auto_names_no_backend():
    from sasoftmax.attention.backends import REGISTRY

    names = {b.name for b in REGISTRY}
    api = SRC / "attention" / "api.py"
    assert not names & set(_code_strings(api)), "attention/api.py names a backend"
    tree = ast.parse((SRC / "attention" / "backends" / "__init__.py").read_text())
    choose = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "choose")
    strings = {n.value for n in ast.walk(choose) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & strings, "backends.choose names a backend"


def test_the_docs_list_every_environment_variable():
    from sasoftmax.env import markdown_table

    assert markdown_table() in (SRC.parents[1] / "docs" / "architecture.md").read_text()
