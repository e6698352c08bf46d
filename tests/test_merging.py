import numpy as np
import pytest
import torch

import mtvision
from mtvision import merging
from mtvision.checkpoint import read_weights
from mtvision.engine import Trainer
from mtvision.probe.models import load_backbone


def toy_state(seed: int, heads=('cls',), momentum=()) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {'backbone.w': torch.randn(4, 3, generator=generator), 'backbone.b': torch.randn(3, generator=generator),
             'backbone.norm.num_batches_tracked': torch.tensor(seed, dtype=torch.long)}
    for task in heads:
        state[f'heads.{task}.fc.weight'] = torch.randn(2, 3, generator=generator)
    for task in momentum:
        state[f'momentum_backbones.{task}.w'] = torch.randn(4, 3, generator=generator)
        state[f'momentum_backbones.{task}.b'] = torch.randn(3, generator=generator)
    return state


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def test_a_uniform_soup_of_identical_models_is_the_model_exactly():
    state = toy_state(0, heads=('cls', 'seg'))
    assert_states_equal(merging.uniform_soup([state, state, state]), state)


def test_task_arithmetic_at_scale_0_is_the_base_and_one_model_at_scale_1_is_that_model():
    base, tuned, other = toy_state(0), toy_state(1), toy_state(2)
    zero = merging.task_arithmetic(base, [tuned, other], scale=0.0)
    assert_states_equal(zero, base)
    one = merging.task_arithmetic(base, [tuned], scale=1.0)
    assert_states_equal({key: value for key, value in one.items() if value.is_floating_point()},
                        {key: value for key, value in tuned.items() if value.is_floating_point()})
    # an integer counter is never averaged into a float: the base's
    assert one['backbone.norm.num_batches_tracked'].dtype == torch.long
    assert int(one['backbone.norm.num_batches_tracked']) == 0


def test_heads_are_carried_per_task_and_momentum_backbones_follow_the_merged_backbone():
    cls_model, seg_model = toy_state(1, heads=('cls',)), toy_state(2, heads=('seg',), momentum=('seg',))
    soup = merging.uniform_soup([cls_model, seg_model])
    assert torch.equal(soup['heads.cls.fc.weight'], cls_model['heads.cls.fc.weight'])
    assert torch.equal(soup['heads.seg.fc.weight'], seg_model['heads.seg.fc.weight'])
    torch.testing.assert_close(soup['backbone.w'], (cls_model['backbone.w'] + seg_model['backbone.w']) / 2)
    assert torch.equal(soup['momentum_backbones.seg.w'], soup['backbone.w'])
    assert not any(key.startswith('momentum_backbones.cls') for key in soup)
    assert int(soup['backbone.norm.num_batches_tracked']) == 1  # the first model's counter

    # task arithmetic: the base's head moves by the task vectors, a head the base lacks is averaged, and a head the
    # base alone holds is left out
    base = toy_state(0, heads=('cls', 'old'))
    cls_b = toy_state(3, heads=('cls', 'depth'))
    merged = merging.task_arithmetic(base, [cls_model, cls_b, seg_model], scale=0.5)
    expected = base['heads.cls.fc.weight'] + 0.5 * (cls_model['heads.cls.fc.weight'] + cls_b['heads.cls.fc.weight']
                                                    - 2 * base['heads.cls.fc.weight'])
    torch.testing.assert_close(merged['heads.cls.fc.weight'], expected)
    assert torch.equal(merged['heads.seg.fc.weight'], seg_model['heads.seg.fc.weight'])
    assert torch.equal(merged['heads.depth.fc.weight'], cls_b['heads.depth.fc.weight'])
    assert not any(key.startswith('heads.old.') for key in merged)


def ties_reference(base: dict, tuned: list[dict], density: float, scale: float) -> dict:
    """TIES-merging written out in numpy, key by key over the flattened task vectors."""
    keys = list(base)
    vectors = [np.concatenate([(t[k].double().numpy() - base[k].double().numpy()).ravel() for k in keys])
               for t in tuned]
    trimmed = []
    for vector in vectors:
        keep = max(1, round(density * vector.size))
        threshold = np.sort(np.abs(vector))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(vector) >= threshold, vector, 0.0))
    stacked = np.stack(trimmed)
    elected = np.sign(stacked.sum(axis=0))
    merged = np.zeros(stacked.shape[1])
    for j in range(stacked.shape[1]):
        agreeing = [v for v in stacked[:, j] if v != 0 and np.sign(v) == elected[j]]
        merged[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    out, offset = {}, 0
    for k in keys:
        size = base[k].numel()
        out[k] = base[k].double().numpy() + scale * merged[offset:offset + size].reshape(base[k].shape)
        offset += size
    return out


def test_ties_matches_a_numpy_reference_with_sign_ties_and_zeros():
    base = {'backbone.a': torch.zeros(2, 3), 'backbone.b': torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tuned = [
        {'backbone.a': torch.tensor([[3.0, -2.0, 0.0], [0.5, 4.0, -1.0]]),
         'backbone.b': torch.tensor([1.0, 5.0, 3.0, 4.5])},
        # column 0 of a: +3 and -3 cancel (no elected sign); a[0, 2]: zeros everywhere; b[0]: zero task vectors
        {'backbone.a': torch.tensor([[-3.0, -1.0, 0.0], [-0.25, 2.0, 1.5]]),
         'backbone.b': torch.tensor([1.0, -1.0, 6.0, 3.0])},
        {'backbone.a': torch.tensor([[0.0, 2.5, 0.0], [0.2, -4.0, -2.0]]),
         'backbone.b': torch.tensor([1.0, 2.0, 3.5, 4.0])},
    ]
    for density in (1.0, 0.5, 0.2):
        for scale in (1.0, 0.7):
            merged = merging.ties_merge(base, tuned, density=density, scale=scale)
            expected = ties_reference(base, tuned, density, scale)
            for key, value in expected.items():
                np.testing.assert_allclose(merged[key].double().numpy(), value, rtol=1e-6, atol=1e-6)
    full = merging.ties_merge(base, tuned, density=1.0, scale=1.0)
    assert float(full['backbone.a'][0, 0]) == 0.0  # +3 and -3: no sign elected
    assert float(full['backbone.a'][1, 1]) == pytest.approx(3.0)  # +4 and +2 agree, -4 is left out: (4 + 2) / 2
    # random tensors, several task vectors
    generator = torch.Generator().manual_seed(0)
    base = {f'backbone.{i}': torch.randn(5, 4, generator=generator) for i in range(3)}
    tuned = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(4)]
    merged = merging.ties_merge(base, tuned, density=0.3, scale=0.9)
    for key, value in ties_reference(base, tuned, 0.3, 0.9).items():
        np.testing.assert_allclose(merged[key].double().numpy(), value, rtol=1e-5, atol=1e-5)


def test_task_vector_geometry_matches_numpy_over_the_backbone_only():
    base = toy_state(0, heads=('cls',))
    generator = torch.Generator().manual_seed(5)
    step = {key: torch.randn(value.shape, generator=generator) for key, value in base.items()
            if key.startswith('backbone.') and value.is_floating_point()}
    step['backbone.w'][0] = 0.0  # entries where a task vector is zero do not vote on signs

    def tuned(factor, head_seed):
        state = {key: value + factor * step[key] if key in step else value.clone() for key, value in base.items()}
        state['heads.cls.fc.weight'] = toy_state(head_seed)['heads.cls.fc.weight']  # heads differ: not counted
        return state
    other = toy_state(9, heads=('cls',))  # an unrelated direction
    states = [tuned(1.0, 1), tuned(-0.5, 2), tuned(2.0, 3), other]
    geometry = merging.task_vector_geometry(base, states)

    def flat(state):
        return np.concatenate([state[key].double().numpy().ravel() for key in sorted(step)])
    vectors = [flat(state) - flat(base) for state in states]
    np.testing.assert_allclose(geometry.relative_norms,
                               [np.linalg.norm(v) / np.linalg.norm(flat(base)) for v in vectors], rtol=1e-12)
    for i, a in enumerate(vectors):
        for j, b in enumerate(vectors):
            assert geometry.cosines[i][j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)
            both = (a != 0) & (b != 0)
            assert geometry.sign_agreement[i][j] == pytest.approx(np.mean(np.sign(a[both]) == np.sign(b[both])))
    assert geometry.cosines[0][1] == pytest.approx(-1.0) and geometry.sign_agreement[0][1] == 0.0
    assert geometry.cosines[0][2] == pytest.approx(1.0) and geometry.sign_agreement[0][2] == 1.0
    assert geometry.relative_norms[2] == pytest.approx(2 * geometry.relative_norms[0])


def test_mismatched_keys_and_shapes_are_refused_with_the_keys_named():
    first, second = toy_state(0), toy_state(1)
    del second['backbone.b']
    second['backbone.extra'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'(?s)lacks backbone keys of a: backbone\.b.*has backbone keys a lacks: '
                                         r'backbone\.extra'):
        merging.uniform_soup([first, second], names=['a', 'b'])
    wide = toy_state(2, heads=('cls',))
    wide['heads.cls.fc.weight'] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r'heads\.cls\.fc\.weight \(base \(2, 3\).*tuned \(5, 3\)'):
        merging.task_arithmetic(toy_state(0), [wide], 1.0, names=['base', 'tuned'])
    with pytest.raises(ValueError, match='same tasks'):
        merging.greedy_soup([toy_state(0, heads=('cls',)), toy_state(1, heads=('seg',))], lambda state: 0.0)


