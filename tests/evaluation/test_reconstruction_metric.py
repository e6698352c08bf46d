import math

import torch

from mtvision.evaluation import ReconstructionMetric


def test_masked_mse_pools_masked_pixels_over_batches():
    torch.manual_seed(0)
    metric = ReconstructionMetric()
    total, count = 0.0, 0
    for _ in range(2):
        images, reconstruction = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
        metric.update(dict(images=reconstruction, mask=mask), images)
        for b in range(2):
            for y in range(4):
                for x in range(4):
                    if mask[b, 0, y, x]:
                        total += float(((reconstruction[b, :, y, x] - images[b, :, y, x]) ** 2).sum())
                        count += 3
    assert math.isclose(metric.compute()['mse_masked'], total / count, rel_tol=1e-6)
    metric.reset()
    assert math.isnan(metric.compute()['mse_masked'])
