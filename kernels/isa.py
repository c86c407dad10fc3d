"""The ISA policy: which CPU tier the kernels compile for, decided once, and one table they read.

A tier names what the hand-written LLVM IR may use: the vector width and the integer dot product
behind 8-bit activations. Every kernel file takes its widths and instructions from `TIER` here,
never from the CPU directly.

    tier          needs (LLVM features)                 vectors  u8 x s8 dot product
    avx512-vnni   avx512f/bw/vl, avx512vnni, fma, f16c  512 bit  vpdpbusd (4 products per i32 lane)
    avx512        avx512f/bw/vl, fma, f16c              512 bit  vpmaddubsw, then vpmaddwd with ones
    avx-vnni      avx2, avxvnni, fma, f16c              256 bit  {vex} vpdpbusd
    avx2          avx2, fma, f16c                       256 bit  vpmaddubsw, then vpmaddwd with ones
    generic       nothing                               128 bit  plain IR (widen, multiply, add)

The tier is the highest one the features Numba compiles for allow: the host's, or those of
NUMBA_CPU_FEATURES when it is set (NUMBA_CPU_NAME alone keeps the host's features). The generic
tier emits no x86 intrinsic, so it is correct on any LLVM target (aarch64 included), and shapes its
blocks for 128-bit registers, the width SSE2 and NEON both have.

FASTINFER_ISA=<tier> forces a lower tier: the features above it are switched off in Numba's
target too (so the compiler cannot use them either, and the disk cache, keyed on the target's
features, keeps each tier's code apart). A tier the CPU cannot run is refused by `require()`
with the features it lacks, before anything compiles: never an illegal instruction.

vpmaddubsw adds two u8 x s8 products into a saturating int16, so its unsigned operand must stay
below 129 (2 x 128 x 127 < 2^15): 4-bit nibbles do; 8-bit weights go in signed, as |w| against
x * sign(w) (`signed_q8`), and need no +128 offset.
"""
import os
import platform
from dataclasses import dataclass

import llvmlite.binding as llvm
import numba


@dataclass(frozen=True)
class Tier:
    name: str
    needs: tuple[str, ...]  # LLVM feature names the tier's code uses
    vector_bits: int        # the register width the IR blocks are shaped for
    dot: str                # "vpdpbusd", "pmaddubsw" or "ir"
    registers: int = 16     # vector registers (AVX-512: 32), for sizing register blocks

    @property
    def float_lanes(self) -> int:
        return self.vector_bits // 32

    @property
    def signed_q8(self) -> bool:
        """8-bit weights enter the dot product signed (|w|, x sign(w)) rather than as w + 128."""
        return self.dot == "pmaddubsw"


_AVX512 = ("avx512f", "avx512bw", "avx512vl", "fma", "f16c")
_AVX2 = ("avx2", "fma", "f16c")
TIERS = (  # highest first
    Tier("avx512-vnni", _AVX512 + ("avx512vnni",), 512, "vpdpbusd", 32),
    Tier("avx512", _AVX512, 512, "pmaddubsw", 32),
    Tier("avx-vnni", _AVX2 + ("avxvnni",), 256, "vpdpbusd"),
    Tier("avx2", _AVX2, 256, "pmaddubsw"),
    Tier("generic", (), 128, "ir"),
)
TIER_NAMES = tuple(t.name for t in TIERS)

# Switched off in Numba's target to hold the compiler to a forced tier (LLVM also drops every
# feature that implies one of these: -avx takes avx2, fma, f16c and all of AVX-512 with it).
_ABOVE = {
    "avx512-vnni": (),
    "avx512": ("avx512vnni", "avxvnni", "avxvnniint8", "avxvnniint16", "amx-int8", "avx10.1", "avx10.2"),
    "avx-vnni": ("avx512f", "avxvnniint8", "avxvnniint16", "amx-tile", "amx-int8", "avx10.1", "avx10.2", "evex512"),
    "avx2": ("avx512f", "avxvnni", "avxvnniint8", "avxvnniint16", "amx-tile", "amx-int8", "avx10.1", "avx10.2",
             "evex512"),
    "generic": ("avx", "avx2", "fma", "f16c", "avx512f", "avxvnni", "amx-tile", "avx10.1", "avx10.2", "evex512"),
}


