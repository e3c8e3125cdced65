"""Teacher agreement on distilled images and their tiles (a train-side diagnostic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from dd_assets.diagnostics import teacher_agreement


class _Bright(nn.Module):
    """Class 0 when the mean pixel is positive (bright), class 1 otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([4 * m, -4 * m], dim=1)


def test_tile_agreement_sees_the_dark_tile_the_image_level_hides():
    img = np.full((1, 3, 8, 8), 255, np.uint8)
    img[0, :, 4:, 4:] = 0  # one dark tile of four
    lineage = pd.DataFrame({"image_index": [0, 0, 0, 0], "dest_x0": [0, 4, 0, 4], "dest_y0": [0, 0, 4, 4],
                            "dest_x1": [4, 8, 4, 8], "dest_y1": [4, 4, 8, 8]})
    res = teacher_agreement(_Bright(), img, np.array([0]), lineage, (0.5,) * 3, (0.5,) * 3)
    assert res.image_agree == 1.0 and res.tiles == 4
    import polars as pl   # the report passes the lineage as Polars

    assert teacher_agreement(_Bright(), img, np.array([0]), pl.from_pandas(lineage), (0.5,) * 3, (0.5,) * 3) == res
    assert res.tile_agree == 0.75
    p_bright, p_dark = torch.softmax(torch.tensor([4.0, -4.0]), 0)[0].item(), torch.softmax(torch.tensor([-4.0, 4.0]), 0)[0].item()
    assert abs(res.tile_conf - (3 * p_bright + p_dark) / 4) < 1e-6
    whole = teacher_agreement(_Bright(), img, np.array([1]), None, (0.5,) * 3, (0.5,) * 3)
    assert whole.image_agree == 0.0 and whole.tiles == 1
