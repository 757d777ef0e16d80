"""Vector copies for packing and emitting the convolution's image rows: @intrinsic operations
on C-contiguous arrays (flat element indices, no bounds checks) that move one vector per call
with masked loads and stores, so that rows shorter than a vector cost one instruction each.

Imports numba, llvmlite and kernels/cpu/conv_simd.py (the target's vector width and IR
helpers). Row copies work on every target; the whole-slot expand/compress copies are used on
AVX-512 only (elsewhere LLVM would emulate them element by element).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .conv_simd import _at, _flat_ok, _load, _plus, _splat, _suffix, lanes


def _first(builder, n, count):
    """The lane mask lane < min(n, count): the first n lanes (n an i64 value)."""
    i32 = ir.IntType(32)
    n = builder.trunc(builder.select(builder.icmp_signed("<", n, ir.Constant(n.type, count)),
                                     n, ir.Constant(n.type, count)), i32)
    lanes_ = ir.VectorType(i32, count)
    return builder.icmp_signed("<", ir.Constant(lanes_, list(range(count))),
                               _splat(builder, n, count))


def _masked_load(builder, ptr, mask):
    vec = ir.VectorType(ptr.type.pointee, mask.type.count)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec.as_pointer(), ir.IntType(32), mask.type, vec]),
        f"llvm.masked.load.{_suffix(vec)}.p0")
    return builder.call(fn, [builder.bitcast(ptr, vec.as_pointer()), ir.Constant(ir.IntType(32), 1),
                             mask, ir.Constant(vec, None)])


def _masked_store(builder, value, ptr, mask):
    vec = value.type
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [vec, vec.as_pointer(), ir.IntType(32), mask.type]),
        f"llvm.masked.store.{_suffix(vec)}.p0")
    builder.call(fn, [value, builder.bitcast(ptr, vec.as_pointer()),
                      ir.Constant(ir.IntType(32), 1), mask])


# --- row copies: one vector per call, the first min(n, LANES) elements (masked loads and
# stores: short rows cost one instruction each, and nothing outside the row is touched) ------
def _copy_typer(dst, src, *others):
    return _flat_ok(dst, src, *others) and dst.dtype == src.dtype


def _copy(kind, dst, src, keep=None):
    """Codegen for dst[di + l] = op(src[si + l]), lanes l < min(n, LANES): op identity
    ("copy"), ReLU keeping NaN ("relu"), or the ReLU mask: src where keep[si + l] > 0, else 0
    ("mask"; as kernels.cpu.relu_backward and PyTorch: a masked inf or NaN gives 0)."""
    def codegen(context, builder, sig, values):
        darr, di_, sarr, si_, n_ = values[:5]
        mask = _first(builder, n_, lanes(src.dtype))
        v = _masked_load(builder, _at(context, builder, src, sarr, si_), mask)
        zero = ir.Constant(v.type, None)
        if kind == "relu":
            v = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
        elif kind == "mask":
            k = _masked_load(builder, _at(context, builder, keep, values[5], si_), mask)
            v = builder.select(builder.fcmp_ordered(">", k, zero), v, zero)
        _masked_store(builder, v, _at(context, builder, dst, darr, di_), mask)
        return context.get_dummy_value()
    return codegen


@intrinsic
def copy_vector(typingctx, dst, di, src, si, n):
    """dst[di + l] = src[si + l] for l < min(n, LANES)."""
    if not _copy_typer(dst, src):
        return None
    return types.none(dst, di, src, si, n), _copy("copy", dst, src)


@intrinsic
def relu_vector(typingctx, dst, di, src, si, n):
    """dst[di + l] = max(src[si + l], 0) for l < min(n, LANES) (NaN kept)."""
    if not _copy_typer(dst, src):
        return None
    return types.none(dst, di, src, si, n), _copy("relu", dst, src)


@intrinsic
def mask_vector(typingctx, dst, di, src, si, n, keep):
    """dst[di + l] = src[si + l] if keep[si + l] > 0 else 0, for l < min(n, LANES)."""
    if not _copy_typer(dst, src, keep):
        return None
    return types.none(dst, di, src, si, n, keep), _copy("mask", dst, src, keep)


@intrinsic
def split_pair(typingctx, dst, de, do, src, si, n):
    """Deinterleave min(n, 2*LANES) elements of src from si: the even ones to dst[de:], the
    odd ones to dst[do:] (a row split into its two stride-2 column phases)."""
    if not _copy_typer(dst, src):
        return None

    def codegen(context, builder, sig, args):
        darr, de_, do_, sarr, si_, n_ = args
        count = lanes(src.dtype)
        lo = _masked_load(builder, _at(context, builder, src, sarr, si_),
                          _first(builder, n_, count))
        rest = builder.sub(n_, ir.Constant(n_.type, count))
        hi = _masked_load(builder, _at(context, builder, src, sarr, _plus(builder, si_, count)),
                          _first(builder, rest, count))
        idx = ir.VectorType(ir.IntType(32), count)
        even = builder.shuffle_vector(lo, hi, ir.Constant(idx, list(range(0, 2 * count, 2))))
        odd = builder.shuffle_vector(lo, hi, ir.Constant(idx, list(range(1, 2 * count, 2))))
        half = builder.ashr(n_, ir.Constant(n_.type, 1))
        _masked_store(builder, even, _at(context, builder, dst, darr, de_),
                      _first(builder, builder.sub(n_, half), count))  # ceil(n / 2) evens
        _masked_store(builder, odd, _at(context, builder, dst, darr, do_),
                      _first(builder, half, count))
        return context.get_dummy_value()
    return types.none(dst, de, do, src, si, n), codegen


# --- whole image planes, a vector at a time (AVX-512, rows shorter than a vector): the lanes
# of a vector that hold pixels are given as bits; expand/compress move exactly those ----------
def _bits_mask(builder, bits, count):
    """<count x i1> from the low `count` bits of the i64 `bits`."""
    return builder.bitcast(builder.trunc(bits, ir.IntType(count)),
                           ir.VectorType(ir.IntType(1), count))


def _popcount(builder, bits):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits.type, [bits.type]),
                                        "llvm.ctpop.i64")
    return builder.call(fn, [bits])


def _expand_load(builder, ptr, mask):
    """Consecutive elements from ptr into the lanes set in mask, 0 in the others."""
    vec = ir.VectorType(ptr.type.pointee, mask.type.count)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [ptr.type, mask.type, vec]),
        f"llvm.masked.expandload.{_suffix(vec)}")
    return builder.call(fn, [ptr, mask, ir.Constant(vec, None)])


@intrinsic
def expand_vector(typingctx, dst, di, src, si, bits, keep, masked):
    """dst[di : di + LANES] = the next popcount(bits) elements of src from si, in the lanes set
    in bits (0 in the others; with masked, 0 also where the same elements of keep are not
    > 0); returns popcount(bits), the elements read."""
    if not _copy_typer(dst, src, keep):
        return None

    def codegen(context, builder, sig, args):
        darr, di_, sarr, si_, bits_, karr, masked_ = args
        count = lanes(src.dtype)
        mask = _bits_mask(builder, bits_, count)
        v = _expand_load(builder, _at(context, builder, src, sarr, si_), mask)
        k = _expand_load(builder, _at(context, builder, keep, karr, si_), mask)  # src if not
        zero = ir.Constant(v.type, None)
        drop = builder.and_(_splat(builder, masked_, count),
                            builder.not_(builder.fcmp_ordered(">", k, zero)))
        ptr = _at(context, builder, dst, darr, di_)
        builder.store(builder.select(drop, zero, v), builder.bitcast(ptr, v.type.as_pointer()),
                      align=1)
        return _popcount(builder, bits_)
    return types.int64(dst, di, src, si, bits, keep, masked), codegen


@intrinsic
def compress_vector(typingctx, dst, di, src, si, bits, relu):
    """The lanes of src[si : si + LANES] set in bits (max(., 0) of them when relu, NaN kept),
    stored consecutively from dst[di]; returns popcount(bits), the elements written."""
    if not _copy_typer(dst, src):
        return None

    def codegen(context, builder, sig, args):
        darr, di_, sarr, si_, bits_, relu_ = args
        count = lanes(src.dtype)
        mask = _bits_mask(builder, bits_, count)
        v = _load(builder, _at(context, builder, src, sarr, si_), count)
        zero = ir.Constant(v.type, None)
        neg = builder.and_(builder.fcmp_ordered("<", v, zero), _splat(builder, relu_, count))
        v = builder.select(neg, zero, v)
        ptr = _at(context, builder, dst, darr, di_)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [v.type, ptr.type, mask.type]),
            f"llvm.masked.compressstore.{_suffix(v.type)}")
        builder.call(fn, [v, ptr, mask])
        return _popcount(builder, bits_)
    return types.int64(dst, di, src, si, bits, relu), codegen
