"""`dist-runtime bench` on CPU ranks: the JSON report users read."""

import json

import pytest
from conftest import cli


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--concurrency", "3"], ["--request-rate", "50"]])
def test_bench_reports_throughput_latency_memory_and_kv_usage(engines, mode):
    proc = cli("bench", str(engines("llama", 2, 2)), "--isl", "20", "--osl", "6", "--num-requests", "8",
               "--json", *mode)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_requests"] == 8 and report["tp"] == 2 and report["pp"] == 2
    assert report["output_tokens_per_s"] == pytest.approx(8 * 6 / report["duration_s"])
    for key in ("ttft_ms", "tpot_ms"):
        assert 0 < report[key]["p50"] <= report[key]["p90"] <= report[key]["p99"]
    assert report["max_running"] <= (3 if mode[:1] == ["--concurrency"] else 8)
    overhead = report["step_overhead_ms"]
    assert 0 < overhead["schedule_and_pack"]["p50"] and 0 < overhead["share_of_step_time"] < 1
    assert 0 < report["kv_cache"]["peak_blocks_used"] <= report["kv_cache"]["blocks"]
    assert sorted(report["peak_memory_bytes"]) == ["rank0", "rank1", "rank2", "rank3"]
    assert all(r["peak_rss_bytes"] > 10 * 2**20 for r in report["peak_memory_bytes"].values())
    assert report["preemptions"] == 0
    assert report["kernels_compiled_in_run"] == {}  # CPU ranks run no Triton kernel


def test_bench_prints_a_summary_without_json(engines):
    proc = cli("bench", str(engines("llama", 1, 1)), "--isl", "8", "--osl", "4", "--num-requests", "4")
    assert proc.returncode == 0, proc.stderr
    assert "output tokens/s" in proc.stdout and "TTFT p50/p90/p99" in proc.stdout
    assert "compiled inside the timed run" not in proc.stderr
