"""The ``twell`` command: info, demo, train-ref, bench."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    import twell
    from twell import _ffi

    out = {"twell": twell.__version__, "python_package": str(_ffi.Path(__file__).parent)}
    if _ffi.lib is None:
        out["library"] = None
        out["kernels"] = f"unavailable: {_ffi.unavailable_reason}"
    else:
        lib, ffi = _ffi.lib, _ffi.ffi
        out["library"] = str(_ffi.library_path)
        out["library_version"] = int(lib.twell_version())
        out["header_version"] = int(lib.TWELL_VERSION)
        out["build"] = ffi.string(lib.twell_build_info()).decode()
        n = ffi.new("int32_t *")
        status = lib.twell_device_count(n)
        if status != 0:
            out["gpus"] = 0
            out["kernels"] = "unavailable: " + ffi.string(lib.twell_last_error()).decode()
        else:
            gpus = []
            for d in range(n[0]):
                info = ffi.new("twell_device_info *")
                _ffi.check(lib.twell_get_device_info(d, info))
                gpus.append({"device": d, "name": ffi.string(info.name).decode(),
                             "cc": f"{info.cc_major}.{info.cc_minor}", "sms": info.sm_count,
                             "sm90a_kernels": bool(info.has_sm90a_kernels)})
            out["gpus"] = gpus
            out["kernels"] = "available"
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        width = max(len(k) for k in out)
        for k, v in out.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _version() -> str:
    import twell
    from twell import _ffi

    lib = f"library {int(_ffi.lib.twell_version())}" if _ffi.lib is not None else "no CUDA library"
    return f"twell {twell.__version__} ({lib})"


class _CmakeDir(argparse.Action):
    """--cmake-dir: where the installed package's CMake config lives (CMAKE_PREFIX_PATH / twell_DIR)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from twell import _ffi

        for d in _ffi._package_dirs():
            if (d / "cmake" / "twellConfig.cmake").is_file():
                print(d / "cmake")
                parser.exit(0)
        parser.exit(1, "twell: this install has no CMake package config (the CUDA library was not built: "
                       "see `twell info`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twell", description="Activation-sparse FFN kernels (TwELL).")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--cmake-dir", action=_CmakeDir,
                   help="print the folder of the installed CMake package config (find_package(twell)) and exit")
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name, **kw):
        return _add(name, formatter_class=_Help, **kw)

    sub.add_parser = add_parser

    info = sub.add_parser("info", help="library version, compiled architectures, GPUs seen (or why not)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    from .lm import demo, train

    d = sub.add_parser("demo", help="train a small LM with and without L1 on the CPU (and check kernels on a GPU)")
    demo.add_demo_args(d)
    d.set_defaults(func=demo.main_demo)

    t = sub.add_parser("train-ref", help="train the NumPy reference LM with the L1 recipe")
    train.add_train_ref_args(t)
    t.set_defaults(func=train.main_train_ref)

    from .bench import ffn as bench_ffn

    b = sub.add_parser("bench", help="GPU inference benchmarks against cuBLAS dense (writes JSON + PNG)")
    bench_ffn.add_bench_args(b)
    b.set_defaults(func=bench_ffn.main_bench)

    from .bench import train as bench_train

    bt = sub.add_parser("bench-train", help="GPU training-step benchmarks against PyTorch bf16 autograd (JSON + PNG)")
    bench_train.add_bench_train_args(bt)
    bt.set_defaults(func=bench_train.main_bench_train)

    from .bench import pytorch as bench_torch

    bp = sub.add_parser("bench-torch", help="twell from PyTorch (eager, CUDA graphs, host time) against dense PyTorch")
    bench_torch.add_bench_torch_args(bp)
    bp.set_defaults(func=bench_torch.main_bench_torch)

    from .bench import model as bench_model

    bm = sub.add_parser("bench-model", help="train a ReLU Llama dense and through twell (L1 recipe), then serve both")
    bench_model.add_bench_model_args(bm)
    bm.set_defaults(func=bench_model.main_bench_model)
    return p


def main(argv=None) -> int:
    from twell import TwellError
    from twell._argtypes import CliError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:  # a bad value or path: one line, as argparse reports its own errors
        print(f"twell {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TwellError as e:
        print(f"twell {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"twell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
