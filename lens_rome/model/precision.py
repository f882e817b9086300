"""Which precision runs fast here: bfloat16 only where the hardware has it.

bfloat16 halves the memory a forward pass moves and, on CPUs with bf16 units
(AVX-512 BF16, AMX, Arm's BF16 extension) and on GPUs since Ampere, multiplies
matrices several times faster than float32.  Elsewhere PyTorch emulates it: on
an AVX2-only CPU a bf16 matrix product runs about 300x slower than float32.
So lens_rome never assumes bf16: a setting of ``bf16=None`` (ROME's v* loop,
on request) asks :func:`bf16_is_fast`, which measures once per process and device type
(a few milliseconds where bf16 is slow, well under a second where it is fast).
``bf16=True`` on hardware without bf16 units still runs in bfloat16, but
warns once that it will be slow.

Causal traces and edits default to float32, the exact path and the same numbers on
every machine (bf16 scores differ from float32 by up to ~0.01, a bf16 v* loop changes
an edit's update by a few percent); ``bf16="auto"`` (traces) and ``bf16=None``
(edits) pick bfloat16 where it is fast.
"""

from __future__ import annotations

import logging
import platform
import time
import warnings

import torch

from lens_rome.errors import InputError

log = logging.getLogger(__name__)

FLOAT32, BFLOAT16 = "float32", "bfloat16"

# bf16 must beat float32 by this factor to be worth its rounding.
SPEEDUP_NEEDED = 1.25
# Below this rate a bf16 product is emulated: no need to time float32 against it.
EMULATED_GFLOPS = 10.0

_FAST: dict[str, bool] = {}
_PROBES: dict[str, dict] = {}
_WARNED: set[str] = set()


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device if device is not None else "cpu").type


def _seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Best wall time of ``a @ b`` over ``repeats`` runs (after one warm-up)."""
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)
        best = min(best, time.perf_counter() - start)
    return best


def _probe(device: str) -> dict:
    """Time bf16 against float32 matrix products on ``device``: the facts behind the choice."""
    if device == "cuda":
        fast = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return {"device": torch.cuda.get_device_name(), "bf16_fast": fast,
                "rule": "torch.cuda.is_bf16_supported()"}
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(128, 128, generator=generator).to(device, torch.bfloat16)
    rate = 2 * 128**3 / _seconds(small, small, 1) / 1e9
    probe = {"device": device, "cpu": cpu_name(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "bf16_gflops_128": round(rate, 2)}
    if rate < EMULATED_GFLOPS:
        return {**probe, "bf16_fast": False,
                "rule": f"a 128x128 bf16 product ran at {rate:.2f} GFLOP/s (< {EMULATED_GFLOPS}): "
                        "emulated"}
    n = 512
    x = torch.randn(n, n, generator=generator).to(device)
    fp32 = _seconds(x, x, 3)
    bf16 = _seconds(x.bfloat16(), x.bfloat16(), 3)
    fast = fp32 / bf16 >= SPEEDUP_NEEDED
    return {**probe, "float32_ms_512": round(fp32 * 1e3, 3), "bfloat16_ms_512": round(bf16 * 1e3, 3),
            "bf16_fast": fast,
            "rule": f"512x512 products: bf16 {fp32 / bf16:.2f}x the speed of float32 "
                    f"({'>=' if fast else '<'} {SPEEDUP_NEEDED})"}


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_is_fast(device: str | torch.device | None = "cpu") -> bool:
    """Whether bfloat16 matrix products are faster than float32 on ``device`` (measured once)."""
    kind = _device_type(device)
    if kind not in _FAST:
        probe = _probe(kind)
        _PROBES[kind], _FAST[kind] = probe, bool(probe["bf16_fast"])
        log.info("bfloat16 on %s: %s (%s)", kind, "fast" if _FAST[kind] else "slow", probe["rule"])
    return _FAST[kind]


def probe_report(device: str | torch.device | None = "cpu") -> dict:
    """What the probe measured on ``device``, and its answer (``bf16_fast``)."""
    bf16_is_fast(device)
    return dict(_PROBES[_device_type(device)])


def resolve_bf16(bf16: bool | str | None, device: str | torch.device | None = "cpu", *,
                 what: str = "this run") -> bool:
    """The precision to run: ``None`` or ``"auto"`` asks :func:`bf16_is_fast`; ``True``
    runs bfloat16 (warning once per process where it is slow); ``False`` float32."""
    if bf16 is None or bf16 == "auto":
        return bf16_is_fast(device)
    if not isinstance(bf16, bool):
        raise InputError(f"bf16 must be True, False, None or 'auto', got {bf16!r}")
    if bf16 and not bf16_is_fast(device):
        kind = _device_type(device)
        if kind not in _WARNED:
            _WARNED.add(kind)
            warnings.warn(
                f"bf16=True for {what}, but this {kind} has no fast bfloat16 "
                f"({_PROBES[kind]['rule']}); it will run far slower than float32. Pass "
                "bf16=False (or None to let lens_rome choose).", RuntimeWarning, stacklevel=3)
    return bf16


def precision_name(bf16: bool) -> str:
    """``"bfloat16"`` or ``"float32"``: how results and logs name the precision that ran."""
    return BFLOAT16 if bf16 else FLOAT32


def entry_points(device: str | torch.device | None = "cpu") -> dict[str, str]:
    """The precision each entry point runs at its defaults on ``device`` (asks the probe)."""
    probed = precision_name(bf16_is_fast(device))
    return {
        "trace() (bf16=False: exact float32)": FLOAT32,
        "trace(bf16='auto')": probed,
        "trace-dataset (default; --auto-precision asks the probe)": FLOAT32,
        "trace-dataset --auto-precision": probed,
        "rome.edit, lens-rome edit/evaluate: ROME's v* loop (bf16=False: float32)": FLOAT32,
        "rome.edit(..., bf16=None): ROME's v* loop asks the probe": probed,
        "benchmarks (trace_speed: bf16 column; rome_edits)": probed,
    }
