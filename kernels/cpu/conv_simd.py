"""Register tiles for the convolution loops: a Numba type for a small block of SIMD vectors and
the four @intrinsic operations kernels/cpu/conv_loops.py builds its inner loops from.

Imports numba and llvmlite only. Why: LLVM's loop vectoriser keeps a vectorised loop's
accumulators in memory between passes and (on Intel AVX-512 targets) prefers 256-bit vectors;
a tile is a value, so a loop over the reduction keeps it in registers, and its vectors are as
wide as the target's registers. A tile of `rows` x `cols` vectors of LANES elements is an LLVM
array of vectors; loops carry it like a scalar and LLVM allocates it to vector registers.

The operations read and write C-contiguous arrays through their flat element index, without
bounds checks: callers size their buffers for every index they pass (kernels/cpu/conv.py).
"""
import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


def _target():
    """(vector bytes, vector registers) of the CPU Numba compiles for (NUMBA_CPU_FEATURES
    when set, as Numba itself reads it, else the host's)."""
    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    has = set(f[1:] for f in features.split(",") if f.startswith("+"))
    if "avx512f" in has:
        return 64, 32
    if "avx" in has or "avx2" in has:
        return 32, 16
    return 16, (32 if "neon" in has or "sve" in has else 16)


VBYTES, VREGS = _target()
# Tile shape, in vectors: ROWS output channels x COLS vectors. 4 x 6 = 24 accumulators leave
# 8 of 32 registers for the loaded inputs and the broadcast weight; 4 x 2 = 8 fit 16 registers
# and still hide the FMA latency (two FMA units x 4 cycles). Measured: 4 x 6 and 8 x 3 tie on
# AVX-512, 4 x 4 is 20% slower, 4 x 7 spills; on AVX2 4 x 2 beats 4 x 3 and 2 x 4.
ROWS = 4
COLS = 6 if VREGS >= 32 else 2


def lanes(dtype):
    """Elements of `dtype` (a NumPy or Numba dtype) in one vector register."""
    return VBYTES // (dtype.bitwidth // 8) if hasattr(dtype, "bitwidth") else VBYTES // dtype.itemsize


class Tile(types.Type):
    """rows x cols vectors of `dtype`, held in registers."""

    def __init__(self, dtype, rows, cols):
        self.dtype, self.rows, self.cols = dtype, rows, cols
        super().__init__(name=f"Tile({dtype}, {rows}x{cols}, {VBYTES}B)")


@register_model(Tile)
class _TileModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        el = ir.FloatType() if fe_type.dtype.bitwidth == 32 else ir.DoubleType()
        vec = ir.VectorType(el, lanes(fe_type.dtype))
        super().__init__(dmm, fe_type, ir.ArrayType(vec, fe_type.rows * fe_type.cols))


# --- IR helpers -------------------------------------------------------------------------
def _flat_ok(*arrays):
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


def _at(context, builder, aty, arr, index):
    """Pointer to element `index` of the flattened C-contiguous array arr."""
    return builder.gep(context.make_array(aty)(context, builder, arr).data, [index])


def _plus(builder, index, k):
    return builder.add(index, ir.Constant(index.type, k))


def _load(builder, ptr, n):
    """n elements from ptr as one vector (unaligned)."""
    vec = ir.VectorType(ptr.type.pointee, n)
    return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=1)


def _splat(builder, scalar, n):
    vec = ir.VectorType(scalar.type, n)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), scalar,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _muladd(builder, a, b, c):
    """a * b + c, fused where the target has FMA (llvm.fmuladd never becomes a libcall)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fmuladd.{_suffix(a.type)}")
    return builder.call(fn, [a, b, c])


def _hsum(builder, v):
    """The sum of v's lanes, pairwise (halves added until one lane is left)."""
    n = v.type.count
    while n > 1:
        n //= 2
        mask = ir.VectorType(ir.IntType(32), n)
        lo = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _suffix(vec):
    return f"v{vec.count}{'f32' if isinstance(vec.element, ir.FloatType) else 'f64'}"


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


# --- the operations ----------------------------------------------------------------------
@intrinsic
def tile_splat(typingctx, src, at, rows, cols):
    """A rows x cols tile whose row i is src[at + i] in every lane (rows, cols constants)."""
    if not (_flat_ok(src) and isinstance(rows, types.IntegerLiteral)
            and isinstance(cols, types.IntegerLiteral)):
        return None
    tile = Tile(src.dtype, rows.literal_value, cols.literal_value)

    def codegen(context, builder, sig, args):
        arr, index = args[0], args[1]
        value = ir.Constant(context.get_value_type(tile), ir.Undefined)
        for i in range(tile.rows):
            v = _splat(builder, builder.load(_at(context, builder, src, arr, _plus(builder, index,
                                                                                   i))),
                       lanes(src.dtype))
            for j in range(tile.cols):
                value = builder.insert_value(value, v, i * tile.cols + j)
        return value
    return tile(src, at, rows, cols), codegen


