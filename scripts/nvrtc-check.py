"""Compiles pshard's CUDA sources with NVRTC, as kernels/src/cuda/nvrtc.rs does (common.cuh
prepended, same options), for the given architectures; needs no GPU, only the NVRTC library:

    python3 -m venv venv && venv/bin/pip install nvidia-cuda-nvrtc-cu12
    NVRTC_LIB=venv/lib/python3.*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \
        venv/bin/python scripts/nvrtc-check.py . sm_90 sm_80

Exits non-zero if any source fails to compile, printing NVRTC's log.
"""
import ctypes
import glob
import os
import sys

lib_path = os.environ.get("NVRTC_LIB", "libnvrtc.so.12")
found = glob.glob(lib_path)
lib = ctypes.CDLL(found[0] if found else lib_path)
repo = sys.argv[1]
archs = sys.argv[2:] or ["sm_90"]
common = open(f"{repo}/kernels/cuda/common.cuh").read()
ok = True
for name in sorted(os.listdir(f"{repo}/kernels/cuda")):
    if not name.endswith(".cu"):
        continue
    src = open(f"{repo}/kernels/cuda/{name}").read()
    text = f'{common}\n#line 1 "{name}"\n{src}'.encode()
    for arch in archs:
        prog = ctypes.c_void_p()
        r = lib.nvrtcCreateProgram(ctypes.byref(prog), text, name.encode(), 0, None, None)
        assert r == 0, r
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-lineinfo"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        r = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        cub = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(cub))
        msg = log.value.decode(errors="replace").strip()
        print(f"{name} {arch}: {'ok' if r == 0 else 'FAILED'} cubin {cub.value} bytes")
        if msg:
            print(msg[:4000])
        ok &= r == 0
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
sys.exit(0 if ok else 1)
