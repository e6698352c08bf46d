"""OpenCV Gaussian blur against torchvision's, RandomApply from configs, and MoCo v3's asymmetric views."""
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mtvision.config import load_config
from mtvision.data.transforms import GaussianBlur, MultiView, build_pipeline

RECIPE = 'configs/_base_/datasets/real_4task_224px.py'


def _photo(height=40, width=56, seed=0) -> tv_tensors.Image:
    coarse = torch.randint(0, 256, (1, 3, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.interpolate(coarse.float(), size=(height, width), mode='bicubic')
    noisy = smooth + torch.randn(smooth.shape, generator=torch.Generator().manual_seed(seed + 1)) * 20
    return tv_tensors.Image(noisy.clamp(0, 255).round().to(torch.uint8)[0])


@pytest.mark.parametrize('sigma', [0.1, 0.7, 1.3, 2.0])
@pytest.mark.parametrize('kernel_size', [(23, 23), (5, 9)])
def test_opencv_blur_matches_torchvision_within_a_grey_level(sigma, kernel_size):
    image = _photo()
    torch.manual_seed(0)
    blurred = GaussianBlur(kernel_size, sigma=(sigma, sigma))(image)
    reference = F.gaussian_blur(image, list(kernel_size), [sigma, sigma])
    assert type(blurred) is tv_tensors.Image and blurred.dtype == torch.uint8
    assert (blurred.int() - reference.int()).abs().max() <= 1
    as_float = F.to_dtype(image, torch.float32, scale=True)
    torch.testing.assert_close(GaussianBlur(kernel_size, sigma=(sigma, sigma))(as_float),
                               F.gaussian_blur(as_float, list(kernel_size), [sigma, sigma]), atol=1e-5, rtol=0)


def test_blur_draws_torchvisions_sigma_and_leaves_labels_alone():
    image = _photo()
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 30.0, 20.0]]), format='XYXY', canvas_size=(40, 56))
    mask = tv_tensors.Mask(torch.randint(0, 5, (40, 56)))
    torch.manual_seed(3)
    ours = GaussianBlur(23, sigma=(0.1, 2.0))(image, boxes, mask)
    torch.manual_seed(3)
    theirs = v2.GaussianBlur(23, sigma=(0.1, 2.0))(image)
    assert (ours[0].int() - theirs.int()).abs().max() <= 1  # the same sigma drawn from the same stream
    assert ours[1] is boxes or torch.equal(ours[1], boxes)
    assert torch.equal(ours[2], mask) and type(ours[2]) is tv_tensors.Mask


def test_random_apply_takes_config_dicts_and_applies_all_or_none():
    image = _photo()
    never = build_pipeline([dict(type='RandomApply', p=0.0, transforms=[dict(type='RandomGrayscale', p=1.0)])])
    always = build_pipeline([dict(type='RandomApply', p=1.0, transforms=[
        dict(type='RandomGrayscale', p=1.0), dict(type='RandomSolarize', threshold=128, p=1.0)])])
    assert torch.equal(never(image), image)
    grey = F.rgb_to_grayscale(image, num_output_channels=3)
    assert torch.equal(always(image), torch.where(grey >= 128, 255 - grey, grey))


def test_moco_v3_views_of_the_recipe_are_asymmetric():
    cfg = load_config(RECIPE)
    (views,) = cfg._imagenet_contrastive_task['train_dataset']['pipeline']
    multi_view = build_pipeline([views]).transforms[0]
    assert isinstance(multi_view, MultiView) and multi_view.num_views == 2
    first, second = ([type(step).__name__ for step in view.transforms] for view in multi_view.pipelines)
    assert 'GaussianBlur' in first and 'RandomSolarize' not in first  # blurred always, never solarized
    assert second[second.index('RandomApply', 2) + 1] == 'RandomSolarize'
    blur_probability = multi_view.pipelines[1].transforms[3].p
    assert blur_probability == 0.1
    torch.manual_seed(0)
    out = multi_view(_photo(260, 300))
    assert [tuple(view.shape) for view in out] == [(3, 224, 224)] * 2 and out[0].dtype == torch.float32


def test_multi_view_takes_one_pipeline_or_one_per_view():
    crop = [dict(type='RandomResizedCrop', size=8)]
    with pytest.raises(ValueError, match='either pipeline'):
        MultiView(pipeline=crop, pipelines=[crop, crop])
    with pytest.raises(ValueError, match='at least 2'):
        MultiView(pipelines=[crop])
    torch.manual_seed(1)
    shared = MultiView(crop, num_views=3)(_photo())
    torch.manual_seed(1)
    separate = MultiView(pipelines=[crop] * 3)(_photo())
    assert all(torch.equal(a, b) for a, b in zip(shared, separate))  # the same draws in the same order
