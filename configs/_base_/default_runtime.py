randomness = dict(seed=0, deterministic=False)
checkpoint_cfg = dict(interval=200, max_keep=2)
log_cfg = dict(interval=10, tensorboard=True, visualize=True)
env_cfg = dict(num_threads=None, device='auto')
mixer = dict(strategy='all')
aggregator = dict(type='WeightedSum')
resume = False
load_from = None
