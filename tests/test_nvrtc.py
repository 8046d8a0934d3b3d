"""Compile every kernel specialisation with NVRTC for sm_75, sm_80 and sm_90 (no GPU needed).

Needs ``nvidia-cuda-nvrtc`` and CuPy's NVRTC bindings (the ``nvrtc`` extra); skipped without them,
except in the tox env ``nvrtc`` (``BNCUPY_REQUIRE=nvrtc``), where their absence fails.
"""

from __future__ import annotations

import re

import pytest

from bncupy._kernels import kernel_dir
from bncupy.backends import cupy as cupy_backend
from tests.conftest import NVRTC_REPORTS, needs, requirement

nvrtc = needs("cupy_backends.cuda.libs.nvrtc", "nvrtc", "CuPy's NVRTC bindings are not installed")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _compile(arch: str) -> tuple[str, dict[str, str]]:
    try:
        version = nvrtc.getVersion()
    except Exception as exc:  # libnvrtc not found
        requirement("nvrtc", f"libnvrtc is not loadable: {exc}")
    prog = nvrtc.createProgram(cupy_backend.program_source(), "bncupy.cu", [], [])
    names = cupy_backend.name_expressions()
    for name in names:
        nvrtc.addNameExpression(prog, name)
    options = [*cupy_backend.compile_options(), f"--gpu-architecture={arch}", "-Xptxas=-v",
               "--no-cache", "-ftz=true"]
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as exc:
        pytest.fail(f"NVRTC {version} failed for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
    log = nvrtc.getProgramLog(prog)
    lowered = {nvrtc.getLoweredName(prog, n): n for n in names}
    nvrtc.destroyProgram(prog)
    return log, lowered


# Blocks per SM each kernel must keep resident on sm_80/sm_90 (threads per block, blocks), as
# its __launch_bounds__ promise: the elementwise kernels 4 blocks of 256 threads (64 registers;
# backward_apply 3 on the 64-bit index path, whose fused float16 form would spill); the row
# kernels one block of 1024 threads (512 for the backward with grad_prenorm, which holds twice as
# many values per thread; the backward holding rows in shared memory 1024 either way); the
# reductions as _reduction_blocks.
OCCUPANCY = {"apply": (256, 4), "group_apply": (256, 4), "group_backward_apply": (256, 4),
             "backward_apply": (256, 4), "row_norm": (1024, 1), "row_norm_backward": (1024, 1),
             "row_norm_backward+sum": (512, 1), "row_norm_backward_shared": (1024, 1)}
SMALL = ("group_merge", "group_grad_coefficients", "column_sums")  # a few blocks: no bound


def _reduction_blocks(kernel: str, name: str) -> int:
    """Blocks of 256 threads a reduction keeps resident (kernels/reduce.cuh, reduce_blocks): 4
    on the 32-bit index path, every dtype and layout (64 registers a thread, no spills); 2 on
    the 64-bit index path (above 2^31 elements, whose indices take twice the registers)."""
    index = name[name.index("<") + 1:-1].split(", ")[2]
    return 2 if index == "unsigned long long" else 4


def _resident(regs: int, threads: int) -> int:
    """Blocks of ``threads`` one SM holds with ``regs`` registers per thread (65536 registers,
    allocated per warp in units of 256, at most 2048 threads)."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * (threads // 32)), 2048 // threads)


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_90"])
def test_every_kernel_compiles_without_warnings_or_spills(arch):
    assert kernel_dir().is_dir()
    log, lowered = _compile(arch)
    assert "warning" not in log.lower(), log
    entries = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            entries[current] = {}
        elif current and (m := _SPILL.search(line)):
            entries[current]["spill"] = int(m.group(1)) + int(m.group(2))
        elif current and (m := _REGS.search(line)):
            entries[current]["regs"] = int(m.group(1))
    assert set(lowered) <= set(entries), "some specialisations were not compiled"
    for mangled, stats in entries.items():
        name = lowered.get(mangled, mangled)
        assert stats.get("spill") == 0, f"{name} spills on {arch}"
        assert "regs" in stats
        kernel = name.split("<")[0].split("::")[-1]
        if kernel == "row_norm_backward" and name.endswith(", true>"):
            kernel += "+sum"
        if kernel == "backward_apply" and name.split(", ")[2] == "unsigned long long":
            threads, blocks = 256, 3
        elif kernel in OCCUPANCY:
            threads, blocks = OCCUPANCY[kernel]
        elif kernel in SMALL or "<" not in name:
            threads, blocks = 256, 1
        else:
            threads, blocks = 256, _reduction_blocks(kernel, name)
        resident = _resident(stats["regs"], threads)
        if arch != "sm_75":
            assert resident >= blocks, (f"{name} on {arch}: {stats['regs']} registers keep "
                                        f"{resident} blocks of {threads} threads per SM, "
                                        f"needs {blocks}")
        NVRTC_REPORTS.append(f"{arch} {stats['regs']:3d} regs {stats['spill']} spill "
                             f"{resident} blocks/SM  {name}")