@intrinsic
def tile_fma(typingctx, tile, w, wi, x, xi):
    """tile[i][j] += w[wi + i] * x[xi + j*LANES : xi + (j+1)*LANES]: one weight per row times
    cols consecutive vectors of x (an outer product; x is loaded once, each w once)."""
    if not (isinstance(tile, Tile) and _flat_ok(w, x)):
        return None

    def codegen(context, builder, sig, args):
        value, warr, wi_, xarr, xi_ = args
        n = lanes(tile.dtype)
        xs = [_load(builder, _at(context, builder, x, xarr, _plus(builder, xi_, j * n)), n)
              for j in range(tile.cols)]
        for i in range(tile.rows):
            wv = _splat(builder, builder.load(_at(context, builder, w, warr,
                                                  _plus(builder, wi_, i))), n)
            for j in range(tile.cols):
                k = i * tile.cols + j
                value = builder.insert_value(
                    value, _muladd(builder, wv, xs[j], builder.extract_value(value, k)), k)
        return value
    return tile(tile, w, wi, x, xi), codegen


@intrinsic
def tile_dot(typingctx, tile, g, gi, gstride, x, cols, ci, p):
    """tile[i][j] += g[gi + i*gstride : +LANES] * x[cols[ci + j] + p : +LANES]: rows of g
    times cols rows of x (each at its own start), lane by lane; tile_sum_into adds the lanes."""
    if not (isinstance(tile, Tile) and _flat_ok(g, x, cols)):
        return None

    def codegen(context, builder, sig, args):
        value, garr, gi_, gs, xarr, carr, ci_, p_ = args
        n = lanes(tile.dtype)
        gs = context.cast(builder, gs, sig.args[3], types.intp)
        gs_ = [_load(builder, _at(context, builder, g, garr,
                                  builder.add(gi_, builder.mul(gs, ir.Constant(gs.type, i)))), n)
               for i in range(tile.rows)]
        for j in range(tile.cols):
            start = builder.load(_at(context, builder, cols, carr, _plus(builder, ci_, j)))
            xv = _load(builder, _at(context, builder, x, xarr, builder.add(start, p_)), n)
            for i in range(tile.rows):
                k = i * tile.cols + j
                value = builder.insert_value(
                    value, _muladd(builder, gs_[i], xv, builder.extract_value(value, k)), k)
        return value
    return tile(tile, g, gi, gstride, x, cols, ci, p), codegen


@intrinsic
def tile_store(typingctx, tile, out, at, stride):
    """out[at + i*stride + j*LANES : +LANES] = tile[i][j]."""
    if not (isinstance(tile, Tile) and _flat_ok(out)):
        return None

    def codegen(context, builder, sig, args):
        value, arr, at_, st = args
        n = lanes(tile.dtype)
        for i in range(tile.rows):
            row = builder.add(at_, builder.mul(st, ir.Constant(st.type, i)))
            for j in range(tile.cols):
                ptr = _at(context, builder, out, arr, _plus(builder, row, j * n))
                vec = builder.extract_value(value, i * tile.cols + j)
                builder.store(vec, builder.bitcast(ptr, vec.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(tile, out, at, stride), codegen


@intrinsic
def tile_sum_into(typingctx, tile, out, at, stride):
    """out[at + i*stride + j] += the sum of tile[i][j]'s lanes."""
    if not (isinstance(tile, Tile) and _flat_ok(out)):
        return None

    def codegen(context, builder, sig, args):
        value, arr, at_, st = args
        for i in range(tile.rows):
            row = builder.add(at_, builder.mul(st, ir.Constant(st.type, i)))
            for j in range(tile.cols):
                ptr = _at(context, builder, out, arr, _plus(builder, row, j))
                total = _hsum(builder, builder.extract_value(value, i * tile.cols + j))
                builder.store(builder.fadd(builder.load(ptr), total), ptr)
        return context.get_dummy_value()
    return types.none(tile, out, at, stride), codegen


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
        zero = ir.Constant(v.type, None)
        with builder.if_then(masked_):  # (a branch: the mask is loaded only when used)
            k = _expand_load(builder, _at(context, builder, keep, karr, si_), mask)
            masked_v = builder.select(builder.fcmp_ordered(">", k, zero), v, zero)
            ptr = _at(context, builder, dst, darr, di_)
            builder.store(masked_v, builder.bitcast(ptr, v.type.as_pointer()), align=1)
        with builder.if_then(builder.not_(masked_)):
            ptr = _at(context, builder, dst, darr, di_)
            builder.store(v, builder.bitcast(ptr, v.type.as_pointer()), align=1)
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
