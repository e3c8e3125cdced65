"""Random real images: a seeded subset of ``ipc`` real images per class, the baseline every
dataset-distillation result is compared with.
"""
