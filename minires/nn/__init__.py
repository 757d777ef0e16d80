"""Layers and skip connections: Module, Sequential, the thin layers, Embedding and the
residual blocks.

Imports minires.ops, minires.tensor and minires.backend (never optim, data or train).
"""
from minires.nn.module import Module, Sequential, IncompatibleKeys
from minires.nn.layers import (Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, GlobalAvgPool2d,
                               Flatten, BatchNorm2d, Dropout)
from minires.nn.layers import ConvTranspose2d
from minires.nn.skip import Residual, ReZero, BasicBlock, Highway, DenseSkip
from minires.nn.recurrent import RNN, LSTM, SequenceOnly
from minires.nn.embedding import Embedding

__all__ = [
    "Module", "Sequential", "IncompatibleKeys",
    "Linear", "Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "Flatten",
    "ConvTranspose2d",
    "BatchNorm2d", "Dropout",
    "Residual", "ReZero", "BasicBlock", "Highway", "DenseSkip",
    "RNN", "LSTM", "SequenceOnly",
    "Embedding",
]
