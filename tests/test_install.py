"""One ONNX Runtime per install: the extras never pull both packages, and start-up names the one to remove."""

from importlib import metadata

import pytest

from gkd.utils import install
from tests.helpers.paths import REPO

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _runtime_packages(requirements: list[str]) -> set[str]:
    names = {requirement.split(">")[0].split("=")[0].split("[")[0].strip() for requirement in requirements}
    return names & set(install.ONNXRUNTIME_DISTRIBUTIONS)


def test_no_install_set_holds_both_onnxruntime_packages():
    base = _runtime_packages(PYPROJECT["project"]["dependencies"])
    assert not base  # a base dependency could not be removed by an extra
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert _runtime_packages(extras["cpu"]) == {"onnxruntime"}
    assert _runtime_packages(extras["gpu"]) == {"onnxruntime-gpu"}
    for name, requirements in extras.items():
        if name not in ("cpu", "gpu"):
            assert not _runtime_packages(requirements), name


def _fake_installed(monkeypatch, present: set[str]) -> None:
    def version(name: str) -> str:
        if name not in present:
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(install.metadata, "version", version)


@pytest.mark.parametrize(
    ("gpu", "command"),
    [
        (True, "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"),
        (False, "pip uninstall -y onnxruntime-gpu onnxruntime && pip install onnxruntime"),
    ],
)
def test_both_packages_installed_names_the_one_to_remove(monkeypatch, gpu, command):
    _fake_installed(monkeypatch, {"onnxruntime", "onnxruntime-gpu"})
    message = install.onnxruntime_install_problem(gpu=gpu)
    assert "both onnxruntime and onnxruntime-gpu are installed" in message and command in message


def test_one_package_is_fine_and_none_says_what_to_install(monkeypatch):
    _fake_installed(monkeypatch, {"onnxruntime-gpu"})
    assert install.onnxruntime_install_problem(gpu=True) is None
    _fake_installed(monkeypatch, set())
    assert "gkd-compress[cpu]" in install.onnxruntime_install_problem(gpu=False)
