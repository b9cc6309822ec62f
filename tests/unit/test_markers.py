"""The suite's own bookkeeping: the slow-module list names real files, so `-m "not slow"` cannot silently
keep a slow module after a rename."""

from pathlib import Path

from tests.conftest import FOLDER_MARKERS, SLOW_MODULES

REPO = Path(__file__).resolve().parents[2]


def test_slow_modules_exist_and_live_in_a_marked_folder():
    for module in SLOW_MODULES:
        assert (REPO / module).is_file(), f"SLOW_MODULES names {module}, which does not exist"
        assert Path(module).parts[1] in FOLDER_MARKERS, module


def test_every_test_module_lives_in_a_kind_folder():
    loose = [p.name for p in (REPO / "tests").glob("test_*.py")]
    assert not loose, f"test modules outside tests/unit, distributed, faults, gpu: {loose}"
