"""Hatchling build hook: compile pcigate's C extensions (see each C file's header).

* ``pcigate._cmask`` (cli/pcigate/_cmask.c): the masking hot path. Needs the C compiler and the Python
  headers (gcc and python3-dev on these machines).
* ``pcigate._crec`` (cli/pcigate/_crec.c): a database recording's statement lines and hash chain, encoded
  in the writer thread. Also needs OpenSSL's libcrypto headers (libssl-dev), for SHA-256.
* ``pcigate._crelay`` (cli/pcigate/_crelay.c): the PostgreSQL tunnel's relay thread for plain connections
  (Linux: epoll, eventfd).

When one cannot be built, the wheel is still made with a warning, and pcigate runs that part with the
(slower) Python code, which is the reference implementation anyway. The test suite fails in that case
(tests/unit/test_cmask.py, tests/unit/test_crec.py, tests/integration/test_tunnel_pg.py), so CI never runs
without them unnoticed.

An editable install builds the modules next to their sources (cli/pcigate/, git-ignored); a regular wheel
carries them as ``pcigate/<name><EXT_SUFFIX>`` and gets a platform tag.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# (module, extra linker arguments)
EXTENSIONS: list[tuple[str, list[str]]] = [
    ("_cmask", []), ("_crec", ["-lcrypto"]), ("_crelay", ["-pthread"]),
]
# -ffp-contract=off: no fused multiply-add, so _crec's arithmetic is bit for bit Python's (recording._q)
CFLAGS = ["-O2", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11", "-Wall", "-Wextra",
          "-Werror=implicit-function-declaration"]


class CExtensionsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if version != "editable":  # the PCI DSS mapping goes into every evidence pack (`audit evidence`)
            mapping = str(Path(self.root) / "docs" / "pci-dss.md")
            build_data["force_include"][mapping] = "pcigate/pci-dss.md"
        built = [self._build(name, libs, version) for name, libs in EXTENSIONS]
        if not any(built):
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for out in built:
            if out is not None and version != "editable":
                build_data["force_include"][str(out)] = f"pcigate/{out.name}"

    def _build(self, module: str, libs: list[str], version: str) -> Path | None:
        src = Path(self.root) / "cli" / "pcigate" / f"{module}.c"
        name = module + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        if version == "editable":
            out = src.parent / name
        else:
            out = Path(tempfile.mkdtemp(prefix=f"pcigate-{module}-")) / name
        out.unlink(missing_ok=True)  # a failed build must not leave an old module for another source
        cc = shlex.split(os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc"))
        cmd = [*cc, *CFLAGS, f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out), *libs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:
            sys.stderr.write(f"pcigate: cannot build pcigate.{module} ({e}); its Python code runs instead\n")
            return None
        if proc.returncode != 0:
            sys.stderr.write(f"pcigate: cannot build pcigate.{module}; its Python code runs instead:\n"
                             + proc.stderr)
            return None
        return out
