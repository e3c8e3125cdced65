"""EDF: "Emphasizing Discriminative Features for Dataset Distillation in Complex Scenarios"
(Common Pattern Dropout + Discriminative Area Enhancement on top of trajectory matching), with
the MTT (Cazenavette et al., CVPR 2022) / DATM (Guo et al., ICLR 2024) expert trajectories and
matching loop it builds on; see ``docs/edf.md``."""
