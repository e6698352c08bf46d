import json
import math

from mtvision.engine.logging import ScalarWriter, to_json


def test_non_finite_values_become_null():
    text = to_json({'step': 1, 'val': {'mAP_l': math.nan, 'x': [math.inf, 1.5]}})
    assert json.loads(text) == {'step': 1, 'val': {'mAP_l': None, 'x': [None, 1.5]}}
    assert 'NaN' not in text and 'Infinity' not in text


def test_resumed_writer_drops_lines_after_the_checkpoint(tmp_path):
    writer = ScalarWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {'loss/a': float(step)})
    resumed = ScalarWriter(tmp_path, resume_step=2, tensorboard=False)
    resumed.write(3, {'loss/a': 30.0})
    lines = [json.loads(line) for line in (tmp_path / 'scalars.jsonl').read_text().splitlines()]
    assert lines == [{'step': 1, 'loss/a': 1.0}, {'step': 2, 'loss/a': 2.0}, {'step': 3, 'loss/a': 30.0}]
    assert resumed.records == lines
