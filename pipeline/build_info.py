"""Which torch and DALI builds this environment holds, and the NVIDIA driver they need.

    python -m pipeline.build_info        # `make install` runs it

The registry's torch 2.14.1 is a CUDA 13 build and ``nvidia-dali-cuda130`` is DALI's CUDA 13
build: both need driver R580 or newer. Older drivers need the CUDA 12 set (torch from the
CUDA 12 wheel index, ``nvidia-dali-cuda120``; README, "Older NVIDIA drivers"). A mixed set
(one of each, or both DALI builds at once) fails at the first GPU step, so it is named here.
"""

from __future__ import annotations

import importlib.metadata
import subprocess

DALI_PACKAGES = {"nvidia-dali-cuda130": 13, "nvidia-dali-cuda120": 12}
# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA release notes).
MIN_DRIVER = {13: 580, 12: 525}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def describe(
    torch_version: str, torch_cuda: str | None, dali: dict[str, str], driver: str | None
) -> list[str]:
    """Lines that say what is installed and whether it fits together and with the driver.

    Args:
        torch_version: ``torch.__version__``.
        torch_cuda: ``torch.version.cuda`` (None for a CPU-only build).
        dali: installed DALI packages, name -> version.
        driver: the NVIDIA driver version, or None without one.
    """
    majors = {DALI_PACKAGES[name] for name in dali}
    if torch_cuda:
        majors.add(int(torch_cuda.split(".")[0]))
        lines = [f"torch {torch_version}: CUDA {torch_cuda} build"]
    else:
        lines = [f"torch {torch_version}: CPU-only build"]
    lines += [f"DALI {name} {version}: CUDA {DALI_PACKAGES[name]} build" for name, version in dali.items()]
    if not dali:
        lines.append("DALI: not installed")
    if len(dali) > 1:
        lines.append(
            f"warning: both DALI builds are installed ({', '.join(dali)}): uninstall the one that does not fit"
        )
    elif len(majors) > 1:
        lines.append("warning: torch and DALI are built for different CUDA versions: install a matching set")
    if driver is None:
        lines.append("NVIDIA driver: none found (CPU only on this machine)")
    else:
        need = max((MIN_DRIVER[m] for m in majors), default=0)
        fits = int(driver.split(".")[0]) >= need
        lines.append(f"NVIDIA driver: {driver}" + ("" if fits else ": too old for these builds"))
    if majors:
        lines.append(f"these builds need NVIDIA driver R{max(MIN_DRIVER[m] for m in majors)} or newer")
    return lines


def main() -> int:
    import torch

    dali = {name: v for name in DALI_PACKAGES if (v := installed_version(name))}
    print("\n".join(describe(torch.__version__, torch.version.cuda, dali, driver_version())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
