"""The README stays true: every setting documented, commands that exist."""

from pathlib import Path

from producer.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    for name in Settings.model_fields:
        assert f"| `RERANK_{name.upper()}` |" in README, f"RERANK_{name.upper()} is missing from the README table"


def test_the_test_command_is_what_ci_runs():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "bash .ci/run" in README and "python -m pytest" in README and "\npython -m pytest" in ci
