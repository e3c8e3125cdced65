"""DDPS: Diffusion-Driven Patch Selection -- "Efficient Dataset Distillation via Diffusion-Driven
Patch Selection for Improved Generalization" (Zhong et al.): representativeness scores from a
class-conditional diffusion model (:mod:`.representativeness`), DIFT features (:mod:`.dift`),
k-means clusters (:mod:`.clusters`) and the IPC-dependent take (:mod:`.select`), run by the graph
as the stages of :mod:`.stages`; the diffusion models live in :mod:`.diffusion`,
:mod:`.stable_diffusion` and :mod:`.pixel_diffusion`.
"""
