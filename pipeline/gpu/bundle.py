"""``make gpu-bundle``: the DALI wheels for the GPU machine, in parts that fit one upload each.

    python -m pipeline.gpu.bundle build                      # download, strip, pack, split -> .gpu-bundle/
    python -m pipeline.gpu.bundle commands                   # print the GPU machine's commands again
    python -m pipeline.gpu.bundle unpack --parts /tmp/bundle --target /tmp/bundle/site   # there

The GPU machine has torch and torchvision but no DALI and no network, and takes at most 64 MiB
per command. ``build`` downloads the pinned wheels for its Python (3.12, manylinux x86-64),
strips what the check never loads (the other Pythons' extension modules, C++ headers), stores
the wheels uncompressed in one xz-compressed tar and splits that into parts of at most
``--part-mib`` MiB, with ``manifest.json`` (every part's size and SHA-256, and the whole
archive's). ``unpack`` reassembles the parts, checks each size and checksum (naming any part
that is missing or damaged, so only that one is sent again), extracts the wheels and installs
them with ``pip install --no-index --no-deps --target``. Standard library only: this module runs
on the GPU machine before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# DALI 2.4.0 and what it imports, at the versions it accepts (Requires-Dist of its METADATA).
# numpy is left out (torchvision brings it); nvidia-nvjpeg is the CUDA 13.0 build, the CUDA of
# torch 2.11's wheels, for the mixed decoder. PyYAML (libcst, our configs) is on the GPU machine.
REQUIREMENTS: tuple[str, ...] = (
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-libnvcomp-cu13==5.3.0.16",
    "nvidia-nvjpeg==13.0.2.28",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "six==1.17.0",
    "optree==0.20.0",
    "packaging==26.0",
    "nvtx==0.2.17",
    "makefun==1.16.0",
    "libcst==1.9.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
DEFAULT_DIR = ".gpu-bundle"
ARCHIVE = "gpu-bundle.tar.xz"
MANIFEST = "manifest.json"
PART_MIB = 60
MiB = 2**20
# Files the check never loads: C++ headers, static libraries, and extension modules of other Pythons.
DROP = (re.compile(r"^nvidia/dali/include/"), re.compile(r"^nvidia/nvimgcodec/include/"), re.compile(r"\.a$"))
CPYTHON_EXT = re.compile(r"\.cpython-(\d+)(t?)-[^/]*\.so$")  # group 2: free-threaded build


class BundleError(RuntimeError):
    """A bundle that cannot be built or unpacked as asked; the message says what to do."""


# ---------------------------------------------------------------- build


def download(dest: Path, python_version: str, requirements: Iterable[str] = REQUIREMENTS) -> list[Path]:
    """``pip download`` the wheels for ``python_version`` on manylinux x86-64 into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), *requirements]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BundleError(
            "pip download failed (is PyPI reachable?): " + (result.stderr.strip().splitlines() or ["?"])[-1]
        )
    wheels = []
    for req in requirements:
        name, _, version = req.partition("==")
        pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version or '*'}-*.whl"
        found = sorted(
            p
            for p in dest.iterdir()
            if p.name.lower().startswith(pattern.split("*")[0].lower()) and p.suffix == ".whl"
        )
        if not found:
            raise BundleError(f"pip download saved no wheel for {req} in {dest}")
        wheels.append(found[-1])
    return wheels


def keep_member(name: str, python_tag: str) -> bool:
    """Whether a wheel member is kept: not a header or static library, not another Python's extension."""
    if any(r.search(name) for r in DROP):
        return False
    m = CPYTHON_EXT.search(name)
    return m is None or (m.group(1) == python_tag and not m.group(2))


