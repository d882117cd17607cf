"""The walkthrough runs end to end against a real server on the default model, and its notebook is in sync."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_notebook_is_generated_from_the_script():
    result = subprocess.run([sys.executable, "scripts/dev_sync_walkthrough.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_walkthrough_script_runs_every_section(smol_server, tmp_path):
    # From another directory (as a user might): the pictures still go to this repository's docs/walkthrough.
    env = {**os.environ, "LMSCOPE_SERVER": smol_server.address, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sections = [line for line in result.stdout.splitlines() if line.startswith("saved docs/walkthrough/")]
    assert sections, result.stdout[-2000:]
    assert all((ROOT / line.removeprefix("saved ")).exists() for line in sections)
    assert not (tmp_path / "docs").exists()
