from mtvision.models import backbones, heads, multitask, necks
