from mtvision.optim.aggregators import Aggregator, WeightedSum
from mtvision.optim.lars import LARS
from mtvision.optim.optimizer import build_optimizer, check_schedule, param_groups, scheduled_lr

__all__ = ['LARS', 'Aggregator', 'WeightedSum', 'build_optimizer', 'check_schedule', 'param_groups', 'scheduled_lr']
