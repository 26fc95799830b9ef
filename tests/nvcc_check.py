"""Compile a RawModule's kernel text with the local nvcc (no GPU needed): `python tests/nvcc_check.py`
checks tensor/cuda/flash_attention.py for sm_90 (PTX, then ptxas for the register and spill report).
A developer's tool, not a test: the suite never calls nvcc. Every name expression is instantiated
by taking its address, as NVRTC's name_expressions would."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def nvcc_check(source: str, names: list, arch: str = "sm_90", verbose: bool = False) -> str:
    """nvcc --ptx on `source` plus one address-of per name; returns ptxas -v's report (raises on errors)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc_check: no nvcc on PATH")
    inst = "\n".join(f"void* _inst_{i} = (void*)&{n};" for i, n in enumerate(names))
    with tempfile.TemporaryDirectory() as d:
        cu, ptx = Path(d) / "k.cu", Path(d) / "k.ptx"
        cu.write_text(source + "\n" + inst + "\n")
        subprocess.run([nvcc, f"-arch={arch}", "--std=c++17", "--ptx", "-o", str(ptx), str(cu)], check=True)
        r = subprocess.run(["ptxas", f"-arch={arch}", "-v", "-o", str(Path(d) / "k.o"), str(ptx)], check=True,
                           capture_output=True, text=True)
        return r.stderr


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tensor.cuda import flash_attention as FA
    names = [n for dt in FA.TRAITS for D in FA.HEADS for n in FA.kernel_names(dt, D).values()]
    report = nvcc_check(FA._PRIMITIVES + FA._SOURCE, names)
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if "Compiling entry function" in line:
            name = line.split("'")[1]
            usage = " ".join(x.strip() for x in lines[i + 1:i + 4] if "Used" in x or "spill" in x)
            print(name, "|", usage)
