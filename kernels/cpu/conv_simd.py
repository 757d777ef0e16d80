"""Register tiles for the convolution loops: a Numba type for a small block of SIMD vectors and
the @intrinsic operations kernels/cpu/conv_loops.py builds its inner loops from (the copies
that pack and emit rows are in kernels/cpu/conv_copy.py).

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
    size = dtype.bitwidth // 8 if hasattr(dtype, "bitwidth") else dtype.itemsize
    return VBYTES // size


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


@intrinsic
def claim(typingctx, counter):
    """counter[0] += 1, atomically; returns the value before: the next work item of a call,
    taken by whichever thread is free (threads slowed by other processes take fewer)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _at(context, builder, counter, args[0], ir.Constant(ir.IntType(64), 0))
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen
