import json

import pytest
import torch
from conftest import REPO, run_cli

from minigpt.core.errors import UserError
from minigpt.core.hardware import choose_peak, gpu_by_name, match_device
from minigpt.measure.sweep import run_sweep
from minigpt.train.loop import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine")


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("Tesla V100-SXM2-32GB", "V100"),
    ("NVIDIA B200", "B200"),
])
def test_device_names_match_the_datasheet_table(name, expected):
    assert match_device(name).name == expected


def test_unknown_devices_get_no_peak_unless_given(tmp_path):
    assert match_device("AMD EPYC") is None
    assert not choose_peak("AMD EPYC", "fp32").known
    assert choose_peak("AMD EPYC", "fp32", given_tflops=0.5).tflops == 0.5
    assert choose_peak("NVIDIA H100 80GB HBM3", "bf16").tflops == 989
    assert "datasheet dense bf16" in choose_peak("NVIDIA H100 80GB HBM3", "bf16").source
    bench = tmp_path / "hw.json"
    bench.write_text(json.dumps({"matmul_tflops": {"fp32": 0.1}}))
    p = choose_peak("AMD EPYC", "fp32", bench_file=str(bench))
    assert p.tflops == 0.1 and "measured" in p.source
    with pytest.raises(UserError, match="no measured bf16"):
        choose_peak("AMD EPYC", "bf16", bench_file=str(bench))
    with pytest.raises(UserError, match="unknown GPU 'Z100'"):
        gpu_by_name("Z100")


