"""MindSpore training, evaluation, export and checkpoint conversion for HRNet-C."""

from hrnet.onednn import cap_onednn_isa

cap_onednn_isa()
