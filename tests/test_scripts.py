"""scripts/venv.sh: pip runs only when the venv no longer matches what it was built for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test builds a venv with pip

SCRIPTS = Path(__file__).parent.parent / "scripts"

# pip with no package index and no local wheels: an install that needs anything fails.
OFFLINE_PIP = {
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": "",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _base_python() -> str:
    """An interpreter that can make a venv with pip (the test's own may be a venv)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sysconfig.get_python_version()}"
    return str(base) if base.exists() else sys.executable


def _ensure(project: Path, venv: Path, *requirements: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TOKENLAY_"))}
    return subprocess.run(
        ["bash", "-c", f'source {SCRIPTS / "venv.sh"} && ensure_venv "$@"', "-", str(venv),
         *requirements],
        cwd=project,
        env={**env, **OFFLINE_PIP, "PYTHON": _base_python()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip


def test_a_venv_that_matches_needs_no_pip(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n')
    venv = tmp_path / "venv"

    # The first run makes the venv and installs: "pip" is already there, so offline
    # pip succeeds, and the stamp is written.
    first = _ensure(project, venv, "pip")
    assert first.returncode == 0, first.stderr
    assert (venv / "tokenlay-install.stamp").is_file()

    # Without pip, any pip call fails: a run that succeeds now did not call it.
    for site in venv.glob("lib/python*/site-packages"):
        shutil.rmtree(site / "pip")
    again = _ensure(project, venv, "pip")
    assert again.returncode == 0, again.stderr

    # Another requirement (OPENAI_SPEC switching openai lines), or a changed
    # pyproject.toml, calls pip again, which fails here: the stamp does not match.
    other_spec = _ensure(project, venv, "pip", "openai<2")
    assert other_spec.returncode != 0
    assert "No module named pip" in other_spec.stderr
    assert not (venv / "tokenlay-install.stamp").exists()  # a failed install leaves none


def test_a_changed_pyproject_reinstalls(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n')
    venv = tmp_path / "venv"
    assert _ensure(project, venv, "pip").returncode == 0
    for site in venv.glob("lib/python*/site-packages"):
        shutil.rmtree(site / "pip")
    (project / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "2"\n')
    changed = _ensure(project, venv, "pip")
    assert changed.returncode != 0
    assert "No module named pip" in changed.stderr


def test_the_demo_and_the_tests_share_a_venv_without_undoing_each_other(tmp_path: Path) -> None:
    """./scripts/demo then ./scripts/test (other requirements, one .venv): each keeps its
    own stamp, so the demo still runs offline after the tests installed theirs."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n')
    venv = tmp_path / "venv"
    assert _ensure(project, venv, "pip").returncode == 0  # the demo's set
    assert _ensure(project, venv, "pip", "--upgrade").returncode == 0  # the tests' set
    for site in venv.glob("lib/python*/site-packages"):
        shutil.rmtree(site / "pip")
    for requirements in (("pip",), ("pip", "--upgrade"), ("pip",)):
        again = _ensure(project, venv, *requirements)
        assert again.returncode == 0, (requirements, again.stderr)