def strip_wheel(src: Path, dest_dir: Path, python_tag: str) -> dict[str, Any]:
    """A copy of wheel ``src`` without the members ``keep_member`` drops, stored uncompressed
    (xz then compresses the whole bundle better than each zip member alone); RECORD lists what is left."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / src.name
    dropped, kept = 0, 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        names = [i.filename for i in zin.infolist()]
        keep = {n for n in names if keep_member(n, python_tag)}
        for info in zin.infolist():
            if info.filename not in keep:
                dropped += info.file_size
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] in keep]
                data = ("\n".join(lines) + "\n").encode()
            kept += len(data)
            zout.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    return {"wheel": src.name, "bytes_in": src.stat().st_size, "kept_bytes": kept, "dropped_bytes": dropped}


def _xz(raw: Path, out: Path, preset: int) -> None:
    exe = shutil.which("xz")
    if exe:  # multi-threaded; the same .xz format lzma reads back
        with open(raw, "rb") as fin, open(out, "wb") as fout:
            subprocess.run([exe, f"-{preset}", "-T0", "-c"], stdin=fin, stdout=fout, check=True)
        return
    with open(raw, "rb") as fin, lzma.open(out, "wb", preset=preset) as fout:
        shutil.copyfileobj(fin, fout, 16 * MiB)


def pack(files: list[Path], out_dir: Path, *, part_mib: int, preset: int = 1, extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``files`` into one ``.tar.xz`` split into parts of at most ``part_mib`` MiB, and the manifest.

    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    if part_mib < 1:
        raise BundleError(f"--part-mib must be at least 1, got {part_mib}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(ARCHIVE + ".part-*"):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw, xz = Path(tmp) / "bundle.tar", Path(tmp) / ARCHIVE
        with tarfile.open(raw, "w") as tar:
            for f in files:
                tar.add(f, arcname=f.name)
        _xz(raw, xz, preset)
        whole = hashlib.sha256()
        parts = []
        with open(xz, "rb") as fin:
            for i in range(10**4):
                chunk = fin.read(part_mib * MiB)
                if not chunk:
                    break
                whole.update(chunk)
                name = f"{ARCHIVE}.part-{i:02d}"
                (out_dir / name).write_bytes(chunk)
                parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        manifest = {
            "archive": ARCHIVE,
            "bytes": xz.stat().st_size,
            "sha256": whole.hexdigest(),
            "uncompressed_bytes": raw.stat().st_size,
            "part_mib": part_mib,
            "parts": parts,
            "files": [f.name for f in files],
            **(extra or {}),
        }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build(out_dir: Path, *, python_version: str, part_mib: int, preset: int, wheels_dir: Path | None) -> dict[str, Any]:  # fmt: skip
    """Download (or take from ``wheels_dir``), strip, pack and split; returns the manifest."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise BundleError(f"--python-version must look like 3.12, got {python_version!r}")
    tag = python_version.replace(".", "")
    source = wheels_dir or out_dir / "download"
    wheels = download(source, python_version)
    stripped_dir = out_dir / "stripped"
    shutil.rmtree(stripped_dir, ignore_errors=True)
    stats = [strip_wheel(w, stripped_dir, tag) for w in wheels]
    files = sorted(stripped_dir.glob("*.whl"))
    manifest = pack(files, out_dir, part_mib=part_mib, preset=preset,
                    extra={"python_version": python_version, "requirements": list(REQUIREMENTS), "wheels": stats})  # fmt: skip
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------- unpack (runs on the GPU machine)