def test_greedy_soup_keeps_what_helps_and_never_ends_below_its_best_ingredient():
    # the score is the closeness of the backbone to a target: averaging with a far ingredient hurts, with one on the
    # other side of the target helps
    target = toy_state(0)['backbone.w']
    near, opposite, far = (toy_state(0) for _ in range(3))
    near['backbone.w'] = target + 0.2
    opposite['backbone.w'] = target - 0.3
    far['backbone.w'] = target + 5.0

    def score_fn(state):
        return -float((state['backbone.w'] - target).abs().mean())
    soup = merging.greedy_soup([far, opposite, near], score_fn)
    assert soup.kept == [2, 1]  # near first (best), then opposite (the mean is closer); far would hurt
    assert [(index, accepted) for index, _, accepted in soup.trials] == [(1, True), (0, False)]
    assert soup.score >= max(soup.ingredient_scores)
    torch.testing.assert_close(soup.state['backbone.w'], (near['backbone.w'] + opposite['backbone.w']) / 2)


def train(tiny_config, work_dir, tasks, iters, load_from=None, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(**{'train_cfg.max_iters': iters, 'checkpoint_cfg.interval': iters})
    cfg.tasks = {name: cfg.tasks[name] for name in tasks}
    Trainer(cfg, work_dir, load_from=load_from, validate=False).train()
    return work_dir


def test_the_tool_merges_single_task_models_into_one_that_loads(tiny_config, tmp_path, load_tool, capsys):
    base = train(tiny_config, tmp_path / 'base', ['cls'], 1)
    cls_model = train(tiny_config, tmp_path / 'cls', ['cls'], 2, load_from=str(base), seed=1)
    seg_model = train(tiny_config, tmp_path / 'seg', ['seg'], 1, load_from=str(base), seed=2)
    tool = load_tool('merge_models')

    # uniform: each head is its model's, the backbone the mean; the output loads as a model and in tools/test.py
    out = tmp_path / 'uniform'
    summary = tool.main([str(cls_model), str(seg_model), '--method', 'uniform', '--out', str(out)])
    assert summary['tasks'] == ['cls', 'seg']
    merged = read_weights(out / 'merged.safetensors')
    sources = {name: read_weights(path) for name, path in (('cls', cls_model), ('seg', seg_model))}
    for task, source in sources.items():
        head = {key: value for key, value in source.items() if key.startswith(f'heads.{task}.')}
        assert head and all(torch.equal(merged[key], value) for key, value in head.items())
    backbone = [key for key in merged if key.startswith('backbone.')]
    assert backbone and backbone == [key for key in sources['cls'] if key.startswith('backbone.')]
    for key in backbone:
        torch.testing.assert_close(merged[key], (sources['cls'][key] + sources['seg'][key]) / 2)
    model = mtvision.load_model(str(out / 'merged.safetensors'), config=str(out / 'merged.py'))
    assert set(model.heads) == {'cls', 'seg'}
    torch.testing.assert_close(model.heads['seg'].state_dict(),
                               {key[len('heads.seg.'):]: value for key, value in sources['seg'].items()
                                if key.startswith('heads.seg.')})
    assert load_backbone(str(out / 'merged.safetensors')).backbone  # the probes read its header alone
    results = load_tool('test').main([str(out / 'merged.py'), str(out / 'merged.safetensors'), '--no-pictures',
                                      '--work-dir', str(tmp_path / 'test')])
    assert set(results) == {'cls', 'seg'}

    # task arithmetic with a scale search: every scale scored on both validation sets, the best one kept
    capsys.readouterr()
    summary = tool.main([str(cls_model), str(seg_model), '--method', 'task-arithmetic', '--base', str(base),
                         '--scales', '0', '1', '--out', str(tmp_path / 'ta')])
    table = capsys.readouterr().out
    assert 'scale 0' in table and 'scale 1' in table and 'chosen' in table and 'cls top1' in table
    assert '|tau| / |base|' in table  # the task vectors' geometry, printed before the search
    expected = merging.task_vector_geometry(read_weights(base), [sources['cls'], sources['seg']])
    assert summary['task_vectors'] == expected._asdict()
    scored = {row['candidate']: row['score'] for row in summary['table']}
    assert summary['scale'] in (0, 1) and summary['score'] == max(scored['scale 0'], scored['scale 1'])
    assert mtvision.load_model(str(tmp_path / 'ta' / 'merged.safetensors'), config=str(tmp_path / 'ta' / 'merged.py'))

    # greedy soup scored through evaluation: never below its best ingredient
    summary = tool.main([str(base), str(cls_model), '--method', 'greedy', '--out', str(tmp_path / 'greedy')])
    ingredients = [row['score'] for row in summary['table'] if row['note'] == 'model']
    assert len(ingredients) == 2 and summary['score'] >= max(ingredients)


def test_the_tool_refuses_models_whose_configs_differ(tiny_config, tmp_path, load_tool):
    small = train(tiny_config, tmp_path / 'small', ['cls'], 1)
    torch.manual_seed(0)
    cfg = tiny_config(**{'train_cfg.max_iters': 1, 'checkpoint_cfg.interval': 1, 'model.backbone.depth': 1})
    cfg.tasks = {'cls': cfg.tasks['cls']}
    Trainer(cfg, tmp_path / 'shallow', validate=False).train()
    with pytest.raises(SystemExit, match=r'model\.backbone\.depth \(2 vs 1\)'):
        load_tool('merge_models').main([str(small), str(tmp_path / 'shallow'), '--method', 'uniform',
                                        '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
