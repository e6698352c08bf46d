"""mtvision: multi-task vision pre-training on a shared backbone."""
__version__ = '0.1.0'