def reassemble(parts_dir: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """Concatenate the parts into ``dest/<archive>``, checking every size and checksum first."""
    problems = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']} is missing")
            continue
        size = path.stat().st_size
        if size != part["bytes"]:
            problems.append(f"{part['name']} has {size} bytes, expected {part['bytes']}")
        elif _sha256(path) != part["sha256"]:
            problems.append(f"{part['name']} has the wrong SHA-256")
    if problems:
        raise BundleError(f"in {parts_dir}: {'; '.join(problems)}; send those parts again")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / manifest["archive"]
    whole = hashlib.sha256()
    with open(archive, "wb") as out:
        for part in manifest["parts"]:
            data = (parts_dir / part["name"]).read_bytes()
            whole.update(data)
            out.write(data)
    if archive.stat().st_size != manifest["bytes"] or whole.hexdigest() != manifest["sha256"]:
        archive.unlink()
        raise BundleError(
            f"the reassembled {manifest['archive']} does not match the manifest (size or SHA-256)"
        )
    return archive


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def extract(archive: Path, dest: Path) -> list[Path]:
    """The archive's files (flat names only) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                raise BundleError(f"{archive}: unexpected member {member.name!r}")
            with tar.extractfile(member) as src, open(dest / member.name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append(dest / member.name)
    return out


def install(wheels: list[Path], target: Path, run: Callable[..., Any] = subprocess.run) -> None:
    """``pip install --no-index --no-deps --target`` (nothing fetched, nothing else touched)."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]  # fmt: skip
    result = run(cmd)
    if result.returncode != 0:
        raise BundleError(f"pip install --target {target} failed (exit {result.returncode})")


def unpack(parts_dir: Path, manifest_path: Path, target: Path) -> dict[str, Any]:
    manifest = json.loads(manifest_path.read_text())
    archive = reassemble(parts_dir, manifest, parts_dir)
    wheels = extract(archive, parts_dir / "wheels")
    archive.unlink()
    install(wheels, target)
    return {"target": str(target), "wheels": [w.name for w in wheels]}


# ---------------------------------------------------------------- the GPU machine's commands


def commands(manifest: dict[str, Any], *, bundle_dir: str = DEFAULT_DIR, remote: str = "/tmp/bundle",
             timeout_s: int = 330, check_args: str = "") -> list[dict[str, Any]]:  # fmt: skip
    """One device ``run`` call per part: its ``carry`` and its command. The last one unpacks, installs
    and runs ``make gpu-check`` under ``timeout``, the report under ``$OUT``."""
    site = f"{remote}/site"
    calls = []
    parts = manifest["parts"]
    for i, part in enumerate(parts):
        src = f"{bundle_dir}/{part['name']}"
        cmd = f"mkdir -p {remote} && cp {src} {remote}/ && ls -l {remote}"
        carry = [src]
        if i == len(parts) - 1:
            carry.append(f"{bundle_dir}/{MANIFEST}")
            args = f" GPU_CHECK_ARGS={shlex.quote(check_args)}" if check_args else ""
            cmd = (
                f"mkdir -p {remote} && cp {src} {remote}/ && "
                f"python3 -m pipeline.gpu.bundle unpack --parts {remote} --manifest {bundle_dir}/{MANIFEST} "
                f"--target {site} && PYTHONPATH={site} timeout {timeout_s} make gpu-check{args}; "
                "echo exit=$?; ls -l $OUT"
            )
        calls.append({"carry": carry, "command": cmd, "bytes": part["bytes"]})
    return calls


def rerun_command(remote: str = "/tmp/bundle", timeout_s: int = 330, check_args: str = "--only PARTS") -> str:
    """A rerun on the same (still warm) machine: the installed bundle is still there."""
    return (f"test -d {remote}/site && PYTHONPATH={remote}/site timeout {timeout_s} make gpu-check "
            f"GPU_CHECK_ARGS={shlex.quote(check_args)}; echo exit=$?")  # fmt: skip


def format_commands(manifest: dict[str, Any], **kwargs: Any) -> str:
    calls = commands(manifest, **kwargs)
    lines = [
        f"GPU bundle: {len(calls)} part(s), {manifest['bytes'] / MiB:.1f} MiB compressed "
        f"({manifest['uncompressed_bytes'] / MiB:.1f} MiB of wheels), Python {manifest.get('python_version', '?')}",
        "On the GPU machine, one `run` call per part, back to back (the machine keeps /tmp only while warm,",
        "about 30 s after a call): each call carries its part and appends it to /tmp/bundle.",
    ]
    for i, c in enumerate(calls, 1):
        lines += ["", f"call {i}/{len(calls)} ({c['bytes'] / MiB:.1f} MiB):",
                  f"  carry:   {json.dumps(c['carry'])}", f"  command: {c['command']}"]  # fmt: skip
    lines += ["", "If a part is reported missing (the machine went back), send that call again; to rerun",
              "failed parts while the machine is warm:", f"  command: {rerun_command()}"]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.gpu.bundle", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, strip, pack and split the wheels; print the GPU commands")
    b.add_argument("--out", default=DEFAULT_DIR, help=f"bundle folder (default {DEFAULT_DIR}, git-ignored)")
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    b.add_argument("--part-mib", type=int, default=PART_MIB, help=f"largest part in MiB (default {PART_MIB})")
    b.add_argument(
        "--preset",
        type=int,
        default=1,
        choices=range(10),
        help="xz preset (1: fast; 6: ~10%% smaller, minutes slower)",
    )
    b.add_argument(
        "--wheels",
        default=None,
        help="folder of already downloaded wheels to reuse (pip still checks the pins)",
    )
    b.add_argument("--timeout", type=int, default=330, help="seconds `timeout` gives make gpu-check there")
    b.add_argument("--check-args", default="", help="GPU_CHECK_ARGS for the run there")
    c = sub.add_parser("commands", help="print the GPU machine's commands for a built bundle")
    c.add_argument("--out", default=DEFAULT_DIR)
    c.add_argument("--timeout", type=int, default=330)
    c.add_argument("--check-args", default="")
    u = sub.add_parser(
        "unpack", help="(on the GPU machine) reassemble, check, extract and pip install --target"
    )
    u.add_argument("--parts", required=True, help="folder holding the parts")
    u.add_argument("--manifest", required=True, help="the bundle's manifest.json")
    u.add_argument("--target", required=True, help="pip install --target folder (then PYTHONPATH=it)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            manifest = build(Path(args.out), python_version=args.python_version, part_mib=args.part_mib,
                             preset=args.preset, wheels_dir=Path(args.wheels) if args.wheels else None)  # fmt: skip
            print(
                format_commands(
                    manifest, bundle_dir=args.out, timeout_s=args.timeout, check_args=args.check_args
                )
            )
        elif args.cmd == "commands":
            path = Path(args.out) / MANIFEST
            if not path.is_file():
                raise BundleError(f"{path}: no bundle built here; run `make gpu-bundle` first")
            manifest = json.loads(path.read_text())
            print(
                format_commands(
                    manifest, bundle_dir=args.out, timeout_s=args.timeout, check_args=args.check_args
                )
            )
        else:
            out = unpack(Path(args.parts), Path(args.manifest), Path(args.target))
            print(f"installed {len(out['wheels'])} wheels into {out['target']}: {', '.join(out['wheels'])}")
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
