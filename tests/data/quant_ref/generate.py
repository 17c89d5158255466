#!/usr/bin/python3
"""Generate KIVI / HQQ quantization reference vectors on the case-a conformance inputs.

Runs the *real* reference libraries (nothing from them is copied here):
  * KIVI  jy-yuan/KIVI @ 876b4d2d08e3b1d5f70d0969c299d8c7c42ddfb6, quant/new_pack.py, loaded from a path
          given with --kivi (keep that file OUTSIDE this repository). Its module-level `import triton`
          is satisfied by a stub; only the pure-PyTorch functions are called.
  * HQQ   the installed `hqq` package (0.2.8.post1; its files are identical to mobiusml/hqq @
          e0b1d00e095653359da9de1d7dbb35a994aa6b96). On torch < 2 an identity `torch.compile` shim is
          installed before import (it only affects HQQLinear method decorators).

Axes are KIVI-style (see shared/reference/conformance/README.md section 3):
  keys   grouped along tokens, per (head, channel): HQQ gets K.transpose(2,3).contiguous(), axis=1
  values grouped along channels, per (head, token):  HQQ gets V (contiguous), axis=1

Usage (Debian 12: apt-get install python3-torch python3-numpy python3-termcolor python3-pip;
       python3 -m pip install --no-deps --break-system-packages hqq==0.2.8.post1):
  /usr/bin/python3 tests/data/quant_ref/generate.py --kivi /tmp/kivi/new_pack.py [--out DIR] [--inputs DIR]
  add --check to compare against the files already in --out instead of writing.
"""

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
DEFAULT_INPUTS = os.path.join(REPO, "..", "shared", "reference", "conformance")

ALL_BITS = [1, 2, 3, 4, 8]
ALL_GS = [32, 64]
# Which configs get arrays written (rel errors etc. are computed for all of ALL_BITS x ALL_GS).
STORE = {
    "kivi": [(b, g) for b in (2, 4, 8) for g in (32, 64)] + [(1, 32), (3, 32)],
    "hqqmm": [(b, g) for b in (2, 4, 8) for g in (32, 64)],
    "hqqopt": [(2, 64), (4, 64), (8, 64), (4, 32)],
}
KIVI_PACK_BITS = (2, 4, 8)  # KIVI's pack_tensor/unpack_tensor accept only these


