"""GPU memory planning: which tier goes on which device, and whether the config fits at all.

Honest estimates only. A tier books its weights plus the activation reserve it declares for its
`max_batch_size` (`reserve_mib`). The weights are counted exactly where the backend can (its
`Tier.memory_needs()`: the checkpoint's config on disk, built on the meta device with accelerate),
else taken from the YAML's `params_m` x bytes per dtype; the plan says which figure came from
where and warns when a declared `params_m` is more than 10% off the count. A runtime that takes a
fraction of the whole device whatever its weights (vLLM's `gpu_memory_utilization`) books exactly
that fraction of the card. Each CUDA device loses its context overhead (0.5 GiB unless the device
says otherwise) before any model loads. Tiers pinned to a device ("cuda:0", "cpu") go there;
tiers on plain "cuda" are placed first-fit-decreasing over the cuda devices. A plan that does not
fit names the offending tiers. The engine loads each tier on the device this plan picks.
"""

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from cascade.config import DTYPE_BYTES, DeviceSpec, TierSpec
from cascade.tier import MemoryNeeds

GIB = 1024 ** 3
MIB = 1024 ** 2
DEFAULT_CUDA_OVERHEAD_GIB = 0.5
PARAMS_TOLERANCE = 0.10  # a declared params_m further than this from the count gets a warning


class PlacementError(RuntimeError):
    """The tiers do not fit the devices; the message is the plan table with the offenders named."""

    def __init__(self, placement: "Placement") -> None:
        self.placement = placement
        super().__init__("the cascade does not fit its devices:\n" + format_plan(placement))


@dataclass(frozen=True)
class TierEstimate:
    name: str
    requested: str
    dtype: str
    params_m: float
    weights_gib: float
    reserve_gib: float
    # where params_m / weights_gib came from: "declared params_m" (the YAML) or the backend's count
    source: str = "declared params_m"
    # the runtime books this fraction of its whole device (vLLM); None: weights + reserve
    device_fraction: Optional[float] = None
    declared_params_m: Optional[float] = None  # the YAML's params_m when `source` is a count

    def booked_gib(self, capacity_gib: Optional[float]) -> float:
        """What the tier takes on a device of `capacity_gib` (the fraction of it for vLLM)."""
        if self.device_fraction is not None and capacity_gib is not None:
            return self.device_fraction * capacity_gib
        return self.weights_gib + self.reserve_gib

    @property
    def total_gib(self) -> float:
        """Weights + reserve (what a fraction-booked tier takes is `booked_gib(capacity)`)."""
        return self.weights_gib + self.reserve_gib


@dataclass
class DeviceLoad:
    name: str
    capacity_gib: Optional[float]  # None: not budgeted (host memory of an unlisted cpu)
    overhead_gib: float
    tiers: list[TierEstimate] = field(default_factory=list)

    def booked_gib(self, tier: "TierEstimate") -> float:
        return tier.booked_gib(self.capacity_gib)

    @property
    def used_gib(self) -> float:
        return self.overhead_gib + sum(self.booked_gib(t) for t in self.tiers)

    @property
    def largest(self) -> Optional["TierEstimate"]:
        return max(self.tiers, key=self.booked_gib, default=None)

    @property
    def free_gib(self) -> float:
        return float("inf") if self.capacity_gib is None else self.capacity_gib - self.used_gib

    @property
    def fits(self) -> bool:
        return self.free_gib >= -1e-9


@dataclass
class Placement:
    assignments: dict[str, str]
    devices: dict[str, DeviceLoad]
    problems: list[str]
    offenders: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def device_of(self, tier: str) -> str:
        return self.assignments[tier]


def estimate_tier(spec: TierSpec, needs: Optional[MemoryNeeds] = None) -> TierEstimate:
    """Weights (counted by the backend where it can, else params_m x bytes per dtype) + the
    declared reserve for the tier's max batch; a fraction-booked runtime (vLLM) keeps its fraction."""
    needs = needs or MemoryNeeds()
    params_m = spec.params_m if needs.params is None else needs.params / 1e6
    if needs.weights_bytes is not None:
        weights = needs.weights_bytes / GIB
    else:
        weights = params_m * 1e6 * DTYPE_BYTES[spec.dtype] / GIB
    counted = needs.params is not None or needs.weights_bytes is not None
    reserve = 0.0 if needs.device_fraction is not None else spec.reserve_mib * MIB / GIB
    return TierEstimate(spec.name, spec.device, spec.dtype, params_m, weights, reserve,
                        source=(needs.source or "counted") if counted else "declared params_m",
                        device_fraction=needs.device_fraction,
                        declared_params_m=spec.params_m if counted else None)


