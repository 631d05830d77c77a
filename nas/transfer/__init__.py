"""Transfer of searched backbones to dense prediction (semantic parsing of digit scenes, scored by mIoU).

:mod:`nas.transfer.dense`: the FPN/FCN head over a backbone's feature taps and the per-pixel Lightning system;
:mod:`nas.transfer.seg`: the transfer protocol (pretrain on digits, fine-tune or freeze, mIoU on held-out scenes)
and ``python -m nas.transfer seg``. See ``docs/transfer.md``.
"""

from nas.transfer.dense import HEADS, DenseHead, DenseModel, SegmentationSystem, backbone_params, iou_summary
from nas.transfer.seg import DNA_DIGITS_ARCH, SegConfig, load_backbone, load_space, save_prediction_grid, transfer_seg

__all__ = [
    "HEADS",
    "DenseHead",
    "DenseModel",
    "SegmentationSystem",
    "backbone_params",
    "iou_summary",
    "DNA_DIGITS_ARCH",
    "SegConfig",
    "load_backbone",
    "load_space",
    "save_prediction_grid",
    "transfer_seg",
]
