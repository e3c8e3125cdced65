"""NRR-DD: dataset distillation via Non-Critical Region Refinement (paper "Dataset
Distillation via ... Non-Critical Region Refinement", Sec. 3.2-3.4, Algorithm 1 and
supplementary A): CAM-critical, least-confident real crops are stitched into synthetic images
(CIDD), whose non-critical pixels are then refined against the teacher's BN statistics (NRR);
students learn from distance-based DBR labels (``dd_assets.core.dbr``).
"""
