"""The container image builds and runs the demo, where a Docker daemon is available."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def docker_daemon() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(not docker_daemon(), reason="no Docker daemon answers on this machine")
def test_image_builds_and_runs_the_demo_as_a_non_root_user():
    subprocess.run(["docker", "build", "-f", "docker/Dockerfile", "-t", "dist-runtime:test", "."], cwd=ROOT,
                   check=True, timeout=3600)
    user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", "dist-runtime:test", "-u"],
                          capture_output=True, text=True, check=True)
    assert user.stdout.strip() != "0"
    demo = subprocess.run(["docker", "run", "--rm", "dist-runtime:test", "demo"], capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, demo.stderr