def _parse(flat: str) -> dict[str, bool]:
    """'+a,-b' -> {'a': True, 'b': False}."""
    out = {}
    for part in flat.split(","):
        part = part.strip()
        if len(part) > 1 and part[0] in "+-":
            out[part[1:]] = part[0] == "+"
    return out


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def target_features() -> dict[str, bool]:
    """The features Numba compiles for: NUMBA_CPU_FEATURES when set (features it does not list
    count as absent: a lower tier is always correct), else the host's."""
    if numba.config.CPU_FEATURES is not None:
        return _parse(numba.config.CPU_FEATURES)
    try:
        feats = dict(llvm.get_host_cpu_features())
    except RuntimeError:  # LLVM cannot read this CPU's features
        return {}
    if not numba.config.ENABLE_AVX:
        feats = {k: v and not k.startswith("avx") for k, v in feats.items()}
    return feats


def best_tier(features: dict[str, bool]) -> Tier:
    """The highest tier whose features are all present (generic off x86)."""
    if not _x86():
        return TIERS[-1]
    return next(t for t in TIERS if all(features.get(f, False) for f in t.needs))


def by_name(name: str) -> Tier:
    for t in TIERS:
        if t.name == name:
            return t
    raise ValueError(f"FASTINFER_ISA={name!r} is not a tier; choose one of {', '.join(TIER_NAMES)}")


def _resolve() -> tuple[Tier, Tier, str | None]:
    """(the tier in force, the best the target allows, an error for a refused request)."""
    features = target_features()
    best = best_tier(features)
    asked = os.environ.get("FASTINFER_ISA", "").strip().lower()
    if not asked:
        return best, best, None
    try:
        tier = by_name(asked)
    except ValueError as e:
        return best, best, str(e)
    # The tiers are not a chain: an AVX-512 CPU may lack AVX-VNNI (AMD Zen 4 has the EVEX form
    # only), so a tier below the best can still be one this CPU cannot run.
    lacks = missing(tier)
    if lacks:
        runs = [t.name for t in TIERS[TIERS.index(best):] if not missing(t)]
        return best, best, (f"FASTINFER_ISA={tier.name}: this CPU cannot run it (it lacks "
                            f"{', '.join(lacks)}); it runs {', '.join(runs)}")
    if tier is not best:
        # hold Numba's code generation to the tier too (must happen before its target exists)
        # (the switched-off features go last: LLVM reads the list in order, and a later "+x" would
        # switch back on what x implies; only names LLVM listed, so it warns of none)
        off = [f for f in _ABOVE[tier.name] if f in features]
        numba.config.CPU_FEATURES = ",".join(
            [("+" if on else "-") + name for name, on in features.items() if name not in off] + ["-" + f for f in off])
    return tier, best, None


def missing(tier: Tier) -> list[str]:
    """The features `tier` needs that Numba's target lacks (empty: its code compiles and runs
    here). Off x86 every tier but generic lacks "x86-64"."""
    if tier.needs and not _x86():
        return ["x86-64"]
    features = target_features()
    return [f for f in tier.needs if not features.get(f, False)]


def require() -> Tier:
    """The tier in force; a ValueError naming the problem if FASTINFER_ISA asked for one this CPU
    cannot run (or no tier at all)."""
    if _ERROR:
        raise ValueError(_ERROR)
    return TIER


def describe() -> dict:
    """The CPU, its best tier and the tier in force, for `fastinfer info` and benchmark records."""
    return {"cpu": cpu_model(), "isa": TIER.name, "isa_best": BEST.name,
            "vector_bits": TIER.vector_bits, "dot": TIER.dot,
            "llvm_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name()}


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


TIER, BEST, _ERROR = _resolve()  # decided once, at import: the kernels' module constants read TIER
