"""Backends: the cpu backend measured for real on a tiny model, the result schema, the trtexec /
tegrastats / nvpmodel / jetson_clocks parsers on stored outputs, the TensorRT backend's pure parts
and missing-runtime errors, the SSH error classification, and ``qtool bench`` in-process."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers.tiny_models import export_tiny
from onnx import TensorProto, helper

from qtool.backends import BACKENDS, BenchOptions, BenchResult, get_backend
from qtool.backends.base import LatencyStats, cpu_info
from qtool.backends.jetson import SEED_PAPER_XAVIER_NX, JetsonBackend, device_facts, is_xavier_nx, trtexec_args
from qtool.backends.jetson_logs import (
    parse_jetson_clocks,
    parse_nv_tegra_release,
    parse_nvpmodel,
    parse_tegrastats_line,
    parse_trtexec,
    summarize_tegrastats,
    trtexec_error_line,
)
from qtool.backends.ssh import SshClient, classify_ssh_failure, quote_command
from qtool.backends.tensorrt import builder_flags, cache_key, cache_paths
from qtool.cli import main
from qtool.errors import BackendError, RegistryError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "backends"


def fixture(name: str) -> str:
    return (FIX / name).read_text()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_models")
    qdq = d / "qdq.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]), helper.make_node("Relu", ["dq"], ["out"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(qdq))
    return {"fixed": export_tiny(d / "tiny.onnx"), "dynamic": export_tiny(d / "tiny_dyn.onnx", dynamic=True),
            "qdq": qdq}


@pytest.fixture(scope="module")
def cpu_result(models) -> BenchResult:
    opts = BenchOptions(threads=1, iterations=40, warmup=3)
    return get_backend("cpu", opts).run(models["fixed"], [None])[0]


# --- cpu backend, measured for real -----------------------------------------------------------

def test_cpu_result_schema_and_consistency(cpu_result, models):
    r = cpu_result
    d = r.to_dict()
    for key in ("device", "model", "model_size_bytes", "model_sha256", "batch", "threads", "iterations",
                "warmup_iterations", "latency_ms", "throughput_ips", "peak_rss_mb", "environment", "notes",
                "simulated"):
        assert key in d, key
    assert set(d["latency_ms"]) == {"p50", "p90", "p99", "mean", "std", "min", "max"}
    lat = r.latency_ms
    assert 0 < lat.min <= lat.p50 <= lat.p90 <= lat.p99 <= lat.max
    assert r.iterations == 40 and r.batch == 1 and r.threads == 1 and r.precision == "fp32" and not r.simulated
    assert r.throughput_ips == pytest.approx(r.batch * 1000.0 / lat.mean)
    path = models["fixed"]
    assert r.model_size_bytes == path.stat().st_size
    assert r.model_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert 10 < r.peak_rss_mb < 4096 and r.extra["model_rss_mb"] >= 0
    env = r.environment
    assert "avx512_vnni" in env["cpu_flags"] and env["threads"] == {**env["threads"], "intra_op": 1, "inter_op": 1}
    assert env["onnxruntime"] and env["graph_optimization"] == "ORT_ENABLE_ALL"
    assert BenchResult.from_dict(json.loads(json.dumps(d))) == r


def test_cpu_dynamic_batches_and_fixed_batch_refusal(models):
    opts = BenchOptions(threads=1, iterations=5, warmup=1)
    results = get_backend("cpu", opts).run(models["dynamic"], [3])
    assert results[0].batch == 3 and results[0].throughput_ips == pytest.approx(3000.0 / results[0].latency_ms.mean)
    with pytest.raises(BackendError, match="fixed batch of 1; batch 4 needs a dynamic-batch export"):
        get_backend("cpu", opts).run(models["fixed"], [4])


def test_cpu_precision_is_the_models(models):
    opts = BenchOptions(threads=1, iterations=3, warmup=0)
    assert get_backend("cpu", opts).run(models["qdq"], [None])[0].precision == "int8"
    with pytest.raises(BackendError, match=r"runs the model as stored \(fp32\); precision 'fp16'"):
        get_backend("cpu", BenchOptions(precision="fp16")).run(models["fixed"], [None])


def test_latency_stats_and_cpu_info():
    s = LatencyStats.from_samples(np.arange(1, 101, dtype=float))
    assert (s.p50, s.p90, s.p99, s.mean, s.min, s.max) == pytest.approx((50.5, 90.1, 99.01, 50.5, 1, 100))
    info = cpu_info("model name\t: Intel(R) Xeon(R) Gold 6338\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert info["cpu_model"] == "Intel(R) Xeon(R) Gold 6338"
    assert info["cpu_flags"]["avx512_vnni"] and not info["cpu_flags"]["amx_int8"]


def test_registry_lists_backends():
    assert {"cpu", "cuda", "jetson"} <= set(BACKENDS.names())
    with pytest.raises(RegistryError, match="unknown backend 'tpu'; available: cpu, cuda, jetson"):
        get_backend("tpu", BenchOptions())


# --- parsers on stored outputs ----------------------------------------------------------------

def test_trtexec_summary_trt85():
    s = parse_trtexec(fixture("trtexec_trt85_orin_int8.log"))
    assert s.tensorrt_version == "8.5.2" and s.throughput_qps == pytest.approx(81.2243)
    assert s.latency == pytest.approx({"min": 12.1563, "max": 13.9021, "mean": 12.2811, "median": 12.2573,
                                       "p90": 12.3394, "p95": 12.3911, "p99": 13.0415})
    assert s.gpu_compute["median"] == pytest.approx(11.7988) and (s.queries, s.seconds) == (246, 3.02867)


def test_trtexec_summary_trt82_has_only_p99():
    s = parse_trtexec(fixture("trtexec_trt82_xavier_fp16.log"))
    assert s.tensorrt_version == "8.2.1"  # from the "[TensorRT v8201]" banner
    assert s.latency["median"] == pytest.approx(25.0479) and "p90" not in s.latency
    assert s.latency["p99"] == pytest.approx(26.5312) and s.queries == 104


def test_trtexec_failure_and_missing_summary():
    log = fixture("trtexec_failed.log")
    assert trtexec_error_line(log).startswith("ModelImporter.cpp:732: ERROR: builtin_op_importers.cpp:3518")
    with pytest.raises(BackendError, match="no performance summary"):
        parse_trtexec(log)


@pytest.mark.parametrize(("name", "rail", "power", "avg", "ram", "gr3d", "mhz"), [
    ("tegrastats_xavier_nx_jp46.log", "VDD_IN", 3584, 3584, (2448, 7764), 0, None),
    ("tegrastats_nano_jp46.log", "POM_5V_IN", 900, 943, (613, 3964), 0, None),
    ("tegrastats_orin_nano_jp62.log", "VDD_IN", 4900, 4900, (3172, 7620), 0, 306),
    ("tegrastats_agx_orin_jp512.log", "sum(VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO)",
     9188 + 1195 + 3229 + 802, 7188 + 1100 + 3100 + 790, (4023, 30536), 71, 1300),
])
def test_tegrastats_first_line(name, rail, power, avg, ram, gr3d, mhz):
    s = parse_tegrastats_line(fixture(name).splitlines()[0])
    assert (s["power_rail"], s["power_mw"], s["power_avg_mw"]) == (rail, power, avg)
    assert (s["ram_used_mb"], s["ram_total_mb"]) == ram and s["gr3d_pct"] == gr3d and s.get("gr3d_mhz") == mhz


def test_tegrastats_summary_xavier_and_orin():
    nx = summarize_tegrastats(fixture("tegrastats_xavier_nx_jp46.log"))
    assert nx["samples"] == 3 and nx["ram_used_peak_mb"] == 2812 and nx["power_peak_mw"] == 6512
    assert nx["power_mean_mw"] == pytest.approx((3584 + 5336 + 6512) / 3) and nx["gr3d_peak_pct"] == 99
    orin = summarize_tegrastats(fixture("tegrastats_orin_nano_jp62.log"))
    assert orin["power_mean_mw"] == pytest.approx((4900 + 9100 + 9300) / 3) and orin["gr3d_mean_pct"] == 60
    assert summarize_tegrastats("no stats here\n") == {"samples": 0}


def test_board_parsers():
    assert parse_nvpmodel(fixture("nvpmodel_q_xavier_nx.txt")) == {"mode": "MODE_20W_6CORE", "id": 8}
    nx = parse_jetson_clocks(fixture("jetson_clocks_show_xavier_nx.txt"))
    assert nx["locked"] is False and nx["online_cpus"] == 6 and nx["gpu_hz"]["max"] == 1109250000
    assert parse_jetson_clocks(fixture("jetson_clocks_show_orin_locked.txt"))["locked"] is True
    assert parse_jetson_clocks("jetson_clocks: permission denied")["locked"] is None
    assert parse_nv_tegra_release(fixture("nv_tegra_release_r32_7_1.txt")) == \
        {"l4t": "32.7.1", "jetpack": "4.6.1", "board": "t186ref"}
    assert parse_nv_tegra_release(fixture("nv_tegra_release_r36_4_3.txt"))["jetpack"] == "6.2"


def test_xavier_nx_result_gets_reference_rows_and_clock_warning():
    info = {"model": "NVIDIA Jetson Xavier NX Developer Kit\n", "release": fixture("nv_tegra_release_r32_7_1.txt"),
            "nvpmodel": fixture("nvpmodel_q_xavier_nx.txt"), "clocks": fixture("jetson_clocks_show_xavier_nx.txt"),
            "packages": "tensorrt 8.2.1.9-1+cuda10.2\n"}
    facts = device_facts(info)
    assert is_xavier_nx(facts) and facts["jetpack"] == "4.6.1"
    assert is_xavier_nx({"compatible": "nvidia,p3509-0000+p3668-0001 nvidia,tegra194"})
    assert not is_xavier_nx({"device_model": "NVIDIA Orin Nano Developer Kit"})
    backend = JetsonBackend(BenchOptions(host="nvidia@xavier"))
    summary = parse_trtexec(fixture("trtexec_trt82_xavier_fp16.log"))
    tegra = summarize_tegrastats(fixture("tegrastats_xavier_nx_jp46.log"))
    r = backend._result(_facts(), "fp16", 1, summary, tegra, info, "")
    assert r.reference == SEED_PAPER_XAVIER_NX and {x["latency_ms"] for x in r.reference} == {24.87, 24.98, 52.14}
    assert r.latency_ms.p50 == pytest.approx(25.0479) and r.latency_ms.p90 is None and not r.simulated
    assert r.environment["tensorrt"] == "8.2.1" and r.device_name.startswith("NVIDIA Jetson Xavier NX")
    assert any("clocks not locked" in n for n in r.notes)
    assert r.extra["energy_mj_per_image"] == pytest.approx(tegra["power_mean_mw"] / 39.7736)


def _facts():
    from qtool.backends.base import InputSpec, ModelFacts

    return ModelFacts(Path("m.onnx"), 10, "0" * 64, [InputSpec("input", (1, 3, 16, 16), "float32")], False)


def test_trtexec_args():
    base = ("/r/m.onnx", "/r/m.engine", "/c/t.cache")
    fp32 = trtexec_args(*base, "fp32", False, 100, 2, 500)
    assert fp32 == ["--onnx=/r/m.onnx", "--saveEngine=/r/m.engine", "--timingCacheFile=/c/t.cache",
                    "--iterations=100", "--duration=2", "--warmUp=500", "--avgRuns=10"]
    assert "--fp16" in trtexec_args(*base, "fp16", False, 100, 2, 500)
    qdq = trtexec_args(*base, "int8", True, 100, 2.5, 500, shapes="input:8x3x256x256")
    assert "--int8" in qdq and "--fp16" not in qdq and "--shapes=input:8x3x256x256" in qdq and "--duration=3" in qdq
    assert {"--int8", "--fp16"} <= set(trtexec_args(*base, "fp16", True, 100, 2, 500))
    with pytest.raises(BackendError, match="int8 needs a QDQ model"):
        trtexec_args(*base, "int8", False, 100, 2, 500)


# --- TensorRT backend: pure parts and the errors of a machine without it -----------------------

def test_tensorrt_pure_functions(tmp_path):
    assert builder_flags("fp32", False) == [] and builder_flags("fp16", False) == ["FP16"]
    assert builder_flags("int8", True) == ["INT8"] and builder_flags("fp16", True) == ["INT8", "FP16"]
    with pytest.raises(BackendError, match="int8 needs a QDQ model"):
        builder_flags("int8", False)
    k = cache_key("ab" * 32, "10.3.0", "int8", {"input": [1, 3, 256, 256]}, "Orin sm8.7")
    assert k == cache_key("ab" * 32, "10.3.0", "int8", {"input": [1, 3, 256, 256]}, "Orin sm8.7") and len(k) == 32
    assert k != cache_key("ab" * 32, "10.4.0", "int8", {"input": [1, 3, 256, 256]}, "Orin sm8.7")
    assert k != cache_key("ab" * 32, "10.3.0", "int8", {"input": [8, 3, 256, 256]}, "Orin sm8.7")
    engine, timing = cache_paths(tmp_path, k, "10.3.0")
    assert engine == tmp_path / f"{k}.engine" and timing == tmp_path / "timing-trt10.3.0.cache"


def test_cuda_without_tensorrt_is_one_line(monkeypatch, models):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    with pytest.raises(BackendError, match=r"^TensorRT is not installed \(pip install qtool\[tensorrt\]\)"):
        get_backend("cuda", BenchOptions()).run(models["fixed"], [None])


def test_cuda_without_gpu_is_one_line(monkeypatch):
    import torch

    from qtool.backends.tensorrt import cuda_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA GPU visible"):
        cuda_device()


# --- SSH plumbing -------------------------------------------------------------------------------

def test_ssh_errors_are_classified():
    assert "authentication to u@h failed" in str(classify_ssh_failure("u@h", "u@h: Permission denied (publickey).\n"))
    assert str(classify_ssh_failure("u@h", "ssh: connect to host h port 22: Connection refused\n")).startswith(
        "host u@h unreachable")
    assert "host key not known" in str(classify_ssh_failure("u@h", "Host key verification failed.\n"))
    assert str(classify_ssh_failure("u@h", "weird\n")) == "ssh to u@h failed: weird"


def test_ssh_argv_quotes_and_puts_user_options_first():
    c = SshClient("nvidia@10.0.0.2", ["Port=2222"])
    argv = c.argv(quote_command(["ls", "a b; rm -rf /"]))
    assert argv[-1] == "ls 'a b; rm -rf /'" and argv[-3:-1] == ["--", "nvidia@10.0.0.2"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert opts[0] == "Port=2222" and "BatchMode=yes" in opts and "StrictHostKeyChecking=yes" in opts
    with pytest.raises(BackendError, match="bad --ssh-option"):
        SshClient("h", ["-oProxyCommand=evil"])
    with pytest.raises(BackendError, match="bad ssh host"):
        SshClient("-oProxyCommand=evil")


# --- the command ------------------------------------------------------------------------------

def test_cli_bench_cpu_writes_json(models, tmp_path):
    out = tmp_path / "x.json"
    res = CliRunner().invoke(main, ["bench", "--device", "cpu", "--model", str(models["dynamic"]), "--batch", "1,2",
                                    "--threads", "1", "--iterations", "5", "--warmup", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "qtool.bench/1" and [r["batch"] for r in doc["results"]] == [1, 2]
    assert "p50 ms" in res.output and "img/s" in res.output


def test_cli_cuda_without_tensorrt_exits_2(models, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "x.json"
    res = CliRunner().invoke(main, ["bench", "--device", "cuda", "--model", str(models["fixed"]), "--out", str(out)])
    assert res.exit_code == 2 and not out.exists()
    assert res.output.startswith("error: TensorRT is not installed") and res.output.count("\n") == 1


def test_cli_unknown_device_lists_available(models):
    res = CliRunner().invoke(main, ["bench", "--device", "tpu", "--model", str(models["fixed"])])
    assert res.exit_code == 2 and "unknown backend 'tpu'; available: cpu, cuda, jetson" in res.output


def test_cli_jetson_needs_host_and_bad_batch(models):
    res = CliRunner().invoke(main, ["bench", "--device", "jetson", "--model", str(models["fixed"])])
    assert res.exit_code == 2 and "needs --host" in res.output
    res = CliRunner().invoke(main, ["bench", "--device", "cpu", "--model", str(models["fixed"]), "--batch", "x"])
    assert res.exit_code == 2 and "comma-separated" in res.output
