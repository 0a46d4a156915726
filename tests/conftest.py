"""Shared fixtures: paths to the real vocab and data samples, skipped (with reason) when absent."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The real CPM-2 vocab files and public data samples live next to the repo in this project's home
# (../shared); CI has them. Outside that home the tests that need them skip with the reason shown.
SHARED = pathlib.Path(os.environ.get("CPM2_SHARED_DIR", ROOT.parent / "shared"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"{path} not found (set CPM2_SHARED_DIR to the folder holding vocab/ and data/)")
    return path


@pytest.fixture
def shared_dir() -> pathlib.Path:
    return _need(SHARED)


@pytest.fixture
def cn_vocab() -> pathlib.Path:
    return _need(SHARED / "vocab" / "bpe_cn" / "vocab.txt")


@pytest.fixture
def cn_en_vocab() -> pathlib.Path:
    return _need(SHARED / "vocab" / "bpe_cn_en" / "vocab.txt")


@pytest.fixture
def shared_data() -> pathlib.Path:
    return _need(SHARED / "data")


try:  # property tests: the same examples on every run, so CI never turns red on a draw it cannot reproduce
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("cpm2", derandomize=True, deadline=None)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cpm2"))
except ImportError:  # hypothesis is a test requirement; tests that use it fail loudly on their own import
    pass


@pytest.fixture
def failing_build(monkeypatch):
    """``fail(library, message)``: make an ``mpu.cpp_extension.CppLibrary`` behave as on a machine where it cannot
    be built (its next ``available()`` tries again, and the build raises ``message``)."""
    def fail(library, message: str) -> None:
        monkeypatch.setattr(library, "_loaded", None)
        monkeypatch.setattr(library, "_failure", None)
        monkeypatch.delenv("CPM2_CPU_EXTENSION", raising=False)

        def build():
            raise RuntimeError(message)
        monkeypatch.setattr(library, "_build", build)
    return fail
