"""The library's layout: imports inside `csr/` run one way (no circle, lazy imports included), and no library
module imports or runs a stage script (STYLE.md: primitives at the bottom, scripts and benches on top)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in (ROOT / "csr").glob("*.py") if p.stem != "__init__")
# top-level names of the stage scripts and benches (and the folders that hold them)
SCRIPTS = {p.stem for p in ROOT.glob("*.py")} | {"bench", "inference", "retrieval", "train", "tests"}


def imported(module: str) -> set[str]:
    """Every module named by an import statement of csr/<module>.py, at any depth (function-level too)."""
    out = set()
    for node in ast.walk(ast.parse((ROOT / "csr" / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "csr":  # `from csr import distributed`
                out |= {f"csr.{a.name}" for a in node.names}
    return out


def csr_graph() -> dict[str, set[str]]:
    return {m: {i.split(".")[1] for i in imported(m) if i.startswith("csr.") and i.split(".")[1] in MODULES} - {m}
            for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [m, n] if n in path else [m, n]
            if n not in state and (c := visit(n, path + [m])):
                return c
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m, [])):
            return c
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_csr_imports_draw_no_circle():
    assert find_cycle(csr_graph()) is None


def test_no_library_module_imports_or_runs_a_script():
    for m in MODULES:
        names = {i.split(".")[0] for i in imported(m)}
        assert not names & SCRIPTS, f"csr/{m}.py imports {names & SCRIPTS}"
        assert "runpy" not in names, f"csr/{m}.py runs scripts through runpy"



def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    assert [m for m in MODULES if f"`{m}.py`" not in layout] == []
