"""How the code is put together: imports flow one way, the command line is a layer on top, nothing is too long.

Read from the source with ``ast`` (nothing is run), except the check that ``import gpt`` stays light.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gpt", "gpt_kernels")
MAX_FUNCTION_LINES = 80  # outside the Triton kernels
MAX_MODULE_LINES = 500  # in gpt/


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, e.g. "gpt.engine" -> gpt/engine.py ("gpt" for gpt/__init__.py)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path) -> set[str]:
    """The modules of this repository that ``name`` imports anywhere (inside functions too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = {f"{base}.{a.name}" for a in node.names}
            found |= names  # `from . import classify` imports the module gpt.classify...
            if names - ALL_MODULES:
                found.add(base)  # ... `from .engine import Task` the module gpt.engine
    return {m for m in found if m.split(".")[0] in PACKAGES}


ALL_MODULES = set(modules("gpt")) | set(modules("gpt_kernels")) | set(modules("bench"))


def graph() -> dict[str, set[str]]:
    mods = {**modules("gpt"), **modules("gpt_kernels")}
    return {name: {m for m in imported(name, path) if m in mods and m != name} for name, path in mods.items()}


def test_no_import_cycles_in_gpt_or_kernels():
    g = graph()
    done, path = set(), []

    def visit(m):
        if m in path:
            cycle = path[path.index(m):] + [m]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if m in done:
            return
        path.append(m)
        for n in sorted(g[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def test_only_main_imports_the_command_line_and_kernels_never_import_gpt():
    for package in ("gpt", "gpt_kernels", "bench"):
        for name, path in modules(package).items():
            deps = imported(name, path)
            if name != "gpt.__main__":
                assert "gpt.cli" not in deps, f"{path.relative_to(REPO)} imports gpt.cli"
            if package == "gpt_kernels":
                assert not any(d.split(".")[0] == "gpt" for d in deps), f"{path.relative_to(REPO)} imports gpt"


def test_import_gpt_loads_no_training_code():
    code = "import sys, gpt; print(sorted(m for m in sys.modules if m.startswith('gpt')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout
    for name in ("gpt.engine", "gpt.job", "gpt.pretrain", "gpt.finetune", "gpt.classify", "gpt.instruct",
                 "gpt.optim", "gpt.data", "gpt.cli"):
        assert f"'{name}'" not in loaded, f"import gpt loaded {name}"
    assert "'gpt.model'" in loaded  # the check sees what it should


def _is_triton_kernel(node) -> bool:
    return any("triton" in ast.unparse(d) for d in node.decorator_list)


def test_no_function_longer_than_80_lines_and_no_gpt_module_longer_than_500():
    long = []
    for package in ("gpt", "gpt_kernels", "bench"):
        for path in modules(package).values():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
            if package == "gpt" and len(path.read_text().splitlines()) > MAX_MODULE_LINES:
                long.append(f"{path.relative_to(REPO)}: {len(path.read_text().splitlines())} lines")
    assert not long, "\n".join(long)


# ------------------------------------------------------------------------------------------ one owner each


def _code_nodes(tree: ast.AST):
    """Every node of ``tree`` but the docstrings (which may name what they describe)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if id(n) not in docstrings]


def test_one_function_resolves_a_runs_settings(tmp_path):
    """Only gpt.settings.plan_run makes a Plan, and every change to a run config, during a pretraining run, its
    resume and a LoRA finetuning run, is made in gpt.settings; the configs themselves are frozen."""
    import dataclasses

    from gpt.finetune import FinetuneConfig
    from gpt.instruct import finetune_instruct
    from gpt.pretrain import TrainConfig, train
    from gpt.settings import RunConfig

    for name, path in modules("gpt").items():
        tree = ast.parse(path.read_text())
        where = {}
        for top in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            where.update({id(node): top.name for node in ast.walk(top)})
        # the run's Plan is gpt.settings' own, or imported from it (gpt.plan's Plan is the memory planner's)
        runs_plan = name == "gpt.settings" or any(
            isinstance(n, ast.ImportFrom) and n.module in ("settings", "gpt.settings")
            and "Plan" in {a.name for a in n.names} for n in ast.walk(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "dataclasses":  # (so the run below sees each)
                assert "replace" not in {a.name for a in node.names}, f"{name} imports dataclasses.replace by name"
            if runs_plan and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Plan":
                assert (name, where.get(id(node))) == ("gpt.settings", "plan_run"), f"{name} makes a Plan"

    callers, real = [], dataclasses.replace

    def recording(obj, /, **changes):
        if isinstance(obj, RunConfig):
            frame = sys._getframe(1)
            callers.append((frame.f_globals["__name__"], frame.f_code.co_name))
        return real(obj, **changes)

    dataclasses.replace = recording
    try:
        common = dict(preset="tiny", eval_batches=1, device="cpu")
        train(TrainConfig(**common, context_length=16, max_steps=1, sample_tokens=0, out=str(tmp_path / "p")))
        train(TrainConfig(resume=str(tmp_path / "p"), max_steps=2))
        finetune_instruct(FinetuneConfig(**common, max_steps=1, limit=10, max_new_tokens=1, lora_rank=2,
                                         out=str(tmp_path / "i")))
    finally:
        dataclasses.replace = real
    assert ("gpt.settings", "plan_run") in callers  # the check sees what it should
    assert {module for module, _ in callers} == {"gpt.settings"}, callers
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3  # a task cannot change the settings it is given


def test_one_module_owns_the_trainer_state():
    """Only gpt.trainer_state names the trainer state's file, format and optimizer folder, saves with
    torch.save or torch.distributed.checkpoint, and loads with torch.load (but gpt.weights, which reads
    Hugging Face's pytorch_model.bin)."""
    owner = "gpt.trainer_state"
    found = {}
    for name, path in modules("gpt").items():
        for node in _code_nodes(ast.parse(path.read_text())):
            what = None
            if isinstance(node, (ast.Name, ast.Attribute)):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                what = ident if ident in ("STATE_FILE", "STATE_FORMAT", "OPTIMIZER_DIR") else None
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "trainer_state.pt" in node.value:
                what = "trainer_state.pt"
            elif isinstance(node, ast.Call):
                call = ast.unparse(node.func)
                if call in ("torch.save", "torch.load", "dcp.save", "dcp.load"):
                    what = call
            elif isinstance(node, ast.Import) and "torch.distributed.checkpoint" in {a.name for a in node.names}:
                what = "import torch.distributed.checkpoint"  # (its save and load: .state_dict is no file)
            if what:
                found.setdefault(what, set()).add(name)
    assert found.pop("torch.load") <= {owner, "gpt.weights"}
    for what, where in found.items():
        assert where == {owner}, f"{what} in {sorted(where - {owner})}"
    assert set(found) >= {"STATE_FILE", "STATE_FORMAT", "OPTIMIZER_DIR", "torch.save", "dcp.save", "dcp.load"}


def test_import_gpt_and_the_kernel_tests_need_no_tiktoken(tmp_path):
    """tiktoken is imported by the tokenizer on first use, not by ``import gpt``: without it the model runs,
    the kernel and model tests collect (a GPU host missing it still runs them), and asking for the
    tokenizer says what to install. A stand-in ``tiktoken`` package that fails to import plays its absence."""
    blocker = tmp_path / "tiktoken"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('tiktoken is not installed (simulated)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = textwrap.dedent("""
        import torch, gpt, gpt_kernels
        model = gpt.GPT.from_preset("tiny")
        logits = model(torch.randint(0, 50257, (1, 8)))
        assert logits.shape == (1, 8, 50257)
        try:
            gpt.get_tokenizer()
        except ImportError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install tiktoken" in proc.stdout
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "tests/gpt_kernels", "tests/gpt/test_model.py", "tests/gpt/test_model_triton.py"],
                             cwd=REPO, env=env, capture_output=True, text=True)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "error" not in collect.stdout.lower().splitlines()[-1], collect.stdout[-500:]
