"""The packages' imports: the jobs and webhooks domains and the task modules import each other in no circle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = {"app.jobs", "app.webhooks", "tasks"}


def unit(module: str) -> str:
    """The package a module counts for: ``app.jobs.worker`` -> ``app.jobs``, ``tasks.jobs`` -> ``tasks``."""
    parts = module.split(".")
    return "tasks" if parts[0] == "tasks" else ".".join(parts[:2])


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (absolute names)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from app import webhooks`` imports the package app.webhooks
            found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
    return {name for name in found if name.split(".")[0] in {"app", "tasks"}}


def graph() -> dict[str, set[str]]:
    """Package-level import graph of app/ and tasks/: ``{unit: units it imports}``."""
    edges: dict[str, set[str]] = {}
    for path in [*ROOT.joinpath("app").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py")]:
        source = unit(module_name(path))
        for name in imported(path):
            target = unit(name)
            if target != source and target != "app":
                edges.setdefault(source, set()).add(target)
    return edges


def reaches(edges: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_no_import_cycle_runs_through_the_jobs_or_webhooks_domains_or_the_task_modules():
    edges = graph()
    circular = sorted(domain for domain in DOMAINS if reaches(edges, domain, domain))
    assert circular == [], f"an import cycle runs through {circular}: domain code publishes work through app.queue, not tasks"


def test_the_check_sees_imports_made_inside_a_function():
    # create_app imports tasks inside its body; a check reading only module-level imports would miss
    # the kind of import that made the cycle before (the job enqueue importing tasks.jobs).
    assert "tasks" in {unit(name) for name in imported(ROOT / "app" / "__init__.py")}
