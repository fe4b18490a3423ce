"""Drop-in nn.Modules backed by fastfuse ops."""
from .augment import BatchAugment
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .dropout import Dropout
from .fused_sequential import FusedSequential
from .lin_bn_drop import LinBnDrop
from .pooling import AdaptiveConcatPool2d, Flatten

from .reflect_conv2d import ConvLayer, NormType, ReflectConv2d
from .resblock import ResBlock
from .sync_batch_norm import SyncBatchNorm
from .tabular import Embedding, TabularEmbedding

__all__ = ["AdaptiveConcatPool2d", "BatchAugment", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ConvLayer", "Dropout",
           "Embedding", "Flatten", "FusedSequential", "LinBnDrop", "NormType", "ReflectConv2d", "ResBlock",
           "SyncBatchNorm", "TabularEmbedding"]