# ----------------------------------------------------------------------------------------- loading
def load_kivi(path):
    """Import KIVI's new_pack.py with a stub for its module-level `import triton`."""
    if "triton" not in sys.modules:
        class _Any:
            def __getattr__(self, name):
                return _Any()

            def __call__(self, *a, **k):
                if len(a) == 1 and callable(a[0]) and not k:
                    return a[0]  # used as a bare decorator (@triton.jit)
                return _Any()

        tl = types.ModuleType("triton.language")
        tl.__getattr__ = lambda name: _Any()
        tr = types.ModuleType("triton")
        tr.jit = lambda f=None, **k: f if f is not None else (lambda g: g)
        tr.language = tl
        tr.__getattr__ = lambda name: _Any()
        sys.modules["triton"] = tr
        sys.modules["triton.language"] = tl
    spec = importlib.util.spec_from_file_location("kivi_new_pack", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_hqq():
    if not hasattr(torch, "compile"):
        torch.compile = lambda *a, **k: (lambda f: f)  # identity shim for torch 1.13
    import hqq
    import hqq.core.optimize as hqq_opt
    from hqq.core.quantize import Quantizer
    return hqq, hqq_opt, Quantizer


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------------ KIVI
def run_kivi(kivi, x, which, bits, gs):
    """x: (1,H,N,D) float32. Returns codes (H,N,D) u8, scale/mn with the group axis shortened, deq."""
    quant = kivi.quant_and_pack_kcache if which == "K" else kivi.quant_and_pack_vcache
    pack_dim = 2 if which == "K" else 3
    if bits in KIVI_PACK_BITS:
        code_p, scale, mn = quant(x.clone(), gs, bits)
        codes = kivi.unpack_tensor(code_p, bits, pack_dim=pack_dim)
        deq_fn = kivi.unpack_and_dequant_kcache if which == "K" else kivi.unpack_and_dequant_vcache
        deq = deq_fn(code_p, scale, mn, gs, bits)
        # packing round trip: the same quant function with packing bypassed gives the same codes
        orig = kivi.pack_tensor
        kivi.pack_tensor = lambda data, bits, pack_dim: data
        try:
            raw, s2, m2 = quant(x.clone(), gs, bits)
        finally:
            kivi.pack_tensor = orig
        assert torch.equal(raw.to(torch.int64), codes.to(torch.int64)), "KIVI pack/unpack round trip"
        assert torch.equal(s2, scale) and torch.equal(m2, mn)
    else:
        # KIVI's packer rejects 1/3 bits: run its quant function with packing bypassed, and
        # dequantize as its unpack_and_dequant_* does (code -> fp16 (exact) -> *scale + mn).
        orig = kivi.pack_tensor
        kivi.pack_tensor = lambda data, bits, pack_dim: data
        try:
            codes, scale, mn = quant(x.clone(), gs, bits)
        finally:
            kivi.pack_tensor = orig
        shp = codes.shape
        if which == "K":
            g = codes.view(shp[0], shp[1], shp[2] // gs, gs, shp[3])
        else:
            g = codes.view(shp[0], shp[1], shp[2], shp[3] // gs, gs)
        deq = (g.to(torch.float16) * scale + mn).view(shp)
    assert deq.dtype == torch.float32
    H, N, D = x.shape[1:]
    codes = codes.to(torch.int64)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    if which == "K":  # scale/mn: (1,H,N/gs,1,D)
        scale, mn = scale.reshape(H, N // gs, D), mn.reshape(H, N // gs, D)
    else:  # (1,H,N,D/gs,1)
        scale, mn = scale.reshape(H, N, D // gs), mn.reshape(H, N, D // gs)
    return dict(codes=codes.reshape(H, N, D).to(torch.uint8).numpy(), scale=scale.numpy(),
                mn=mn.numpy(), deq=deq.reshape(H, N, D).numpy())


# ------------------------------------------------------------------------------------------- HQQ
class StepCounter:
    """Wraps hqq.core.optimize.optimize_weights_proximal_legacy_step to record iterations."""

    def __init__(self, hqq_opt):
        self.mod = hqq_opt
        self.orig = hqq_opt.optimize_weights_proximal_legacy_step
        self.errs = []

    def __enter__(self):
        def wrapped(W_f, *a, **k):
            out = self.orig(W_f, *a, **k)
            self.errs.append(float(torch.abs(W_f - out[0]).mean().float()))
            return out
        self.mod.optimize_weights_proximal_legacy_step = wrapped
        return self

    def __exit__(self, *exc):
        self.mod.optimize_weights_proximal_legacy_step = self.orig


def run_hqq(Quantizer, hqq_opt, x, which, bits, gs, optimize):
    H, N, D = x.shape[1:]
    W = x.transpose(2, 3).contiguous() if which == "K" else x.contiguous()
    kw = dict(nbits=bits, group_size=gs, optimize=optimize, round_zero=False, axis=1,
              compute_dtype=torch.float32, device="cpu")
    with StepCounter(hqq_opt) as sc:
        W_q, meta = Quantizer.quantize(W, bitpack=False, **kw)
    meta["compute_dtype"] = torch.float32
    deq = Quantizer.dequantize(W_q, meta)
    # packed path must agree (3-bit packed dequantize only works on a 2-D input: it slices rows by
    # shape[0]*shape[1]//group_size, so pass the same memory as 2-D there; grouping is identical)
    Wp = W.reshape(-1, W.shape[-1]) if bits == 3 else W
    W_qp, meta_p = Quantizer.quantize(Wp, bitpack=True, **kw)
    meta_p["compute_dtype"] = torch.float32
    deq_p = Quantizer.dequantize(W_qp, meta_p).reshape(W.shape)
    unp = Quantizer.unpack[meta_p["packing"]](W_qp, dtype=torch.uint8)[: W_q.shape[0]]
    assert torch.equal(unp, W_q.to(torch.uint8)), "HQQ pack/unpack round trip"
    assert torch.equal(deq_p, deq) and torch.equal(meta_p["zero"], meta["zero"])
    assert torch.equal(meta_p["scale"], meta["scale"])
    # default dequantize dtype (fp16 unpack, no compute_dtype in meta) gives the same floats
    meta.pop("compute_dtype")
    assert torch.equal(Quantizer.dequantize(W_q, meta), deq)
    codes = W_q.reshape(W.shape).to(torch.int64)
    assert torch.equal(codes.to(W_q.dtype), W_q.reshape(W.shape))  # integral
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    scale, zero = meta["scale"], meta["zero"]  # (numel/gs, 1), rows in W's memory order
    if which == "K":
        codes, deq = codes.transpose(2, 3), deq.reshape(W.shape).transpose(2, 3)
        scale = scale.reshape(H, D, N // gs).transpose(1, 2)
        zero = zero.reshape(H, D, N // gs).transpose(1, 2)
    else:
        scale, zero = scale.reshape(H, N, D // gs), zero.reshape(H, N, D // gs)
    assert deq.dtype == torch.float32 and scale.dtype == torch.float32
    out = dict(codes=codes.reshape(H, N, D).to(torch.uint8).numpy(),
               scale=np.ascontiguousarray(scale.numpy()), zero=np.ascontiguousarray(zero.numpy()),
               deq=np.ascontiguousarray(deq.reshape(H, N, D).numpy()))
    return out, sc.errs


# -------------------------------------------------------------------------------------- analysis
def grouped(a, which, gs):
    """(H,N,D) -> (H, groups..., gs) view with the group members on the last axis."""
    H, N, D = a.shape
    if which == "K":
        return a.reshape(H, N // gs, gs, D).transpose(0, 1, 3, 2)
    return a.reshape(H, N, D // gs, gs)


def exact_pos(x, which, bits, gs):
    """(x - mn) * (2^b - 1) / (mx - mn) in float64 (exact up to 1 ulp of float64)."""
    g = grouped(x.astype(np.float64), which, gs)
    mn, mx = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    return (g - mn) * (2 ** bits - 1) / (mx - mn)


def tie_masks(x, which, bits, gs):
    t = exact_pos(x, which, bits, gs)
    d = np.abs(t - np.floor(t) - 0.5)
    return d < 1e-12, d < 1e-4  # grouped layout


def rel_err(x, deq):
    x64, d64 = x.astype(np.float64), deq.astype(np.float64)
    return float(np.linalg.norm(x64 - d64) / np.linalg.norm(x64))


def check_kivi_formula(x, which, bits, gs, r):
    """KIVI arithmetic restated in torch float32 (true division, clamp then round-half-even)."""
    g = torch.from_numpy(np.ascontiguousarray(grouped(x, which, gs)))
    mn = g.min(-1, keepdim=True)[0]
    mx = g.max(-1, keepdim=True)[0]
    scale = (mx - mn) / (2 ** bits - 1)
    code = torch.round(torch.clamp((g - mn) / scale, 0, 2 ** bits - 1))
    deq = code * scale + mn
    ref_codes = grouped(r["codes"], which, gs).astype(np.float32)
    assert np.array_equal(code.numpy(), ref_codes), "KIVI formula codes"
    assert np.array_equal(deq.numpy(), grouped(r["deq"], which, gs)), "KIVI formula deq"
    assert np.array_equal(mn[..., 0].numpy(), grouped_params(r["mn"], which))
    assert np.array_equal(scale[..., 0].numpy(), grouped_params(r["scale"], which))
    # deq == float32(code) * scale + mn, bit-exact, from the stored arrays alone
    sc = grouped_params(r["scale"], which)[..., None]
    m = grouped_params(r["mn"], which)[..., None]
    deq2 = (ref_codes * sc).astype(np.float32) + m
    assert deq2.dtype == np.float32 and np.array_equal(deq2, grouped(r["deq"], which, gs))


def grouped_params(p, which):
    """scale/mn/zero as stored, K (H,N/gs,D) / V (H,N,D/gs), already match grouped()[..., 0]."""
    return p


def check_hqqmm_formula(x, which, bits, gs, r):
    g = torch.from_numpy(np.ascontiguousarray(grouped(x, which, gs)))
    mn = g.min(-1, keepdim=True)[0]
    mx = g.max(-1, keepdim=True)[0]
    inv = (2 ** bits - 1) / (mx - mn)
    inv = torch.where((mx - mn).abs() <= 1e-4, torch.ones_like(inv), inv).clamp(max=2e4)
    zero = -mn * inv
    code = torch.clamp(torch.round(g * inv + zero), 0, 2 ** bits - 1)
    assert np.array_equal(code.numpy(), grouped(r["codes"], which, gs).astype(np.float32))
    assert np.array_equal(zero[..., 0].numpy(), grouped_params(r["zero"], which))
    assert np.array_equal((1.0 / inv)[..., 0].numpy(), grouped_params(r["scale"], which))
    deq = (code - zero) * (1.0 / inv)
    assert np.array_equal(deq.numpy(), grouped(r["deq"], which, gs))


# ------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kivi", required=True, help="path to KIVI quant/new_pack.py @ 876b4d2")
    ap.add_argument("--inputs", default=DEFAULT_INPUTS, help="folder with inputs_a_{key,value}_states.npy")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--heads", default="0,1", help="heads whose arrays are stored (all 4 are quantized)")
    ap.add_argument("--tokens", type=int, default=256,
                    help="store tokens [0, TOKENS) (a multiple of every group size; all 512 are quantized)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--check", action="store_true", help="compare with files in --out, write nothing")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    kivi = load_kivi(args.kivi)
    hqq, hqq_opt, Quantizer = load_hqq()
    heads = [int(h) for h in args.heads.split(",")]
    ntok = args.tokens
    assert all(ntok % g == 0 for g in ALL_GS) and 0 < ntok <= 512
    opt_defaults = inspect.signature(hqq_opt.optimize_weights_proximal_legacy).parameters["opt_params"].default
    assert hqq_opt.optimize_weights_proximal is hqq_opt.optimize_weights_proximal_legacy
    assert Quantizer.optimize_weights is hqq_opt.optimize_weights_proximal_legacy

    inputs = {}
    for which, name in (("K", "key"), ("V", "value")):
        p = os.path.join(args.inputs, f"inputs_a_{name}_states.npy")
        a = np.load(p)
        assert a.shape == (1, 4, 512, 64) and a.dtype == np.float32
        inputs[which] = (a, sha256(p))

    files = {}  # name -> array
    report = {
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "hqq": hqq.__version__, "torch_num_threads": torch.get_num_threads(),
            "hqq_opt_params_default": opt_defaults,
        },
        "inputs_sha256": {w: inputs[w][1] for w in inputs},
        "stored_heads": heads, "stored_tokens": [0, ntok],
        "rel_err": {}, "hqqopt_steps": {}, "hqqopt_err_trace": {}, "ties_full": {}, "ties_stored": {},
        "code_mismatch_full": {}, "code_mismatch_stored": {},
    }
    for which in ("K", "V"):
        x_t = torch.from_numpy(inputs[which][0].copy())
        x = inputs[which][0][0]  # (H,N,D)
        for bits in ALL_BITS:
            for gs in ALL_GS:
                cfg = f"{which}_b{bits}_g{gs}"
                res = {"kivi": run_kivi(kivi, x_t, which, bits, gs)}
                res["hqqmm"], _ = run_hqq(Quantizer, hqq_opt, x_t, which, bits, gs, False)
                res["hqqopt"], errs = run_hqq(Quantizer, hqq_opt, x_t, which, bits, gs, True)
                check_kivi_formula(x, which, bits, gs, res["kivi"])
                check_hqqmm_formula(x, which, bits, gs, res["hqqmm"])
                exact, near = tie_masks(x, which, bits, gs)
                hsel = np.zeros(exact.shape[:2], bool)  # grouped layout: axis 1 = token group (K) / token (V)
                hsel[heads, : (ntok // gs if which == "K" else ntok)] = True
                report["ties_full"][cfg] = [int(exact.sum()), int(near.sum())]
                report["ties_stored"][cfg] = [int(exact[hsel].sum()), int(near[hsel].sum())]
                ck = grouped(res["kivi"]["codes"], which, gs)
                cm = grouped(res["hqqmm"]["codes"], which, gs)
                co = grouped(res["hqqopt"]["codes"], which, gs)
                diff_km = ck != cm
                assert not np.any(diff_km & ~exact), f"{cfg}: kivi != hqqmm away from an exact .5 tie"
                report["code_mismatch_full"][cfg] = {"kivi!=hqqmm": int(diff_km.sum()),
                                                     "hqqmm!=hqqopt": int((cm != co).sum())}
                report["code_mismatch_stored"][cfg] = {"kivi!=hqqmm": int(diff_km[hsel].sum()),
                                                       "hqqmm!=hqqopt": int((cm != co)[hsel].sum())}
                report["hqqopt_steps"][cfg] = len(errs)
                report["hqqopt_err_trace"][cfg] = errs
                for m in ("kivi", "hqqmm", "hqqopt"):
                    report["rel_err"][f"{m}_{cfg}"] = rel_err(x, res[m]["deq"])
                    if (bits, gs) in STORE[m]:
                        for part, arr in res[m].items():
                            nt = ntok // gs if (part in ("scale", "mn", "zero") and which == "K") else ntok
                            files[f"{m}_{cfg}_{part}.npy"] = np.ascontiguousarray(arr[heads][:, :nt])
                print(cfg, {m: round(report["rel_err"][f"{m}_{cfg}"], 6) for m in res},
                      "steps", len(errs), "ties", report["ties_full"][cfg],
                      report["code_mismatch_full"][cfg], flush=True)

    js = json.dumps(report, indent=1, sort_keys=True) + "\n"
    if args.check:
        bad = 0
        for name, arr in sorted(files.items()):
            p = os.path.join(args.out, name)
            if not os.path.exists(p) or not np.array_equal(np.load(p), arr) or np.load(p).dtype != arr.dtype:
                print("MISMATCH", name)
                bad += 1
        with open(os.path.join(args.out, "rel_err.json")) as f:
            if f.read() != js:
                print("MISMATCH rel_err.json")
                bad += 1
        print(f"check: {len(files) + 1 - bad} match, {bad} differ")
        sys.exit(1 if bad else 0)
    os.makedirs(args.out, exist_ok=True)
    for name, arr in sorted(files.items()):
        np.save(os.path.join(args.out, name), arr)
    with open(os.path.join(args.out, "rel_err.json"), "w") as f:
        f.write(js)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in files)
    print(f"wrote {len(files)} .npy files, {total} bytes, + rel_err.json")


if __name__ == "__main__":
    main()
