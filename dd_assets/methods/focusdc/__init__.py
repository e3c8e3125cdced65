"""FocusDC: Focused Dataset Condensation (CPAL 2026, "resolution-independent" dataset
distillation with a ViT; paper /work/shared/papers/000_48eff36882776368.txt, reference code
``edgeai1/FocusDC``): class-token attention of a pre-trained ViT locates a key window per real
image, realism ranks the images, and each distilled image is a grid of key patches plus
low-resolution whole-image views, optionally followed by Dynamic Fine-Tuning on fresh real
subsets.
"""
