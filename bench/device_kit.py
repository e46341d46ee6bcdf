"""Build, here, the two wheel kits a device run carries; prints JSON (each kit's size with the repo).

    python3 bench/device_kit.py            # then the two device calls of bench/device.sh

The device image has torch, pyarrow, pandas, opencv, matplotlib, pytest and safetensors but
neither Ray nor what lungray adds (deltalake alone is a 52 MB wheel). One call carries at
most 64 MiB with the working tree (about 14 MB of repo), and the whole kit is about 120 MB,
so it travels in two calls on one warm machine:

  .whl   the shared Ray + pydicom kit (../shared/device/make-wheels.sh);
  .whl2  lungray's own packages the image lacks, at the versions of this machine's .venv
         (the ones CI tests).

Both are recompressed with LZMA (a wheel is a zip, and pip reads any method Python's
zipfile reads), and Ray's wheel loses the libraries lungray never imports (RLlib, Serve,
Ray LLM) and the dashboard's web client: 40% smaller, so each call fits.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20
# Distributions lungray imports that the device image lacks (shared/device/README.md and the
# device tool's package list), with the packages they need that it also lacks.
LUNGRAY_EXTRAS = (
    "deltalake", "arro3-core", "deprecated", "highdicom", "pyjpegls", "pylibjpeg-rle", "pynetdicom",
    "dicomweb-client", "retrying", "requests-toolbelt",
)
# Parts of Ray's wheel that a lungray run never imports or serves.
RAY_UNUSED = ("ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def pinned(names: tuple[str, ...]) -> list[str]:
    """`name==version` of each, as installed in the repo's .venv."""
    venv_python = REPO / ".venv" / "bin" / "python"
    script = "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))"
    return subprocess.run([str(venv_python), "-c", script, *names], check=True, capture_output=True, text=True).stdout.split()


def download(requirements: list[str], dest: Path) -> None:
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(dest), *requirements],
        check=True,
    )


def repack(wheel: Path, drop: tuple[str, ...] = ()) -> None:
    """The wheel recompressed with LZMA, without the files under `drop` (and their RECORD lines)."""
    packed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_LZMA) as target:
        for info in source.infolist():
            if info.filename.startswith(drop):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(tuple(d.encode() for d in drop)))
            entry = copy.copy(info)
            entry.compress_type = zipfile.ZIP_LZMA
            target.writestr(entry, data)
    packed.replace(wheel)


def working_tree_bytes() -> int:
    """What a device call carries besides its kit: tracked and untracked, not ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True
    ).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def main() -> None:
    ray_kit, extras_kit = REPO / ".whl", REPO / ".whl2"
    for kit in (ray_kit, extras_kit):
        shutil.rmtree(kit, ignore_errors=True)
    subprocess.run(["bash", str(REPO.parent / "shared" / "device" / "make-wheels.sh"), str(ray_kit)], cwd=REPO, check=True, capture_output=True)
    extras_kit.mkdir()
    download(pinned(LUNGRAY_EXTRAS), extras_kit)
    for wheel in [*ray_kit.glob("*.whl"), *extras_kit.glob("*.whl")]:
        repack(wheel, RAY_UNUSED if wheel.name.startswith("ray-") else ())
    tree = working_tree_bytes()
    kits = {kit.name: sum(wheel.stat().st_size for wheel in kit.glob("*.whl")) for kit in (ray_kit, extras_kit)}
    print(json.dumps({
        "working_tree_mb": round(tree / 1e6, 1),
        "kits_mb": {name: round(size / 1e6, 1) for name, size in kits.items()},
        "fits_each_call": {name: tree + size < CARRY_LIMIT for name, size in kits.items()},
        "wheels": sorted(wheel.name for kit in (ray_kit, extras_kit) for wheel in kit.glob("*.whl")),
    }, indent=1))


if __name__ == "__main__":
    main()
