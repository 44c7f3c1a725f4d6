"""The README's main job."""

import time

from conftest import cli


def test_demo_prints_plan_memory_and_text_in_well_under_a_minute():
    start = time.time()
    proc = cli("demo", timeout=120)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr
    assert "plan: tp=2 x pp=2 = 4 ranks" in proc.stdout
    assert "rank  tp  pp  layers  weights" in proc.stdout
    assert proc.stdout.count("(16 tokens, length)") + proc.stdout.count(", stop)") == 3
    assert elapsed < 45