def _params_note(spec: TierSpec, est: TierEstimate) -> Optional[str]:
    if est.declared_params_m is None:
        return None
    if spec.params_m <= 0:
        return f"tier {spec.name}: params_m is not declared; counted {est.params_m:.1f}M ({est.source})"
    off = abs(spec.params_m - est.params_m) / max(est.params_m, 1e-9)
    if off > PARAMS_TOLERANCE:
        return (f"warning: tier {spec.name}: params_m {spec.params_m:g} is {100 * off:.0f}% off the "
                f"{est.params_m:.1f}M counted ({est.source}); the count is used")
    return None


def _overhead(name: str, spec: DeviceSpec) -> float:
    if spec.context_overhead_gib is not None:
        return spec.context_overhead_gib
    return DEFAULT_CUDA_OVERHEAD_GIB if name.startswith("cuda") else 0.0


def plan_placement(tiers: Sequence[TierSpec], devices: Mapping[str, DeviceSpec], *,
                   float_missing_cuda: bool = False,
                   needs: Optional[Mapping[str, MemoryNeeds]] = None) -> Placement:
    """Assign every tier to a device; `problems` lists why the plan does not fit (empty: it fits).

    `needs`: what each backend knows about its memory (`Tier.memory_needs()`), by tier name.
    `float_missing_cuda` (used by `plan --devices`): a tier pinned to a cuda device that is not
    listed is placed like a plain "cuda" tier instead of being refused, and `notes` says so.
    """
    needs = needs or {}
    loads = {name: DeviceLoad(name, d.memory_gib, _overhead(name, d)) for name, d in devices.items()}
    assignments: dict[str, str] = {}
    problems: list[str] = []
    offenders: list[str] = []
    floating: list[TierEstimate] = []
    notes: list[str] = []
    for spec in tiers:
        est = estimate_tier(spec, needs.get(spec.name))
        note = _params_note(spec, est)
        if note:
            notes.append(note)
        if est.device_fraction is not None and spec.reserve_mib:
            notes.append(f"tier {spec.name}: reserve_mib is ignored, the runtime books "
                         f"{est.device_fraction:g} of its device")
        dev = spec.device
        if float_missing_cuda and dev.startswith("cuda:") and dev not in loads:
            notes.append(f"tier {spec.name} is pinned to {dev}, which is not listed: placed on any cuda device")
            dev = "cuda"
        if dev == "cuda":
            floating.append(est)
            continue
        if dev not in loads:
            if dev == "cpu":  # host RAM is not planned unless the config lists a cpu device
                loads["cpu"] = DeviceLoad("cpu", None, 0.0)
            else:
                problems.append(f"tier {spec.name}: device {dev!r} is not among the devices "
                                f"{sorted(loads)}")
                offenders.append(spec.name)
                continue
        loads[dev].tiers.append(est)
        assignments[spec.name] = dev
    cuda = sorted((n for n in loads if n.startswith("cuda")), key=_device_order)
    for est in sorted(floating, key=lambda e: -e.total_gib):
        target = next((n for n in cuda if loads[n].free_gib >= loads[n].booked_gib(est)), None)
        if target is None:
            best = max((loads[n].free_gib for n in cuda), default=0.0)
            problems.append(f"tier {est.name}: needs {est.total_gib:.2f} GiB on any cuda device, "
                            f"the most free is {best:.2f} GiB" if cuda else
                            f"tier {est.name}: device 'cuda' but no cuda device is listed")
            offenders.append(est.name)
            continue
        loads[target].tiers.append(est)
        assignments[est.name] = target
    for load in loads.values():
        for t in load.tiers:
            booked = load.booked_gib(t)
            if t.device_fraction is not None and t.weights_gib > booked:
                problems.append(f"tier {t.name}: its {t.weights_gib:.2f} GiB of weights do not fit the "
                                f"{booked:.2f} GiB it books ({t.device_fraction:g} of {load.name}); "
                                "raise gpu_memory_utilization")
                offenders.append(t.name)
        if not load.fits:
            names = [t.name for t in load.tiers]
            problems.append(f"{load.name}: needs {load.used_gib:.2f} GiB (incl. {load.overhead_gib:.2f} GiB "
                            f"context) of {load.capacity_gib:.2f} GiB; tiers there: {', '.join(names)}")
            offenders.extend(n for n in names if n not in offenders)
    return Placement(assignments, loads, problems, offenders, notes)


