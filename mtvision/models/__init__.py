from mtvision.models import backbones
