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
    # 78B in bf16 is ~145 GiB: more than the 0.45 x 80 GiB vLLM books on cuda:1; the tier is named
    assert "internvl3_78b.bf16" in err and "cuda:1" in out
    assert "145.29 GiB of weights do not fit the 36.00 GiB it books" in out


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


# ---- honest placement (issue 8.4) -----------------------------------------------------------


def test_vllm_tier_books_its_gpu_memory_utilization_of_the_card(capsys):
    from pathlib import Path

    gpu1x = Path(__file__).resolve().parents[1] / "configs" / "gpu-1x.yaml"
    assert run_plan(["--config", str(gpu1x), "--devices", "cuda:0=80GiB"]) == 0
    out, _ = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.split()[1:2] == ["qwen25vl_3b.yes_no"])
    assert "36.00G" in row and "books 0.45 x 80.0 GiB" in row  # not the 10.8 GiB hand figure
    summary = next(line for line in out.splitlines() if line.startswith("cuda:0     = total"))
    assert "total 80.00 GiB" in summary and "free after booking" in summary
    assert "largest tier qwen25vl_3b.yes_no (36.00 GiB)" in summary


def test_fraction_booking_is_per_card_when_placed_on_plain_cuda():
    from cascade.tier import MemoryNeeds

    spec = TierSpec(name="vlm", backend="vlm_vllm", device="cuda", dtype="bfloat16", params_m=3000,
                    reserve_mib=4000)
    needs = {"vlm": MemoryNeeds(device_fraction=0.5)}
    placement = plan_placement([spec], {"cuda:0": DeviceSpec(24.0), "cuda:1": DeviceSpec(80.0)}, needs=needs)
    assert placement.fits and placement.assignments["vlm"] == "cuda:0"
    assert placement.devices["cuda:0"].used_gib == pytest.approx(0.5 + 12.0)  # reserve_mib ignored
    assert any("reserve_mib is ignored" in n for n in placement.notes)


def _tiny_vit(path, hidden=32):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=2)
    model = transformers.ViTForImageClassification(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def test_plan_counts_parameters_from_a_config_on_disk_and_warns_when_params_m_is_off(tmp_path, capsys):
    pytest.importorskip("accelerate")
    exact = _tiny_vit(tmp_path / "vit")
    tiers = [{"name": "vit.right", "backend": "hf_classifier", "checkpoint": "vit", "device": "cuda:0",
              "dtype": "float16", "params_m": round(exact / 1e6, 4)},
             {"name": "vit.wrong", "backend": "hf_classifier", "checkpoint": "vit", "device": "cuda:0",
              "dtype": "float16", "params_m": 1.0},
             {"name": "vit.hub", "backend": "hf_classifier", "checkpoint": "nobody/not-cached",
              "device": "cuda:0", "dtype": "float16", "params_m": 5.0}]
    cfg = write(tmp_path, tiers, {"cuda:0": {"memory_gib": 8}})
    assert run_plan(["--config", str(cfg)]) == 0
    out, _ = capsys.readouterr()
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("cuda:0     vit.")}
    assert "counted from vit/config.json" in rows["vit.right"] and "accelerate" in rows["vit.right"]
    assert f"{exact / 1e6:.1f}M" in rows["vit.wrong"] and "counted" in rows["vit.wrong"]  # the count wins
    assert f"{exact * 2 / 2 ** 30:.2f}G" in rows["vit.right"]  # fp16 bytes of the exact count
    assert "declared params_m" in rows["vit.hub"] and "5.0M" in rows["vit.hub"]  # nothing on disk
    assert "warning: tier vit.wrong: params_m 1 is" in out and "% off" in out
    assert "warning: tier vit.right" not in out


def test_engine_books_what_plan_prints(tmp_path):
    """The engine's own placement uses the backends' counts too (one plan, two readers)."""
    import asyncio

    from cascade.config import load_cascade_config
    from cascade.engine import CascadeEngine
    from cascade.tier import MemoryNeeds, Tier, TierOutput

    class Counted(Tier):
        def load(self, device):
            pass

        def predict(self, images):
            return [TierOutput(0.5) for _ in images]

        def memory_needs(self):
            return MemoryNeeds(params=2_000_000_000, weights_bytes=4 * 2 ** 30, source="test count")

    cfg = write(tmp_path, [{"name": "big.a", "backend": "x", "device": "cpu", "params_m": 1}],
                {"cpu": {"memory_gib": 3}})
    engine = CascadeEngine(load_cascade_config(cfg), Counted)
    with pytest.raises(Exception, match="big.a"):
        asyncio.run(engine.start())
