"""Hatchling build hook: compile pcigate's one C extension, ``pcigate._cmask`` (cli/pcigate/_cmask.c).

The extension is the masking hot path (see the C file's header). It needs only the C compiler and the
Python headers (gcc and python3-dev on these machines). When it cannot be built, the wheel is still made,
pure Python, with a warning: pcigate then masks with the (slower) Python code, which is the reference
implementation anyway. The test suite fails in that case (tests/unit/test_cmask.py), so CI never runs
without it unnoticed.

An editable install builds the module next to its source (cli/pcigate/, git-ignored); a regular wheel
carries it as ``pcigate/_cmask<EXT_SUFFIX>`` and gets a platform tag.
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

CFLAGS = ["-O2", "-fPIC", "-shared", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]


class CMaskBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if version != "editable":  # the PCI DSS mapping goes into every evidence pack (`audit evidence`)
            mapping = str(Path(self.root) / "docs" / "pci-dss.md")
            build_data["force_include"][mapping] = "pcigate/pci-dss.md"
        src = Path(self.root) / "cli" / "pcigate" / "_cmask.c"
        name = "_cmask" + str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        if version == "editable":
            out = src.parent / name
        else:
            out = Path(tempfile.mkdtemp(prefix="pcigate-cmask-")) / name
        cc = shlex.split(os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc"))
        cmd = [*cc, *CFLAGS, f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:
            sys.stderr.write(f"pcigate: cannot build the C masking module ({e}); masking runs in Python\n")
            return
        if proc.returncode != 0:
            sys.stderr.write("pcigate: cannot build the C masking module; masking runs in Python:\n"
                             + proc.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(out)] = f"pcigate/{name}"
