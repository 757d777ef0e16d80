"""Embedding: a table of learned vectors, one row of the weight per integer index, looked up
with gather along the rows (so repeated indices accumulate their gradients).

Imports minires.ops, minires.tensor (Parameter), minires.backend, nn.init and nn.module.
"""
import numbers

import numpy as np

import minires.ops as F
from minires import backend
from minires.nn import init
from minires.nn.module import Module
from minires.ops._args import raw
from minires.tensor import Parameter


class Embedding(Module):
    """indices (an integer array, Tensor or nested list of any shape, values in
    [0, num_embeddings), on the weight's device) -> indices.shape + (embedding_dim,).

    weight (num_embeddings, embedding_dim) drawn from N(0, 1) on the host, as PyTorch's.
    """

    def __init__(self, num_embeddings, embedding_dim, rng=None, dtype=np.float32):
        super().__init__()
        dtype = init.float_dtype(dtype, "Embedding")
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"Embedding: {name} must be a positive int, got {v!r}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        shape = (self.num_embeddings, self.embedding_dim)
        # drawn in float64 then rounded, so float32 and float64 tables from one seed agree
        self.weight = Parameter(init.as_rng(rng).standard_normal(shape).astype(dtype))

    def forward(self, indices):
        indices = raw(indices)
        xp = backend.array_module(self.weight.data)
        if not hasattr(indices, "dtype"):  # a list: made on the weight's device
            indices = xp.asarray(indices)
        # row r of the output is weight row indices[r]: gather along dim 0 with the index
        # repeated across the embedding_dim columns (a broadcast view, no copy)
        flat = indices.reshape(-1, 1)
        index = backend.array_module(flat).broadcast_to(flat, (len(flat), self.embedding_dim))
        try:
            rows = F.gather(self.weight, 0, index)
        except (IndexError, TypeError, ValueError) as e:  # say which layer refused the input
            raise type(e)(f"{self!r}: {e}") from None
        return F.reshape(rows, tuple(indices.shape) + (self.embedding_dim,))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
