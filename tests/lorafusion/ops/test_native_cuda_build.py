"""Where nvcc exists, csrc/sparse_adapter_cuda.cu compiles for sm_80 (A100) and sm_90 (H100, H200) with torch's
headers and the nvcc flags of torch's JIT build, and each architecture's device code holds every kernel the host
code launches (the device passes skip torch's headers and the host code, see the .cu: a kernel the host launches
but no explicit instantiation names would have no device code, and fail only at its first launch on a GPU)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCE = Path(__file__).resolve().parents[3] / "csrc" / "sparse_adapter_cuda.cu"
ARCHES = ("80", "90")
NAMESPACE = "lorafusion_sparse_cuda"  # of the kernels in the .cu

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")


def nvcc_command(output: Path, keep_dir: Path) -> list[str]:
    """One nvcc call for both architectures (the host code is compiled once), as torch's JIT build would run it."""
    from torch.utils import cpp_extension

    include_dirs = cpp_extension.include_paths()
    command = [NVCC, "-c", str(SOURCE), "-o", str(output), "--keep", "--keep-dir", str(keep_dir),
               "-DTORCH_EXTENSION_NAME=lorafusion_sparse_build_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "--compiler-options", "-fPIC",
               *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHES)]
    for directory in include_dirs:
        command += ["-isystem", directory]
    if not (Path(include_dirs[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # A CPU build of torch ships c10/cuda's headers but not this generated one; on Linux it only defines
        # export macros that nothing here needs.
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return command


# About 30 s of CPU (nearly all of it torch's headers in the host pass); measured figures in csrc/README.md.
@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path: Path) -> None:
    objects = tmp_path / "sparse_adapter_cuda.o"
    command = nvcc_command(objects, tmp_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed ({' '.join(command)}):\n{result.stderr[-6000:]}"

    launched = host_kernels(objects)
    assert len(launched) >= 5, f"the host code launches only {sorted(launched)}: the ops' kernels are missing"
    for arch in ARCHES:
        cubins = list(tmp_path.glob(f"*.compute_{arch}.cubin"))
        assert cubins, f"nvcc --keep left no cubin for sm_{arch}: {sorted(p.name for p in tmp_path.iterdir())}"
        device_code = cubins[0].read_bytes()
        missing = sorted(name for name in launched if name.encode() not in device_code)
        assert not missing, f"sm_{arch}'s device code lacks kernels the host launches (instantiate them): {missing}"


def host_kernels(objects: Path) -> set[str]:
    """The device symbols of the kernels the host code launches: the host object defines a launch entry per kernel
    under the kernel's own mangled name (an instantiated template's marked internal, `L`, which the device's lacks)."""
    nm = shutil.which("nm")
    assert nm is not None, "nm (binutils, beside the host compiler nvcc uses) is needed to list the host's kernels"
    listing = subprocess.run([nm, "--defined-only", str(objects)], capture_output=True, text=True, check=True).stdout
    prefix = f"_ZN{len(NAMESPACE)}{NAMESPACE}"
    kernels = set()
    for symbol in (line.split()[-1] for line in listing.splitlines() if line.split()[1:2] in (["t"], ["T"])):
        match = re.fullmatch(rf"{prefix}L?(\d+)(\w+)", symbol)
        if match:
            name = match.group(2)[:int(match.group(1))]
            if name.endswith("_kernel") and not name.startswith("__"):  # not cudafe's __wrapper__device_stub_*
                kernels.add(prefix + match.group(1) + match.group(2))
    return kernels
