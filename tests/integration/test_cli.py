"""The ``qtool`` CLI in-process (click's CliRunner) on the shared tiny run, bad input, and real subprocesses.

Bad input must end with exit code 2, exactly one ``error:`` line on stderr naming the offending
thing, and no partial files in the output folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from helpers.kd_run import cli_ptq, copy_data, files_under, sha256, shared

from qtool.artifacts import ISA_CAPS, cpu_isa, isa_pins
from qtool.cli import main
from qtool.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
QTOOL = Path(sys.executable).parent / "qtool"


@pytest.fixture(scope="module")
def kd(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def clean_error(result: Result, *needles: object, out: Path | None = None) -> str:
    """Assert the bad-input contract and return the error line."""
    if result.exception and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr: {result.stderr!r}"
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in {lines[0]!r}"
    if out is not None:
        assert files_under(out) == [], f"partial output left in {out}: {files_under(out)}"
    return lines[0]


# ---------------------------------------------------------------- help


HELP = {
    (): ["data", "train", "eval", "export", "ptq", "run", "--verbose", "--version"],
    ("data",): ["synth", "split"],
    ("data", "synth"): ["--out", "--categories", "--n-train", "--size", "--seed", "--recipe", "--set"],
    ("data", "split"): ["--data", "--format", "--out", "--recipe", "--set"],
    ("train",): ["--out", "--epochs", "--mode", "--export", "--data", "--format", "--recipe", "--set"],
    ("export",): ["--model", "--out", "--batch-size", "--opset", "--recipe", "--set"],
    ("eval",): ["--model", "--out", "--data", "--format", "--recipe", "--set"],
    ("ptq",): ["--model", "--calib", "--calib-source", "--num-calib", "--target", "--bits", "--quantize",
               "--strict", "--out", "--dry-run", "--recipe", "--set"],
    ("run",): ["RECIPE_FILE", "--out", "--set"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c) or "qtool")
def test_help_lists_options(cmd):
    out = ok(invoke(*cmd, "--help")).stdout
    for word in HELP[cmd]:
        assert word in out, f"{word} missing from `qtool {' '.join(cmd)} --help`"


# ---------------------------------------------------------------- commands


def test_data_synth_and_split(tmp_path):
    from PIL import Image

    out = tmp_path / "synth"
    res = ok(invoke("data", "synth", "--out", out, "--categories", "grid", "--n-train", "3", "--size", "32",
                    "--set", "data.synth.n_test_good=1", "--set", "data.synth.n_test_defect=2"))
    assert str(out) in res.stdout
    assert len(list((out / "grid" / "train" / "good").glob("*.png"))) == 3
    defects = [p for p in (out / "grid" / "test").iterdir() if p.name != "good"]
    assert sum(len(list(d.glob("*.png"))) for d in defects) == 2
    for d in defects:
        for img in d.glob("*.png"):
            mask = out / "grid" / "ground_truth" / d.name / f"{img.stem}_mask.png"
            assert mask.is_file(), mask
            assert Image.open(img).size == Image.open(mask).size == (32, 32)
    res = ok(invoke("data", "split", "--data", out, "--format", "mvtec", "--out", tmp_path / "split.json"))
    assert re.search(r"grid: train \d+, holdout \d+, test 3 \(2 anomalous\)", res.stdout), res.stdout
    assert json.loads((tmp_path / "split.json").read_text())


def test_train_command(kd, tmp_path):
    out = tmp_path / "run"
    res = ok(invoke("train", "--recipe", kd.recipe_file, "--out", out, "--epochs", "1", "--no-export"))
    assert f"all: {out / 'model.pt'} (1 epochs" in res.stdout
    assert {"model.pt", "last.pt", "history.json", "recipe.yaml", "manifest.json", "split.json",
            "train.json"} <= set(files_under(out))
    assert "model.onnx" not in files_under(out)
    assert load_recipe(out / "recipe.yaml").train.epochs == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["model.pt"] == sha256(out / "model.pt")


def test_export_command(kd, tmp_path):
    out = tmp_path / "m.onnx"
    res = ok(invoke("export", "--model", kd.checkpoint, "--out", out, "--recipe", kd.recipe_file))
    parity = json.loads(res.stdout.split("parity vs torch", 1)[1])
    assert parity["map_max_rel"] < 1e-4
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    assert "qtool.data" in {p.key for p in model.metadata_props}


def test_eval_command_on_checkpoint_and_onnx(kd, tmp_path):
    results = {}
    for model in (kd.checkpoint, kd.onnx):
        out = tmp_path / f"{model.suffix[1:]}.json"
        res = ok(invoke("eval", "--model", model, "--recipe", kd.recipe_file, "--out", out))
        lines = res.stdout.strip().splitlines()
        assert [ln.split(":")[0] for ln in lines] == ["disc", "grid", "mean"], res.stdout
        results[model.suffix] = json.loads(out.read_text())["metrics"]["mean"]
    for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert results[".pt"][k] == pytest.approx(results[".onnx"][k], abs=1e-4), k


def test_ptq_dry_run_prints_the_plan(kd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--dry-run"))
    report = json.loads(res.stdout)
    q = report["plan"]["quantized_nodes"]
    graph = onnx.load(str(kd.onnx)).graph
    for part in ("teacher", "student"):
        convs = sum(n.op_type == "Conv" and n.name.startswith(f"/{part}/") for n in graph.node)
        assert q.get(f"{part}/Conv") == convs, q
    assert not [k for k in q if k.startswith("head/")]
    assert report["plan"]["tensors_to_calibrate"] > 0
    assert list(tmp_path.iterdir()) == [], "a dry run wrote files"


def test_ptq_command_writes_model_report_recipe_manifest(kd, tmp_path_factory):
    result, out = cli_ptq(tmp_path_factory, "entropy-cpu", "--calib", "entropy", "--target", "cpu")
    ok(result)
    assert "nodes quantized" in result.stdout and "SQNR" in result.stdout
    assert set(files_under(out)) == {"model.onnx", "report.json", "recipe.yaml", "manifest.json"}
    onnx.checker.check_model(str(out / "model.onnx"))
    report = json.loads((out / "report.json").read_text())
    assert report["calibrator"] == "entropy" and report["target"] == "cpu"
    tensors = report["quantization"]["tensors"]
    assert len(tensors) >= report["plan"]["tensors_to_calibrate"] > 0
    for name, t in tensors.items():
        assert math.isfinite(t["lo"]) and math.isfinite(t["hi"]) and t["lo"] <= t["hi"], name
        assert t["scale"] > 0, name
    for key in ("anomaly_map", "score"):
        assert math.isfinite(report["sqnr_db"][key]), report["sqnr_db"]
    assert set(report["stage_seconds"]) == {"load", "prepare", "policy", "calibrate", "weight_rounding",
                                            "bias_correction", "insert_qdq", "lint", "save", "sqnr"}
    assert report["weight_rounding"] == {"method": "nearest"}
    assert all(v >= 0 for v in report["stage_seconds"].values())
    saved = load_recipe(out / "recipe.yaml")
    assert saved.ptq.calib == "entropy" and saved == kd.recipe("ptq.calib=entropy", "ptq.target=cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["sha256"] == sha256(kd.onnx)
    assert manifest["outputs"]["model.onnx"] == sha256(out / "model.onnx")
    assert manifest["versions"]["onnxruntime"]
    assert manifest["machine"]["isa"] == cpu_isa() and manifest["machine"]["isa_pins"] == isa_pins()


@pytest.mark.slow
def test_run_ci_recipe_end_to_end(tmp_path):
    """The CI recipe through ``qtool run``, shrunk (.ci/run runs it at full size)."""
    out = tmp_path / "run"
    res = ok(invoke("run", REPO / "recipes" / "ci.yaml", "--out", out, "--set", f"data.root={tmp_path / 'data'}",
                    "--set", "train.epochs=1", "--set", "data.synth.n_train=6", "--set", "data.synth.n_test_good=2",
                    "--set", "data.synth.n_test_defect=2", "--set", "ptq.calib_data.num_samples=4",
                    "--set", "model.levels=[1,2]", "--set", "train.threads=1", "--set", "eval.threads=1"))
    assert "| all | fp32 |" in res.stdout and "| all | int8 entropy/cpu |" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "ci" and [r["precision"] for r in summary["rows"]] == ["fp32", "int8 entropy/cpu"]
    for row in summary["rows"]:
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    files = set(files_under(out))
    assert {"train/model.pt", "train/model.onnx", "ptq/model.onnx", "ptq/report.json", "summary.md",
            "recipe.yaml", "manifest.json", "eval-fp32.json", "eval-int8.json"} <= files
    assert load_recipe(out / "recipe.yaml").train.epochs == 1


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken_models(kd, tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    raw = kd.onnx.read_bytes()
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    (d / "junk.onnx").write_bytes(b"this is not an ONNX model\n" * 40)
    (d / "junk.pt").write_bytes(b"\x80\x04 not a checkpoint" * 10)
    return d


@pytest.mark.parametrize("name", ["truncated.onnx", "junk.onnx"])
def test_ptq_on_a_broken_onnx(kd, broken_models, tmp_path, name):
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", broken_models / name, "--recipe", kd.recipe_file, "--out", out),
                broken_models / name, "not a valid ONNX model", out=out)


@pytest.mark.parametrize(("override", "needle"), [("model.options.map_sigma=-1", "map_sigma=-1"),
                                                   ("model.options.map_levels=[9]", "map_levels=[9]"),
                                                   ("model.options.map_combine=max", "map_combine='max'"),
                                                   ("data.root=/nonexistent/qtool-data", "/nonexistent/qtool-data")])
def test_train_with_a_bad_model_option_or_data_root_writes_nothing(kd, tmp_path, override, needle):
    out = tmp_path / "train"
    clean_error(invoke("train", "--recipe", kd.recipe_file, "--out", out, "--set", "model.name=rd",
                       "--set", override), needle)
    assert not out.exists()


def test_train_with_the_proxy_but_no_held_out_normals_writes_nothing(kd, tmp_path):
    out = tmp_path / "train"
    clean_error(invoke("train", "--recipe", kd.recipe_file, "--out", out, "--set", "train.proxy_every=1",
                       "--set", "data.holdout_fraction=0"), "train.proxy_every needs at least 2 held-out normals")
    assert not out.exists()


@pytest.mark.parametrize("name", ["truncated.onnx", "junk.pt", "missing.onnx", "model.txt"])
def test_eval_on_a_broken_or_missing_model(kd, broken_models, tmp_path, name):
    path = broken_models / name
    if name == "model.txt":
        path.write_text("hello")
    out = tmp_path / "res.json"
    clean_error(invoke("eval", "--model", path, "--recipe", kd.recipe_file, "--out", out), path)
    assert not out.exists()


def test_unknown_calibrator_lists_the_available(kd, tmp_path):
    out = tmp_path / "out"
    line = clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out,
                              "--calib", "kmeans"), "kmeans", out=out)
    for name in ("minmax", "percentile", "entropy", "mse"):
        assert name in line


def test_unknown_target_profile_lists_the_available(kd, tmp_path):
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--target", "fpga"),
                "fpga", "cpu", "tensorrt", out=out)


def test_bad_bit_width_and_unknown_key(kd, tmp_path):
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--bits", "5"),
                "ptq.activation_bits", out=out)
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out,
                       "--set", "ptq.calibrator=minmax"), "ptq.calibrator", "unknown key", out=out)


def test_ptq_refuses_a_foreign_output_folder(kd, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out), out)
    assert files_under(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_calibrating_on_the_test_split_is_refused(kd, tmp_path):
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
                       "--set", "ptq.calib_data.source=test", "--set", "ptq.calib_data.num_samples=8"),
                "allow_anomalies", out=out)


def test_test_split_is_refused_even_when_the_first_images_are_normal(kd, tmp_path):
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
                       "--set", "ptq.calib_data.source=test", "--set", "ptq.calib_data.num_samples=2"),
                "allow_anomalies", out=out)


def test_calibrating_on_the_test_split_when_allowed(kd, tmp_path):
    out = tmp_path / "out"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
              "--set", "ptq.calib_data.source=test", "--set", "ptq.calib_data.num_samples=8",
              "--set", "ptq.calib_data.allow_anomalies=true"))
    calib = json.loads((out / "report.json").read_text())["calibration"]
    assert calib["source"] == "test" and calib["images"] == 8 and "test split" in calib["warning"]
    assert any("/test/" in f and "/good/" not in f for f in calib["files"]), "no anomaly was calibrated on"


def test_broken_recipe_yaml_names_file_and_line(kd, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndata:\n  image_size: 64\n root: x\n")
    clean_error(invoke("eval", "--model", kd.onnx, "--recipe", bad), bad, "line 4")
    out = tmp_path / "out"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", bad, "--out", out), bad, out=out)


def _first_defect(data: Path, cat: str) -> tuple[Path, Path]:
    defect = sorted(p for p in (data / cat / "test").iterdir() if p.name != "good")[0]
    img = sorted(defect.glob("*.png"))[0]
    return img, data / cat / "ground_truth" / defect.name / f"{img.stem}_mask.png"


def test_corrupt_image_is_named(kd, tmp_path):
    data = copy_data(kd.data, tmp_path / "data")
    img, _ = _first_defect(data, "grid")
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out = tmp_path / "res.json"
    clean_error(invoke("eval", "--model", kd.onnx, "--recipe", kd.recipe_file, "--data", data, "--out", out), img)
    assert not out.exists()


def test_missing_mask_is_named(kd, tmp_path):
    data = copy_data(kd.data, tmp_path / "data")
    img, mask = _first_defect(data, "disc")
    mask.unlink()
    clean_error(invoke("eval", "--model", kd.onnx, "--recipe", kd.recipe_file, "--data", data), img, mask)


@pytest.fixture(scope="module")
def dynamic_onnx(kd, tmp_path_factory) -> Path:
    from qtool.modelio import stamp_data_config
    from qtool.models import load_checkpoint

    model, meta = load_checkpoint(kd.checkpoint)
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.onnx"
    axes = {"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["anomaly_map", "score"], dynamic_axes=axes)
    stamp_data_config(path, meta["data"])
    return path


def _ptq_dynamic(kd, path, out) -> Result:
    return invoke("ptq", "--model", path, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax")


def test_dynamic_batch_model_is_quantized_or_refused_cleanly(kd, dynamic_onnx, tmp_path):
    out = tmp_path / "out"
    res = _ptq_dynamic(kd, dynamic_onnx, out)
    if res.exit_code == 0:
        assert (out / "model.onnx").is_file()
    else:
        clean_error(res, "image", "dynamic", out=out)


def test_dynamic_batch_error_remedy_exists(kd, dynamic_onnx, tmp_path):
    res = _ptq_dynamic(kd, dynamic_onnx, tmp_path / "out")
    if res.exit_code == 0:
        return
    suggested = re.findall(r"--[a-z][a-z-]+", res.stderr)
    help_text = invoke("ptq", "--help").stdout
    assert all(flag in help_text for flag in suggested), f"error suggests {suggested}, not options of qtool ptq"


# ---------------------------------------------------------------- real subprocesses


def _run(*args: object) -> subprocess.CompletedProcess:
    assert QTOOL.is_file(), f"console script {QTOOL} not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(QTOOL), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_console_script_help():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    for cmd in ("data", "train", "eval", "export", "ptq", "run"):
        assert cmd in p.stdout


def test_console_script_eval(kd, tmp_path):
    p = _run("eval", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", tmp_path / "res.json")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^mean: \{'image_auroc'", p.stdout, re.M), p.stdout
    assert json.loads((tmp_path / "res.json").read_text())["n_test"] == 8


@pytest.mark.skipif(cpu_isa() not in ("avx2", "avx512"), reason="needs an x86 CPU with AVX2 or wider")
def test_isa_cap_reaches_torch_and_the_manifest(kd, tmp_path):
    out = tmp_path / "run"
    p = _run("--isa-cap", "avx2", "train", "--recipe", kd.recipe_file, "--out", out, "--no-export")
    assert p.returncode == 0, p.stderr
    machine = json.loads((out / "manifest.json").read_text())["machine"]
    assert machine["isa_pins"] == ISA_CAPS["avx2"]
    assert machine["torch_cpu_capability"] == "AVX2"  # torch dispatched to the capped kernels


def test_isa_cap_after_torch_loaded_is_one_line_error():
    res = invoke("--isa-cap", "avx2", "data", "--help")  # in-process: this test process has torch loaded
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: --isa-cap avx2: torch is already loaded; "
                                  "the cap must be set before it loads")


def test_console_script_bad_input_is_one_line(tmp_path):
    missing = tmp_path / "no-such-dataset"
    p = _run("data", "split", "--data", missing, "--format", "mvtec")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], p.stderr
    assert p.stdout == ""


def test_dynamic_batch_model_quantizes_with_input_shape(kd, dynamic_onnx, tmp_path):
    out = tmp_path / "out"
    ok(invoke("ptq", "--model", dynamic_onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
              "--input-shape", "image=2,3,64,64"))
    model = onnx.load(str(out / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 64, 64]


def test_malformed_input_shape_is_a_usage_error(kd, dynamic_onnx, tmp_path):
    res = invoke("ptq", "--model", dynamic_onnx, "--recipe", kd.recipe_file, "--out", tmp_path / "o",
                 "--input-shape", "image=1,three")
    assert res.exit_code == 2 and "--input-shape" in res.stderr


def test_weight_range_flag_sets_every_weights_rule_and_a_bad_rule_is_one_line(kd, tmp_path):
    out = tmp_path / "mse"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
              "--bits", "4", "--weight-range", "mse"))
    report = json.loads((out / "report.json").read_text())["quantization"]
    assert report["weights"] and {w["range"] for w in report["weights"].values()} == {"mse"}
    bad = tmp_path / "bad"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", bad, "--weight-range", "kl"),
                "weight range rule 'kl' unknown", "minmax, mse", out=bad)


def test_weight_rounding_flag_is_recorded_and_a_bad_method_is_one_line(kd, tmp_path):
    out = tmp_path / "gptq"
    res = ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
                    "--bits", "4", "--weight-rounding", "gptq"))
    assert "weight rounding gptq:" in res.stdout and "(nearest) ->" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["weight_rounding"]["method"] == "gptq" and "weight_rounding" in report["stage_seconds"]
    assert {w["rounding"] for w in report["quantization"]["weights"].values()} == {"given"}
    assert load_recipe(out / "recipe.yaml").ptq.weight_rounding == "gptq"
    bad = tmp_path / "bad"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", bad,
                       "--weight-rounding", "stochastic"),
                "weight rounding 'stochastic' unknown", "gptq, nearest", out=bad)


def test_bias_correction_flag_moves_biases_toward_fp32_and_is_recorded(kd, tmp_path):
    out = tmp_path / "bc"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
              "--bits", "4", "--bias-correction"))
    report = json.loads((out / "report.json").read_text())
    bc = report["bias_correction"]
    assert bc["layers"] and bc["relative_shift"]["after"] < bc["relative_shift"]["before"]
    assert "bias_correction" in report["stage_seconds"]
    assert load_recipe(out / "recipe.yaml").ptq.bias_correction is True
    off = tmp_path / "off"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", off, "--calib", "minmax",
              "--bits", "4", "--no-bias-correction"))
    plain = json.loads((off / "report.json").read_text())
    assert "bias_correction" not in plain and "bias_correction" not in plain["stage_seconds"]
    assert plain["quantization"]["tensors"] == report["quantization"]["tensors"]  # the same ranges, other biases
    assert load_recipe(off / "recipe.yaml").ptq.bias_correction is False


def test_bias_correction_never_breaks_the_mixed_precision_budget(kd, tmp_path):
    out = tmp_path / "mp"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
              "--bits", "4", "--mixed-precision", "0", "--mp-criterion", "separation", "--set", "ptq.search.normals=4"))
    report = json.loads((out / "report.json").read_text())
    assert report["proxy"]["drop"] <= 1e-9  # the saved graph's proxy, measured after bias correction
    bc, mp = report["bias_correction"], report["mixed_precision"]
    assert "why" not in bc and {"layers", "skipped"} <= set(bc)  # the correction is never dropped for the budget
    # mixed precision judged the corrected graph: its final score is the saved graph's
    assert mp["bias_corrected"]["graphs"] == len(mp["bias_corrected"]["added"]) + 1
    assert mp["final"]["drop"] == pytest.approx(report["proxy"]["drop"], abs=1e-9)
    assert mp["final"]["loss"] == pytest.approx(report["proxy"]["quantized"]["loss"], abs=1e-9)


def test_distortion_criterion_bounds_the_saved_graphs_share_of_the_map_distortion(kd, tmp_path):
    out = tmp_path / "mpd"
    result = invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
                    "--bits", "4", "--mixed-precision", "0.5", "--mp-criterion", "distortion", "--mp-rank", "per-mac",
                    "--weight-range", "mse", "--set", "ptq.search.normals=4")
    ok(result)
    report = json.loads((out / "report.json").read_text())
    mp = report["mixed_precision"]
    assert mp["criterion"] == "distortion" and "map distortion" in mp["proxy"]
    assert mp["all_quantized"]["value"] == pytest.approx(1.0) and mp["final"]["value"] <= 0.5
    assert mp["fallback"], "premise: the all-4-bit graph is over half its own distortion only once something is float"
    # the graph as saved (bias-corrected or not), measured after the pipeline built it, is within the share too
    assert report["proxy"]["quantized"]["loss"] <= 0.5 * mp["all_quantized"]["loss"] + 1e-12
    assert "mixed precision:" in result.output and "distortion 1.0000 ->" in result.output
    assert load_recipe(out / "recipe.yaml").ptq.mixed_precision_criterion == "distortion"
    assert load_recipe(out / "recipe.yaml").ptq.mixed_precision_rank == "per-mac" and mp["rank"] == "per-mac"
    assert sorted(mp["order"]) == sorted(mp["rank_mac_share"]) and len(mp["order"]) == mp["layers"]
    # the saved graph keeps the recipe's weight range rule (mixed precision's sub-spec once dropped it for minmax)
    weights = report["quantization"]["weights"]
    assert weights and {w["range"] for w in weights.values()} == {"mse"}
    # 4 bits is emulated here: the fallbacks' cost is their MAC share and their latency on the 8-bit stand-in
    assert mp["latency"]["stand_in"] and mp["latency"]["graph"].startswith("w8a8 stand-in")
    assert 0 < mp["macs"]["float_share"] < 1
    assert sum(f["macs_share"] for f in mp["fallback"]) == pytest.approx(mp["macs"]["float_share"], abs=1e-5)


def test_head_inputs_flag_drops_the_qdq_only_the_head_reads(kd, tmp_path):
    runs = {}
    for h in ("quantized", "float"):
        out = tmp_path / h
        ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "minmax",
                  "--bits", "4", "--head-inputs", h))
        runs[h] = json.loads((out / "report.json").read_text())
        assert load_recipe(out / "recipe.yaml").ptq.head_inputs == h
    q, f = (runs[h]["quantization"] for h in ("quantized", "float"))
    assert runs["quantized"]["plan"]["head_reads_float"] == []
    assert runs["float"]["plan"]["head_reads_float"] and all(
        n.startswith("/head/") for n in runs["float"]["plan"]["head_reads_float"])
    assert set(f["tensors"]) < set(q["tensors"]) and f["q_nodes"] < q["q_nodes"]


def test_input_bits_flag_widens_the_image_only_and_a_bad_width_is_one_line(kd, tmp_path):
    out = tmp_path / "in8"
    ok(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", out, "--calib", "mse",
              "--bits", "4", "--input-bits", "8"))
    tensors = json.loads((out / "report.json").read_text())["quantization"]["tensors"]
    image = onnx.load(str(kd.onnx)).graph.input[0].name
    assert tensors[image]["bits"] == 8 and {t["bits"] for n, t in tensors.items() if n != image} == {4}
    assert load_recipe(out / "recipe.yaml").ptq.input_bits == 8
    bad = tmp_path / "bad"
    clean_error(invoke("ptq", "--model", kd.onnx, "--recipe", kd.recipe_file, "--out", bad, "--input-bits", "5"),
                "ptq.input_bits", "bit width 5 not supported", out=bad)
