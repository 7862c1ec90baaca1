"""Placement planner and the `natix-miner plan` command (run through the real CLI function)."""

import argparse

import pytest
import yaml

from cascade.config import DeviceSpec, TierSpec
from cascade.placement import estimate_tier, parse_devices, parse_size_gib, plan_placement
from natix_miner.commands import plan


def run_plan(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    plan.add_parser(sub, "plan")
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def write(tmp_path, tiers, devices):
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump({"tiers": tiers, "devices": devices}))
    return path


GPU_TIERS = [
    {"name": "vit_l.roadwork", "backend": "hf_classifier", "device": "cuda", "dtype": "bfloat16",
     "params_m": 300, "reserve_mib": 2048},
    {"name": "qwen_vl_72b.awq", "backend": "vlm_vllm", "device": "cuda", "dtype": "awq",
     "params_m": 72000, "reserve_mib": 20480},
    {"name": "internvl3_78b.bf16", "backend": "vlm_vllm", "device": "cuda:1", "dtype": "bfloat16",
     "params_m": 78000, "reserve_mib": 8192},
]


def test_estimate_is_params_times_dtype_plus_reserve():
    spec = TierSpec(name="t", backend="x", dtype="float16", params_m=1000, reserve_mib=1024)
    est = estimate_tier(spec)
    assert est.weights_gib == pytest.approx(1000e6 * 2 / 2 ** 30)
    assert est.total_gib == pytest.approx(est.weights_gib + 1.0)


def test_first_fit_decreasing_and_context_overhead():
    tiers = [TierSpec(name=f"t{i}", backend="x", device="cuda", dtype="float16", params_m=m)
             for i, m in enumerate([5000, 20000, 12000, 3000])]
    placement = plan_placement(tiers, {"cuda:0": DeviceSpec(40.0), "cuda:1": DeviceSpec(40.0)})
    assert placement.fits
    # decreasing: t1 (37.3 GiB) on cuda:0, t2 (22.4) then t0 (9.3) on cuda:1, t3 (5.6) too
    assert placement.assignments == {"t1": "cuda:0", "t2": "cuda:1", "t0": "cuda:1", "t3": "cuda:1"}
    assert placement.devices["cuda:0"].overhead_gib == 0.5
    assert placement.devices["cuda:0"].used_gib == pytest.approx(0.5 + 20000e6 * 2 / 2 ** 30)


def test_plan_refuses_an_overcommitted_gpu_naming_the_tiers(tmp_path, capsys):
    cfg = write(tmp_path, GPU_TIERS, {"cuda:0": {"memory_gib": 80}, "cuda:1": {"memory_gib": 80}})
    code = run_plan(["--config", str(cfg)])
    out, err = capsys.readouterr()
    assert code == 1
    # 78B in bf16 is ~145 GiB: cuda:1 is over, and the tier is named
    assert "internvl3_78b.bf16" in err and "OVER" in out and "cuda:1" in out


def test_plan_accepts_a_fitting_config_and_devices_override(tmp_path, capsys):
    fitting = [t for t in GPU_TIERS if not t["name"].startswith("internvl")]
    cfg = write(tmp_path, fitting, {"cuda:0": {"memory_gib": 80}})
    assert run_plan(["--config", str(cfg)]) == 0
    out, _ = capsys.readouterr()
    assert "qwen_vl_72b.awq" in out and "fits" in out
    # the same config on a 24 GiB card: refused, the big tier named
    assert run_plan(["--config", str(cfg), "--devices", "cuda:0=24GiB"]) == 1
    _, err = capsys.readouterr()
    assert "qwen_vl_72b.awq" in err


def test_plan_unknown_device_and_bad_flags(tmp_path, capsys):
    cfg = write(tmp_path, GPU_TIERS, {"cuda:0": {"memory_gib": 80}})
    assert run_plan(["--config", str(cfg)]) == 1
    _, err = capsys.readouterr()
    assert "internvl3_78b.bf16" in err
    assert run_plan(["--config", str(cfg), "--devices", "cuda:0=lots"]) == 2
    assert run_plan(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_plan_default_cpu_config_fits(capsys):
    assert run_plan(["--config", "configs/cpu.yaml"]) == 0


def test_parse_devices():
    assert parse_size_gib("81920MiB") == 80 and parse_size_gib("24GB") == 24
    devs = parse_devices("cuda:0=80GiB, cuda:1=40")
    assert devs["cuda:0"].memory_gib == 80 and devs["cuda:1"].memory_gib == 40
    with pytest.raises(ValueError):
        parse_devices("gpu0=80GiB")
    with pytest.raises(ValueError):
        parse_devices("cuda:0")


def test_devices_override_floats_tiers_pinned_to_absent_gpus(tmp_path, capsys):
    cfg = write(tmp_path, GPU_TIERS[:1] + [{**GPU_TIERS[0], "name": "vit_l.pinned", "device": "cuda:1"}],
                {"cuda:0": {"memory_gib": 80}, "cuda:1": {"memory_gib": 80}})
    assert run_plan(["--config", str(cfg), "--devices", "cuda:0=24GiB"]) == 0
    out, _ = capsys.readouterr()
    assert "vit_l.pinned is pinned to cuda:1" in out


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu-1x.yaml", "h100x2.yaml"])
def test_repository_configs_fit_their_devices(name, capsys):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert run_plan(["--config", str(path)]) == 0
