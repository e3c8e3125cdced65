"""RDED: realistic and diverse crops scored by a teacher (Sun et al., "On the Diversity and
Realism of Distilled Dataset", CVPR 2024; reference code ``LINs-lab/RDED``): per class, the
lowest-cross-entropy random crops of real images, stitched ``factor x factor`` into each
distilled image.
"""
