"""The distribution's shape: package provenance, one-way imports, a torch-free edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from converters.provenance import PACKAGES, check_packages, package_origins

ROOT = Path(__file__).resolve().parents[2]
# What each package may import among ours (house style: imports flow one way).
ALLOWED = {
    "kernels": set(),
    "split": {"kernels"},
    "converters": {"kernels", "split"},
    "edge": {"kernels", "split", "converters"},
    "cloud": {"kernels", "split", "converters"},
}


def test_each_package_resolves_inside_this_distribution():
    check_packages()
    for name, origin in package_origins().items():
        assert origin is not None and Path(origin).resolve().is_relative_to(ROOT), (name, origin)
    eps = {ep.name for ep in metadata.entry_points(group="console_scripts")}
    assert "edgesplit" in eps


def test_a_foreign_package_with_our_name_is_reported(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('foreign kernels imported!')\n")
    code = "import sys; from converters.cli import main; sys.exit(main(['--help']))"
    env_path = f"{tmp_path}"
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); {code}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "kernels" in proc.stderr and "not edgesplit's" in proc.stderr
    assert "foreign kernels imported" not in proc.stderr  # never imported, only inspected


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path) & set(PACKAGES):
            if name != package and name not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_edge_agent_and_runtime_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edge, edge.runtime, edge.agent, edge.commands, converters.mqtt, converters.wire\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_command_needing_torch_on_a_torch_free_device_says_which_extra():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from converters.cli import main\n"
        "sys.exit(main(['split', 'digits-mlp', '--list-cuts']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs 'torch'" in lines[0] and "edgesplit[cloud]" in lines[0]
