from mtvision.optim.aggregators import AlignedMTL, AlignedMTLUB, Aggregator, GradientSurgery, PCGrad, WeightedSum
from mtvision.optim.lars import LARS
from mtvision.optim.loss_weighting import GradNorm, UncertaintyWeighting
from mtvision.optim.optimizer import (auto_scaled_lr, build_optimizer, check_schedule, layer_ids,
                                     match_parameter_layouts, param_groups, paramwise_groups, scheduled_lr,
                                     trained_parameters)

__all__ = ['LARS', 'Aggregator', 'AlignedMTL', 'AlignedMTLUB', 'GradNorm', 'GradientSurgery', 'PCGrad',
           'UncertaintyWeighting', 'WeightedSum', 'auto_scaled_lr', 'build_optimizer', 'check_schedule',
           'layer_ids', 'match_parameter_layouts', 'param_groups', 'paramwise_groups', 'scheduled_lr',
           'trained_parameters']
