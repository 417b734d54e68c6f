"""DVC deps that cannot go stale: each stage's deps cover every file of `blip/` its command imports.

The import closure is computed from the source (every `import blip...` / `from blip... import ...`, function-local
ones included, with the `__init__.py` of each package on the way). A file may be left out of a stage's deps only
through EXCLUDED below, with the reason; a dep that is a folder covers every file in it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from blip.cli import COMMANDS
from tests.conftest import REPO

# Files no stage's results depend on, with the reason. Nothing else may be missing from a stage's deps.
EXCLUDED = {
    "blip/cli.py": "dispatch by command name and signal handling; the stage's own module is followed instead",
    "blip/__main__.py": "`python -m blip`: calls blip/cli.py",
}


def module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """The `blip` modules a file imports (a `from package import name` counts `package.name` when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "blip"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "blip":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def import_closure(module: str) -> set[str]:
    """Repository-relative paths of every file of `blip/` that importing `module` executes."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages on the way are imported first
            prefix = ".".join(parts[:depth])
            path = module_file(prefix)
            if path is not None and path not in seen:
                seen.add(path)
                todo += imported_modules(path)
    return {str(path.relative_to(REPO)) for path in seen}


def stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (command module, deps), foreach stages expanded (their deps are the same per item)."""
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        command = body["cmd"].split()[1]
        out[name] = (COMMANDS[command][0].partition(":")[0], [d for d in body["deps"] if "${" not in d])
    return out


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_every_module_a_stage_imports_is_a_dep(stage: str) -> None:
    module, deps = stages()[stage]
    missing = sorted(p for p in import_closure(module) if p not in EXCLUDED and not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them as deps: {missing}"


def test_the_closure_follows_function_local_and_package_imports() -> None:
    closure = import_closure("blip.stages.pretrain")
    assert {"blip/__init__.py", "blip/config/__init__.py", "blip/config/params.py", "blip/models/vit.py",
            "blip/training/loop.py", "blip/eval/itc.py"} <= closure  # fmt: skip
    assert "blip/stages/capfilt.py" not in closure and "blip/eval/caption_metrics.py" not in closure


@pytest.mark.slow  # about 80 s: `dvc status` once per module
def test_dvc_status_reports_every_stage_whose_closure_holds_an_edited_module(tmp_path: Path) -> None:
    """DVC itself, on a copy of the project: with a lock made for the current code (placeholder outputs), editing a
    module makes `dvc status` report exactly the stages that import it."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files += [str(p.relative_to(REPO)) for p in (REPO / "blip").rglob("*.py")]  # new modules not yet committed
    for name in {f for f in files if (REPO / f).is_file()}:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t",
                                                              "commit", "-qm", "copy"]):  # fmt: skip
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    with Repo(str(tmp_path)) as repo:
        outs = [str(out) for stage in repo.index.stages for out in stage.outs]
        always = {stage.name for stage in repo.index.stages if stage.always_changed}  # reported on every status
    for out in map(tmp_path.joinpath, outs):  # outputs stand in for a finished run: only code deps matter here
        folder = out.parent if out.suffix else out
        folder.mkdir(parents=True, exist_ok=True)
        (out if out.suffix else out / "placeholder").write_text("placeholder\n")
    subprocess.run([*dvc, "commit", "--force", "--quiet"], cwd=tmp_path, check=True, env=env)

    def changed() -> set[str]:
        done = subprocess.run([*dvc, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, env=env)
        return {stage.split("@")[0] for stage in json.loads(done.stdout or "{}")} - always

    assert always == {"sources"} and changed() == set()
    closures = {name: import_closure(module) for name, (module, _) in stages().items() if name not in always}
    for module in sorted(set().union(*closures.values()) - set(EXCLUDED)):
        original = (tmp_path / module).read_text()
        (tmp_path / module).write_text(original + "# edited\n")
        assert changed() == {name for name, closure in closures.items() if module in closure}, module
        (tmp_path / module).write_text(original)


def test_no_import_circle_in_blip_counting_function_local_imports() -> None:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "blip").rglob("*.py")}  # fmt: skip
    graph = {name: {m if m in modules else m.rsplit(".", 1)[0] for m in imported_modules(path)} - {name}
             for name, path in modules.items()}  # fmt: skip
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in graph.get(name, set()) & set(modules):
            assert target not in path, "import circle: " + " -> ".join([*path[path.index(target) :], target])
            if target not in done:
                visit(target, [*path, target])
        done.add(name)

    for name in sorted(modules):
        visit(name, [name])
