"""MindSpore training, evaluation, export and checkpoint conversion for HRNet-C."""
