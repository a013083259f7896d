import importlib

import pytest


@pytest.mark.parametrize("module", ["sensplan", "sensplan.sensitivity", "sensplan.planner", "sensplan.reports"])
def test_all_names_exist_and_are_sorted(module):
    mod = importlib.import_module(module)
    assert mod.__all__, module
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
    assert len(set(mod.__all__)) == len(mod.__all__)


def test_user_errors_share_one_base():
    import sensplan

    for name in ("ModelSpecError", "CheckpointError", "DataSpecError", "BudgetError", "InfeasibleBudgetError",
                 "ArtifactError", "IncompatibleModelError"):
        assert issubclass(getattr(sensplan, name), sensplan.UserInputError)
    assert not issubclass(sensplan.InternalError, sensplan.UserInputError)
