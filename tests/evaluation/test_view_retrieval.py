import pytest
import torch
import torch.nn.functional as F

from mtvision.evaluation import ViewRetrieval


def test_view_retrieval_against_a_brute_force_count():
    torch.manual_seed(0)
    metric = ViewRetrieval()
    correct = queries = 0
    cosine = []
    for _ in range(3):
        first = F.normalize(torch.randn(5, 4), dim=-1)
        second = F.normalize(first + 0.8 * torch.randn(5, 4), dim=-1)
        metric.update(torch.cat([first, second]))
        for i in range(5):
            correct += max(range(5), key=lambda j: float(first[i] @ second[j])) == i
            correct += max(range(5), key=lambda j: float(second[i] @ first[j])) == i
            queries += 2
            cosine.append(float(first[i] @ second[i]))
    result = metric.compute()
    assert 0 < correct < queries  # the noise makes some retrievals fail
    assert result['top1'] == pytest.approx(100 * correct / queries)
    assert result['positive_cosine'] == pytest.approx(sum(cosine) / len(cosine), rel=1e-6)


def test_view_retrieval_rejects_an_odd_batch():
    with pytest.raises(ValueError, match=r'\[2B, D\]'):
        ViewRetrieval().update(torch.randn(3, 4))