def test_bench_hardware_on_this_cpu_and_as_a_peak(tmp_path, tiny_cfg):
    out = tmp_path / "hw.json"
    r = run_cli("bench", "hardware", "--device", "cpu", "--size", "256", "--repeats", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    hw = json.loads(out.read_text())
    assert hw["matmul_tflops"]["fp32"] > 0 and hw["copy_bandwidth_gbs"] > 0
    # the measured peak makes MFU known on a CPU; the run report says which peak it divided by
    cfg = tiny_cfg(**{"train.max_steps": 3, "train.peak_from": f'"{out}"', "train.report": "true"})
    lines = []
    summary = train(cfg, log=lines.append)
    assert any("fp32 MFU" in l for l in lines if l.startswith("step"))
    assert 0 < summary["mfu"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["performance"]["peak_source"].startswith("measured fp32 matmul peak")
    assert report["flops"]["exact_ratio_to_counted"] == pytest.approx(1.0)
    assert report["memory"]["ratios"]["parameters"] == 1.0
    assert (tmp_path / "run" / "report.md").read_text().startswith("# minigpt run report")


def test_a_stored_cpu_peak_sets_the_threads_it_was_measured_with(tmp_path, monkeypatch):
    """The default thread count follows the load; a run dividing by a stored CPU peak takes the peak's count
    instead, so a busy moment at either end cannot make the peak and the run disagree."""
    import torch

    from minigpt.core.config import TrainConfig
    from minigpt.core.device import configure_device

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    path = tmp_path / "hw.json"
    try:
        for threads, says in ((1, "1 thread(s) (the count train.peak_from's CPU peak was measured with)"),
                              (10**6, "(default:"), ("2", "(default:")):  # not a usable count: the default rule
            path.write_text(json.dumps({"device": "cpu", "threads": threads, "matmul_tflops": {"fp32": 0.1}}))
            notes = configure_device(TrainConfig(peak_from=str(path)), torch.device("cpu"))
            assert says in notes[0]
        assert torch.get_num_threads() >= 1
    finally:
        torch.set_num_threads(before)


def test_unknown_peak_shows_no_mfu(tiny_cfg):
    lines = []
    summary = train(tiny_cfg(**{"train.max_steps": 2}), log=lines.append)
    assert any("MFU n/a" in l for l in lines if l.startswith("step"))
    assert "mfu" not in summary  # report off in the tiny test config


def test_flops_sweep_writes_table_and_plot(tmp_path):
    rows = run_sweep(str(tmp_path), steps=1, batch=1, long=512, include_gpt3=False, log=lambda *a: None)  # a faster count
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and (tmp_path / "sweep.md").is_file()
    ratios = [r["counted_over_6n_T128"] for r in rows]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 5  # 6N is far off at small width
    assert all(r["counted_over_palm_T512"] < r["counted_over_6n_T512"] for r in rows)
    assert all(r["achieved_tflops"] > 0 for r in rows)


@cuda
def test_bench_hardware_on_cuda_reaches_a_fraction_of_the_datasheet():
    from minigpt.measure.bench import bench_hardware

    r = bench_hardware("cuda", size=4096, repeats=5)
    if r["datasheet"]:
        assert 0.2 < r["fraction_of_datasheet"]["bf16"] < 1.05


def test_a_stored_peak_must_be_this_machine_now(tmp_path):
    """A CPU peak measured elsewhere, with other threads, or days ago is refused with the fix."""
    import time

    from minigpt.core.hardware import choose_peak

    hw = tmp_path / "hw.json"

    def peak_with(**fields):
        hw.write_text(json.dumps({"device": "cpu", "device_name": "Some CPU", "threads": 2,
                                  "measured_at": time.time(), "matmul_tflops": {"fp32": 0.1}, **fields}))
        return choose_peak("Some CPU", "fp32", bench_file=str(hw), threads=2)

    assert peak_with().tflops == 0.1 and "h old" in peak_with().source
    for fields, message in (({"device_name": "Other CPU"}, "measured Other CPU, this run is on Some CPU"),
                            ({"threads": 8}, "with 8 threads, this run uses 2"),
                            ({"measured_at": time.time() - 48 * 3600}, "48 h old")):
        with pytest.raises(UserError, match=message) as e:
            peak_with(**fields)
        assert "minigpt bench hardware --out" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_checks_script_refuses_a_machine_without_cuda(tmp_path):
    """scripts/gpu_checks.sh (the README's one command for the GPU checks): without CUDA it stops at
    once with one error line and exit 2, and writes nothing."""
    import subprocess

    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_checks.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no CUDA device") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_nvlink_is_counted_one_way_like_the_nics():
    """A ring's bandwidth term runs at what a GPU sends one way; the datasheets' NVLink totals count both
    directions (H100 900 GB/s, A100 600), so the table keeps half, the unit of the inter-node figures."""
    from minigpt.core.hardware import gpu_by_name

    assert (gpu_by_name("H100").nvlink_gbs, gpu_by_name("A100").nvlink_gbs, gpu_by_name("B200").nvlink_gbs) == (450, 300, 900)
    assert gpu_by_name("H100").internode_gbs == 400 / 8  # one 400 Gb/s NIC per GPU, one way


def test_collectives_are_timed_between_torchrun_ranks_in_nccl_tests_units(tmp_path):
    import subprocess
    import sys
    r = run_cli("bench", "hardware", "--collectives")
    assert r.returncode == 2 and "under torchrun" in r.stderr
    out = tmp_path / "coll.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "minigpt", "bench", "hardware", "--collectives", "--repeats", "3", "--out", str(out), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    hw = json.loads(p.stdout)
    assert hw == json.loads(out.read_text()) and hw["collectives"]["world_size"] == 2
    rows = hw["collectives"]["results"]
    assert {r["op"] for r in rows} == {"all_reduce", "all_gather", "reduce_scatter"}
    for row in rows:  # two ranks: all-reduce carries 2 (n-1)/n = 1 of its buffer, the others 1/2
        assert row["algbw_gbs"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9, rel=1e-2, abs=1e-3)
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"] * (1.0 if row["op"] == "all_reduce" else 0.5), abs=2e-3)


def test_a_collective_sweep_sets_the_nvlink_rate_only_within_one_node():
    from minigpt.analytic import steptime as T
    cited = T.gpu_rates(gpu_by_name("H100"))
    coll = {"world_size": 8, "results": [{"op": "all_reduce", "bytes": 2**30, "busbw_gbs": 360.0},
                                         {"op": "all_reduce", "bytes": 2**20, "busbw_gbs": 40.0}]}
    assert T.measured_rates({"collectives": coll}, cited, "c").nvlink_bytes_per_s == 360e9  # the largest buffer
    assert T.measured_rates({"collectives": {**coll, "world_size": 16}}, cited, "c") == cited  # across nodes
    with pytest.raises(UserError):
        T.measured_rates({"collectives": {"world_size": 8, "results": [{"op": "all_reduce"}]}}, cited, "c")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_serving_process_keeps_freed_memory_and_a_host_speed_probe_times_a_matmul():
    """serve sets glibc's malloc to keep freed blocks (a threaded process otherwise page-faults each step's tensors
    back in); the probe bench_serve.py writes beside its figures times a real matmul."""
    import platform

    from minigpt.core.device import host_speed_us, keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: keep_freed_memory changes nothing and says so")
    assert keep_freed_memory() is True
    assert 10 < host_speed_us(repeats=30) < 1e6