def _device_order(name: str) -> tuple[int, str]:
    m = re.search(r":(\d+)$", name)
    return (int(m.group(1)) if m else 0, name)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*$", re.IGNORECASE)


def parse_size_gib(text: str) -> float:
    """'80GiB', '80GB', '80', '81920MiB' -> GiB (GB is read as GiB: vendors' '80GB' cards are 80 GiB-ish)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"cannot read memory size {text!r} (examples: 80GiB, 24GB, 16384MiB)")
    value, unit = float(m.group(1)), (m.group(2) or "gib").lower()
    if unit in ("mib", "mb", "m"):
        return value / 1024
    if unit in ("tib", "tb", "t"):
        return value * 1024
    return value


def parse_devices(text: str) -> dict[str, DeviceSpec]:
    """'cuda:0=80GiB,cuda:1=80GiB' -> devices for `plan --devices` (what-if on another machine)."""
    out: dict[str, DeviceSpec] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"device entry {part!r} must look like NAME=SIZE (e.g. cuda:0=80GiB)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
            raise ValueError(f"device name {name!r} must be cpu, cuda or cuda:N")
        out[name] = DeviceSpec(memory_gib=parse_size_gib(size))
    if not out:
        raise ValueError("no devices given (example: cuda:0=80GiB,cuda:1=80GiB)")
    return out


def format_plan(placement: Placement) -> str:
    """A per-device table of tiers, their memory and where each figure came from; per device its
    total, what stays free after booking, and its largest tier."""
    lines = [f"{'device':<10} {'tier':<40} {'dtype':<9} {'params':>9} {'weights':>9} {'reserve':>9} "
             f"{'booked':>9}  source"]
    for name in sorted(placement.devices, key=_device_order):
        load = placement.devices[name]
        if load.overhead_gib:
            lines.append(f"{name:<10} {'(runtime context)':<40} {'':<9} {'':>9} {'':>9} {'':>9} "
                         f"{load.overhead_gib:>8.2f}G")
        for t in load.tiers:
            booked = load.booked_gib(t)
            source = t.source
            if t.device_fraction is not None:
                cap = "its device" if load.capacity_gib is None else f"{load.capacity_gib:.1f} GiB"
                source += f"; books {t.device_fraction:g} x {cap}"
            reserve = "-" if t.device_fraction is not None and load.capacity_gib is not None \
                else f"{t.reserve_gib:>8.2f}G"
            lines.append(f"{name:<10} {t.name:<40} {t.dtype:<9} {t.params_m:>8.1f}M {t.weights_gib:>8.2f}G "
                         f"{reserve:>9} {booked:>8.2f}G  {source}")
        largest = load.largest
        if load.capacity_gib is None:
            summary = f"= booked {load.used_gib:.2f} GiB (unbudgeted)"
        else:
            summary = (f"= total {load.capacity_gib:.2f} GiB, booked {load.used_gib:.2f} GiB, "
                       f"free after booking {load.free_gib:.2f} GiB")
        if largest is not None:
            summary += f"; largest tier {largest.name} ({load.booked_gib(largest):.2f} GiB)"
        lines.append(f"{name:<10} {summary}  {'ok' if load.fits else 'OVER'}")
    lines.extend(f"note: {n}" for n in placement.notes)
    if placement.problems:
        lines.append("does not fit:")
        lines.extend(f"  - {p}" for p in placement.problems)
    return "\n".join(lines)
