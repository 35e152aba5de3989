"""docs/settings.md is the settings classes' own reference: regenerate it (`make settings-doc`) when a setting
changes."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_the_settings_reference_matches_the_settings_classes():
    script = REPO_ROOT / "scripts" / "settings_reference.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_setting_has_a_description_in_the_reference():
    text = (REPO_ROOT / "docs" / "settings.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    assert all(not line.rstrip().endswith("|  |") for line in rows), [r for r in rows if r.rstrip().endswith("|  |")]
